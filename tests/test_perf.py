"""Host metrics: the liz receiver API (/api/perf) and the psutil agent, on the event pipeline."""

import asyncio
import math
import socket
import time
from collections import defaultdict
from collections.abc import MutableMapping
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from nats.aio.client import Client
from structlog.testing import capture_logs

from kloudmeter_py.agent import AgentStats, gather_stats, run_agent, sample_url
from kloudmeter_py.config import Settings
from kloudmeter_py.errors import ConfigError
from kloudmeter_py.gateway import create_app
from kloudmeter_py.store.server import NatsServer
from kloudmeter_py.worker import Worker
from tests.conftest import eventually
from tests.helpers import Http, readings

LogEntries = list[MutableMapping[str, Any]]


@pytest.fixture
def settings(nats_server: NatsServer) -> Settings:
    """One-second "minute" windows (METER_INTERVAL=1), so a few seconds make several."""
    return Settings(nats_url=nats_server.url, partitions=2, batch_size=200, interval=1)


class Recorder:
    """A sampler with known values: remembers every (epoch, values) it handed out."""

    def __init__(self, bad_first: bool = False) -> None:
        self.samples: list[tuple[int, dict[str, float]]] = []
        self.bad_first = bad_first

    def __call__(self) -> tuple[int, dict[str, float]]:
        n = len(self.samples)
        values = {"cpu": float(n % 7) * 1.5 + 0.25, "mem": 40.0 + n}
        if self.bad_first and n == 0:
            values = {"cpu": math.nan, "mem": 1.0}
        epoch = int(time.time())
        self.samples.append((epoch, values))
        return epoch, values


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _published(logs: LogEntries) -> list[str]:
    """URLs of the "Publish was successful to ..." lines, in order."""
    prefix = "Publish was successful to "
    return [e["event"][len(prefix) :] for e in logs if e["event"].startswith(prefix)]


def _expected(samples: list[tuple[int, dict[str, float]]], label: str) -> dict[int, list[float]]:
    """Per one-second window: the values of ``label``."""
    out: dict[int, list[float]] = defaultdict(list)
    for epoch, values in samples:
        out[epoch].append(values[label])
    return out


async def _host(http: Http, host: str, label: str = "") -> dict[str, Any]:
    path = f"/api/perf/{host}" + (f"/{label}" if label else "")
    resp = await http.get(path)
    if resp.status == 404:
        return {}
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


def _num_samples(body: dict[str, Any], key: str) -> int:
    return sum(a["num-samples"] for a in body.get(key, {}).get("averages", []))


def _check_series(series: dict[str, Any], expected: dict[int, list[float]]) -> None:
    assert series["timeslice-size-sec"] == 1
    assert series["average-count"] == len(series["averages"]) == len(expected)
    assert series["start"] <= min(expected) and series["end"] >= max(expected)
    for point in series["averages"]:
        values = expected[point["start-sec"]]
        assert point["end-sec"] == point["start-sec"] + 1
        assert point["interval-size-sec"] == 1
        assert point["num-samples"] == len(values)
        assert point["avg"] == pytest.approx(sum(values) / len(values))


async def _run(agent: "asyncio.Task[AgentStats]", stop: asyncio.Event) -> AgentStats:
    stop.set()
    return await asyncio.wait_for(agent, 5)


async def test_agent_samples_become_minute_and_hour_averages(http: Http, worker: Worker) -> None:
    """A few seconds of an agent at 0.2s: each window's average is the average of the samples
    sent in it, and every post is logged as the liz monitor logged it."""
    base = str(http.make_url("/api/perf"))
    rec = Recorder()
    stop = asyncio.Event()
    with capture_logs() as logs:
        agent = asyncio.create_task(run_agent("web-1", base, 0.2, stop, sampler=rec))

        async def published() -> int:
            return len(_published(logs))

        await eventually(published, lambda n: n >= 12)
        stats = await _run(agent, stop)
    assert stats.dropped == stats.rejected == 0
    assert stats.published + stats.unsent == stats.sampled == len(rec.samples)
    sent = rec.samples[: stats.published]
    # One line per sample, in sampling order, to <url>/<host>/<epoch>.
    assert _published(logs) == [f"{base}/web-1/{epoch}" for epoch, _ in sent]

    key_cpu, key_mem = "summary:by-minute:cpu", "summary:by-minute:mem"
    keys = [key_cpu, key_mem, "summary:by-hour:cpu", "summary:by-hour:mem"]
    body = await eventually(
        lambda: _host(http, "web-1"),
        lambda b: all(_num_samples(b, k) == len(sent) for k in keys),
    )
    assert list(body) == keys
    _check_series(body[key_cpu], _expected(sent, "cpu"))
    _check_series(body[key_mem], _expected(sent, "mem"))
    hour = body["summary:by-hour:cpu"]
    assert hour["timeslice-size-sec"] == 3600
    assert hour["start"] % 3600 == 0 and hour["start"] <= time.time() - 86400
    assert sum(a["num-samples"] for a in hour["averages"]) == len(sent)
    total = sum(a["avg"] * a["num-samples"] for a in hour["averages"])
    assert total == pytest.approx(sum(v["cpu"] for _, v in sent))
    for a in hour["averages"]:
        assert (a["interval-size-sec"], a["end-sec"] - a["start-sec"]) == (3600, 3600)


async def test_label_filter_is_a_case_insensitive_substring_of_the_key(
    http: Http, worker: Worker
) -> None:
    epoch = int(time.time())
    resp = await http.post(f"/api/perf/db-1/{epoch}", json={"cpu": 10, "mem": 50, "Disk_IO": 3})
    assert resp.status == 202, await resp.text()
    assert await resp.json() == {"status": "ok", "events": 3}
    everything = await eventually(lambda: _host(http, "db-1"), lambda b: len(b) == 6)
    assert sorted(everything) == sorted(
        f"summary:{level}:{label}"
        for level in ("by-minute", "by-hour")
        for label in ("cpu", "mem", "Disk_IO")
    )
    point = everything["summary:by-minute:Disk_IO"]["averages"]
    assert point == [
        {
            "start-sec": epoch,
            "end-sec": epoch + 1,
            "interval-size-sec": 1,
            "num-samples": 1,
            "avg": 3,
        }
    ]
    assert sorted(await _host(http, "db-1", "CPU")) == [
        "summary:by-hour:cpu",
        "summary:by-minute:cpu",
    ]
    assert sorted(await _host(http, "db-1", "by-HOUR")) == [
        "summary:by-hour:Disk_IO",
        "summary:by-hour:cpu",
        "summary:by-hour:mem",
    ]
    assert list(await _host(http, "db-1", "by-minute:disk_io")) == ["summary:by-minute:Disk_IO"]
    resp = await http.get("/api/perf/db-1/nothing-like-this")
    assert resp.status == 200 and await resp.json() == {}


async def test_hosts_list_unknown_hosts_and_duplicates(http: Http, worker: Worker) -> None:
    resp = await http.get("/api/perf")
    assert resp.status == 200 and await resp.json() == []
    now = int(time.time())
    for host in ("web-2", "rack 1.b"):
        resp = await http.post(f"/api/perf/{host}/{now}", json={"cpu": 1.5})
        assert resp.status == 202, await resp.text()
    # Three days old: older than every window the API reads (and than the hour retention).
    resp = await http.post(f"/api/perf/old/{now - 3 * 86400}", json={"cpu": 7})
    assert resp.status == 202

    async def hosts() -> list[str]:
        resp = await http.get("/api/perf")
        assert resp.status == 200
        body: list[str] = await resp.json()
        return body

    await eventually(hosts, lambda hs: hs == ["rack 1.b", "web-2"])
    await eventually(
        lambda: readings(http, meter="perf-hosts"),
        lambda rs: any(r["groupBy"]["host"] == "old" for r in rs),
    )
    assert await hosts() == ["rack 1.b", "web-2"]
    for unknown in ("old", "nobody", "nobody/cpu"):
        resp = await http.get(f"/api/perf/{unknown}")
        assert resp.status == 404
        assert (await resp.json())["field"] == "host"
    body = await eventually(
        lambda: _host(http, "rack 1.b", "by-minute"), lambda b: "summary:by-minute:cpu" in b
    )
    assert body["summary:by-minute:cpu"]["averages"][0]["avg"] == 1.5

    # A retried post is the same events: counted once. Another Idempotency-Key is another
    # sample of the same second (the agent sends one per sample).
    resp = await http.post(f"/api/perf/web-2/{now}", json={"cpu": 1.5})
    assert await resp.json() == {"status": "ok", "events": 1, "duplicates": 1}
    for _ in range(2):
        resp = await http.post(
            f"/api/perf/web-2/{now}", json={"cpu": 4.5}, headers={"Idempotency-Key": "k1"}
        )
        assert resp.status == 202
    body = await eventually(
        lambda: _host(http, "web-2", "by-minute:cpu"),
        lambda b: _num_samples(b, "summary:by-minute:cpu") == 2,
    )
    assert body["summary:by-minute:cpu"]["averages"][0]["avg"] == 3
    assert [m["id"] for m in await (await http.get("/api/meters")).json()] == ["perf-hosts"]


@pytest.mark.parametrize(
    ("epoch", "body", "field"),
    [
        ("abc", b'{"cpu": 1}', "epoch"),
        ("1.5", b'{"cpu": 1}', "epoch"),
        ("-5", b'{"cpu": 1}', "epoch"),
        ("99999999999999", b'{"cpu": 1}', "epoch"),
        ("1700000000", b"[1, 2]", "body"),
        ("1700000000", b'"cpu"', "body"),
        ("1700000000", b"3", "body"),
        ("1700000000", b"{}", "body"),
        ("1700000000", b'{"cpu": "high"}', "cpu"),
        ("1700000000", b'{"cpu": 1, "up": true}', "up"),
        ("1700000000", b'{"cpu": null}', "cpu"),
        ("1700000000", b'{"cpu": {"user": 1}}', "cpu"),
        ("1700000000", b'{"cpu": [1]}', "cpu"),
        ("1700000000", b"{not json", None),
        ("1700000000", b"", None),
    ],
)
async def test_bad_samples_are_400s_naming_the_field(
    http: Http, epoch: str, body: bytes, field: str | None
) -> None:
    resp = await http.post(f"/api/perf/h/{epoch}", data=body)
    assert resp.status == 400
    err = await resp.json()
    assert err["status"] == "error" and err["message"]
    assert err.get("field") == field
    # Nothing was published, nor the meter created.
    assert await (await http.get("/api/meters")).json() == []


async def test_a_bad_idempotency_key_is_a_400(http: Http) -> None:
    resp = await http.post(
        "/api/perf/h/1700000000", json={"cpu": 1}, headers={"Idempotency-Key": "a b"}
    )
    assert resp.status == 400
    assert (await resp.json())["field"] == "Idempotency-Key"


async def test_the_agent_buffers_while_the_receiver_is_down_and_catches_up(
    nc: Client, settings: Settings, worker: Worker
) -> None:
    """Nothing listens at first: the agent retries with backoff and keeps a bounded buffer
    (the oldest waiting samples go, and the log says so). Once a receiver listens on that
    port, the buffered samples arrive, oldest first, each counted once."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}/api/perf"
    rec = Recorder()
    stop = asyncio.Event()
    with capture_logs() as logs:
        agent = asyncio.create_task(
            run_agent("edge-1", base, 0.1, stop, sampler=rec, buffer_size=5, backoff=(0.05, 0.2))
        )

        async def events() -> list[str]:
            return [e["event"] for e in logs]

        seen = await eventually(
            events,
            lambda es: (
                any(e.startswith("Buffer full (5 samples)") for e in es)
                and any("5 more samples buffered, at most 5)" in e for e in es)
            ),
        )
        failed = [e for e in seen if e.startswith("Publish failed to")]
        assert failed[0].startswith(f"Publish failed to {base}/edge-1/{rec.samples[0][0]}: ")
        assert "retrying in" in failed[0]
        assert _published(logs) == []

        async with TestClient(TestServer(create_app(settings, nc), port=port)) as http:

            async def published() -> int:
                return len(_published(logs))

            await eventually(published, lambda n: n >= 10)
            stats = await _run(agent, stop)
            assert any(e["event"].startswith("Receiver is back") for e in logs)
            assert stats.dropped > 0 and stats.rejected == 0
            assert stats.published + stats.dropped + stats.unsent == stats.sampled
            # Delivered: the sample that was being retried, then the ones after the dropped.
            sent = [
                rec.samples[0],
                *rec.samples[1 + stats.dropped : stats.published + stats.dropped],
            ]
            assert len(sent) == stats.published
            assert _published(logs) == [f"{base}/edge-1/{e}" for e, _ in sent]
            body = await eventually(
                lambda: _host(http, "edge-1", "by-minute:cpu"),
                lambda b: _num_samples(b, "summary:by-minute:cpu") == len(sent),
            )
            _check_series(body["summary:by-minute:cpu"], _expected(sent, "cpu"))


async def test_a_refused_sample_is_dropped_not_retried(http: Http, worker: Worker) -> None:
    """A sample the receiver refuses (400) is logged and dropped; the next ones go on."""
    base = str(http.make_url("/api/perf"))
    rec = Recorder(bad_first=True)
    stop = asyncio.Event()
    with capture_logs() as logs:
        agent = asyncio.create_task(run_agent("odd-1", base, 0.1, stop, sampler=rec))

        async def published() -> int:
            return len(_published(logs))

        await eventually(published, lambda n: n >= 3)
        stats = await _run(agent, stop)
    assert stats.rejected == 1
    refused = [e for e in logs if "dropping the sample" in e["event"]]
    assert len(refused) == 1 and "HTTP 400" in refused[0]["event"]
    assert refused[0]["log_level"] == "error"


async def test_the_agent_stops_promptly_while_the_receiver_is_down() -> None:
    base = f"http://127.0.0.1:{_free_port()}/api/perf"
    stop = asyncio.Event()
    rec = Recorder()
    with capture_logs() as logs:
        agent = asyncio.create_task(
            run_agent("h", base, 0.05, stop, sampler=rec, buffer_size=3, backoff=(10, 10))
        )

        async def sampled() -> int:
            return len(rec.samples)

        await eventually(sampled, lambda n: n >= 6)
        started = time.monotonic()
        stats = await _run(agent, stop)
    assert time.monotonic() - started < 1
    assert stats.published == 0 and stats.unsent == 4  # the one being retried + 3 buffered
    assert stats.sampled == stats.unsent + stats.dropped
    assert logs[-1]["event"].startswith("Stopped: 0 samples published, 4 unsent")


def test_agent_arguments_are_checked() -> None:
    stop = asyncio.Event()
    for args, flag in (
        (("", "http://x/api/perf", 1.0), "--this-host"),
        (("h", "ftp://x/api/perf", 1.0), "--publish"),
        (("h", "localhost:8080", 1.0), "--publish"),
        (("h", "http://x/api/perf", 0.0), "--interval"),
    ):
        with pytest.raises(ConfigError, match=flag):
            asyncio.run(run_agent(*args, stop))


def test_urls_and_the_psutil_sampler() -> None:
    assert (
        sample_url("http://r:8080/api/perf/", "a b/c", 17) == "http://r:8080/api/perf/a%20b%2Fc/17"
    )
    epoch, values = gather_stats()
    assert abs(epoch - time.time()) < 5
    assert set(values) == {"cpu", "mem"}
    assert all(0 <= v <= 100 for v in values.values())
