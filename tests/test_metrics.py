"""GET /metrics: HTTP, ingest and worker metrics move as events go through a real pipeline."""

from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families

from kloudmeter_py.config import Settings
from kloudmeter_py.core.keys import event_subject
from kloudmeter_py.metrics import Metrics
from kloudmeter_py.store.server import NatsServer
from kloudmeter_py.worker import Worker
from tests.conftest import eventually
from tests.helpers import create_meter, post_event
from tests.wiring import observable_app

Http = TestClient[Any, Any]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def settings(nats_server: NatsServer) -> Settings:
    # The worker's own dedup is on, so that its counter can move too.
    return Settings(nats_url=nats_server.url, partitions=2, batch_size=200, dedup_horizon=3600)


@pytest.fixture
async def http(nc: Client, settings: Settings, worker: Worker) -> AsyncIterator[Http]:
    app = observable_app(settings, nc, worker)
    async with TestClient(TestServer(app)) as client:
        yield client


async def scrape(http: Http) -> Samples:
    resp = await http.get("/metrics")
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    out: Samples = {}
    for family in text_string_to_metric_families(await resp.text()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(ls) for (n, ls) in samples if n == name]


async def until(http: Http, check: Callable[[Samples], bool]) -> Samples:
    return await eventually(lambda: scrape(http), check)


def latency_count(samples: Samples, method: str, route: str, status: int) -> float:
    return value(
        samples,
        "kloudmeter_http_request_duration_seconds_count",
        method=method,
        route=route,
        status=str(status),
    )


async def test_event_ingested_applied_and_timed(http: Http, worker: Worker) -> None:
    await create_meter(
        http, id="api-calls", eventType="api-request", aggregation="sum", valueProperty="$.ms"
    )
    before = await scrape(http)
    assert value(before, "kloudmeter_http_events_ingested_total") == 0
    assert value(before, "kloudmeter_events_applied_total") == 0
    assert series(before, "kloudmeter_events_applied_total")  # the worker is watched
    assert latency_count(before, "POST", "/api/create-meter", 201) == 1

    await post_event(http, id="e1", eventType="api-request", subject="c1", data={"ms": 5})
    # Applied counts move as a key is written, the round's events and histograms once the
    # round is done (Runner._process): wait for the round, observed last.
    after = await until(
        http,
        lambda s: (
            value(s, "kloudmeter_events_applied_total") == 1
            and value(s, "kloudmeter_write_round_events_count") >= 1
        ),
    )
    route = "/api/register-event"
    assert value(after, "kloudmeter_http_events_ingested_total", route=route) == 1
    assert value(after, "kloudmeter_http_events_duplicate_total") == 0
    assert latency_count(after, "POST", route, 202) == 1
    assert value(after, "kloudmeter_worker_events_total") == 1
    assert value(after, "kloudmeter_events_dead_lettered_total") == 0
    # One write round of one event, timed; the worker's backlog is empty.
    assert value(after, "kloudmeter_write_round_events_count") == 1
    assert value(after, "kloudmeter_write_round_events_sum") == 1
    assert value(after, "kloudmeter_write_round_seconds_count") == 1
    assert value(after, "kloudmeter_write_round_seconds_sum") > 0
    lags = series(after, "kloudmeter_consumer_lag")
    assert [labels["worker"] for labels in lags] == [worker.worker_id]
    assert value(after, "kloudmeter_consumer_lag") == 0

    # The same id again: stored by JetStream as a duplicate, not applied again.
    await post_event(http, id="e1", eventType="api-request", subject="c1", data={"ms": 5})
    again = await until(http, lambda s: latency_count(s, "POST", route, 202) == 2)
    assert value(again, "kloudmeter_http_events_ingested_total", route=route) == 2
    assert value(again, "kloudmeter_http_events_duplicate_total", route=route) == 1
    assert value(again, "kloudmeter_events_applied_total") == 1


async def test_routes_are_canonical_and_statuses_counted(http: Http) -> None:
    await create_meter(http, id="m1", eventType="t", aggregation="count")
    for meter in ("m1", "nope"):
        await http.get(f"/api/meters/{meter}/query")
    resp = await http.post("/api/register-event", data=b"{")
    assert resp.status == 400
    resp = await http.get("/no/such/path")
    assert resp.status == 404
    s = await scrape(http)
    assert latency_count(s, "GET", "/api/meters/{meter}/query", 200) == 1
    assert latency_count(s, "GET", "/api/meters/{meter}/query", 404) == 1
    assert latency_count(s, "POST", "/api/register-event", 400) == 1
    assert latency_count(s, "GET", "unmatched", 404) == 1
    routes = {
        labels["route"] for labels in series(s, "kloudmeter_http_request_duration_seconds_count")
    }
    assert "/api/meters/m1/query" not in routes and "/no/such/path" not in routes
    # A failed request ingests nothing.
    assert value(s, "kloudmeter_http_events_ingested_total") == 0


async def test_batches_samples_dead_letters_and_worker_dedup(http: Http, nc: Client) -> None:
    await create_meter(
        http, id="tokens", eventType="prompt", aggregation="sum", valueProperty="$.tokens"
    )
    batch = [
        {
            "id": str(i),
            "source": "app",
            "specversion": "1.0",
            "type": "prompt",
            "subject": "acme",
            "data": {"tokens": "many" if i == 2 else i},  # the third one is dead-lettered
        }
        for i in range(3)
    ]
    resp = await http.post(
        "/api/v1/events",
        data=msgspec.json.encode(batch),
        headers={"Content-Type": "application/cloudevents-batch+json"},
    )
    assert resp.status == 204, await resp.text()
    resp = await http.post("/api/perf/host-1/1700000000", json={"cpu": 3.5, "mem": 41.0})
    assert resp.status == 202, await resp.text()
    # Published straight to NATS twice without a Nats-Msg-Id: the worker drops the copy.
    body = {"id": "direct-1", "eventType": "prompt", "subject": "acme", "data": {"tokens": 1}}
    for _ in range(2):
        await nc.jetstream().publish(
            event_subject("meters", "prompt", "acme"), msgspec.json.encode(body)
        )
    s = await until(
        http,
        lambda s: (
            value(s, "kloudmeter_events_dead_lettered_total") == 1
            and value(s, "kloudmeter_events_deduplicated_total") == 1
            and value(s, "kloudmeter_worker_events_total") == 3 + 2 + 2
        ),
    )
    assert value(s, "kloudmeter_http_events_ingested_total", route="/api/v1/events") == 3
    assert value(s, "kloudmeter_http_events_ingested_total", route="/api/perf/{host}/{epoch}") == 2
    # tokens: 0, 1 and direct-1 once; perf: cpu and mem.
    assert value(s, "kloudmeter_events_applied_total") == 3 + 2
    assert value(s, "kloudmeter_write_round_events_sum") == 3 + 2 + 2


async def test_registries_are_separate() -> None:
    one, two = Metrics(), Metrics(process_collectors=False)
    one.observe_round(10, 0.5, 3, worker="w1")
    assert one.registry.get_sample_value("kloudmeter_write_round_events_sum") == 10
    assert two.registry.get_sample_value("kloudmeter_write_round_events_sum") == 0
    assert one.registry.get_sample_value("process_cpu_seconds_total") is not None
    assert two.registry.get_sample_value("process_cpu_seconds_total") is None


async def test_a_child_workers_reports_reach_metrics_through_a_pipe() -> None:
    """metrics.Reporter (in a `kloudmeter up` child) -> metrics.follow (in up): the child's
    counters and lag under its own label, its rounds in the histograms; a report with more
    rounds than one atomic pipe write holds goes without them, never cut; once the pipe
    closes the child has no lag any more."""
    import asyncio
    import os
    import select
    from dataclasses import dataclass, field

    from kloudmeter_py.metrics import Reporter, follow
    from kloudmeter_py.worker import WorkerStats

    @dataclass
    class Child:
        worker_id: str = "child-1"
        stats: WorkerStats = field(default_factory=WorkerStats)
        metrics: Any = None
        owned: list[int] = field(default_factory=lambda: [1, 3])

    metrics = Metrics(process_collectors=False)
    read_fd, write_fd = os.pipe()
    reader = asyncio.StreamReader()
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", 0)
    )
    following = asyncio.create_task(follow(metrics, reader))
    child = Child()
    reporter = Reporter(write_fd, child, period=3600)
    assert child.metrics is reporter
    child.stats.applied = 40
    reporter.observe_round(40, 0.25, 7, child.worker_id)
    reporter.report()
    many = select.PIPE_BUF // 10  # more rounds than one atomic write holds
    for _ in range(many):
        reporter.observe_round(1, 0.001, 0, child.worker_id)
    child.stats.applied = 41
    reporter.report()
    os.close(write_fd)
    await asyncio.wait_for(following, 5)
    transport.close()

    from prometheus_client import generate_latest

    samples: Samples = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    assert samples[("kloudmeter_events_applied_total", frozenset({("worker", "child-1")}))] == 41
    assert samples[("kloudmeter_write_round_events_count", frozenset())] == 1  # not `many` more
    assert samples[("kloudmeter_write_round_events_sum", frozenset())] == 40
    assert ("kloudmeter_consumer_lag", frozenset({("worker", "child-1")})) not in samples
