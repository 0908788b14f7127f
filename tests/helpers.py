"""Small helpers shared by the integration tests."""

from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp.test_utils import TestClient
from nats.aio.client import Client

from kloudmeter_py.core.keys import event_subject
from kloudmeter_py.core.meters import CompiledMeter
from kloudmeter_py.core.models import Meter

if TYPE_CHECKING:
    import aiohttp

Http = TestClient[Any, Any]


async def create_meter(http: Http, **body: Any) -> dict[str, Any]:
    resp = await http.post("/api/create-meter", json=body)
    assert resp.status == 201, await resp.text()
    out: dict[str, Any] = await resp.json()
    return out


async def post_event(http: Http, **body: Any) -> None:
    resp = await http.post("/api/register-event", json=body)
    assert resp.status == 202, await resp.text()


async def publish_event(nc: Client, stream: str = "meters", **body: Any) -> None:
    """Publish straight to the stream subject, as a NATS producer would."""
    subject = event_subject(stream, body["eventType"], body["subject"])
    await nc.jetstream().publish(
        subject, msgspec.json.encode(body), headers={"Nats-Msg-Id": body["id"]}
    )


async def readings(http: Http, **params: str) -> list[dict[str, Any]]:
    resp = await http.get("/api/readings", params=params)
    assert resp.status == 200, await resp.text()
    out: list[dict[str, Any]] = await resp.json()
    return out


def total_count(rs: list[dict[str, Any]]) -> int:
    return sum(r["count"] for r in rs)


async def lifecycle_folded(nc: Client, stream: str = "meters", timeout: float = 15.0) -> None:
    """Wait (polling, with a deadline) until the worker's lifecycle folding has written every
    stored event into the ``resources`` bucket: each lifecycle consumer has nothing pending or
    unacknowledged (events are acked after their KV write), no history read is running, and
    every duration meter's generation (and the usage summary) is marked read."""
    import asyncio
    import time

    from kloudmeter_py.core.lifecycle import marker_decoder, meter_marker_key, usage_marker_key
    from kloudmeter_py.core.models import meter_decoder
    from kloudmeter_py.store.kv import get_with_revision, scan
    from kloudmeter_py.worker.lifecycle import consumer_name

    js = nc.jetstream()
    prefix = "" if stream == "meters" else f"{stream}_"
    bucket = f"{prefix}resources"

    async def done() -> str | None:
        kv = await js.key_value(bucket)
        wanted = {"lifecycle"}  # the default usage event type
        needed = [usage_marker_key("lifecycle")]
        starts: dict[str, int] = {}
        for _, value in await scan(js, f"{prefix}meters"):
            meter = meter_decoder.decode(value)
            if meter.aggregation == "duration":
                wanted.add(meter.eventType)
                needed.append(meter_marker_key(meter.id))
                starts[meter_marker_key(meter.id)] = meter.startSeq
        for key in needed:
            raw, _ = await get_with_revision(kv, key)
            if raw is None or marker_decoder.decode(raw).startSeq != starts.get(key, 0):
                return f"marker {key}"
        infos = {c.name: c for c in await js.consumers_info(stream)}
        if any(name.startswith("lifecycle-read-") for name in infos):
            return "a history read is running"
        for event_type in wanted:
            info = infos.get(consumer_name(event_type))
            if info is None:
                return f"no consumer for {event_type}"
            if info.num_pending or info.num_ack_pending:
                return f"{event_type}: {info.num_pending} pending, {info.num_ack_pending} unacked"
        return None

    deadline = time.monotonic() + timeout
    while (why := await done()) is not None:
        if time.monotonic() > deadline:
            raise AssertionError(f"lifecycle state not folded within {timeout}s: {why}")
        await asyncio.sleep(0.05)


def compiled_meter(aggregation: str, **kw: Any) -> CompiledMeter:
    """A meter of event type "t" for the tables of core tests: id = the aggregation unless
    given, value ``$.v`` (none for count), ``groupBy``, ``startSeq``."""
    from datetime import UTC, datetime

    return CompiledMeter(
        Meter(
            id=kw.pop("id", aggregation),
            eventType="t",
            aggregation=aggregation,
            valueProperty=kw.pop("value", None if aggregation == "count" else "$.v"),
            groupBy=kw.pop("groupBy", {}),
            startSeq=kw.pop("startSeq", 0),
            createdAt=datetime(2025, 1, 1, tzinfo=UTC),
        )
    )


async def small_wide_bench(events: int = 2000, **kw: Any) -> dict[str, Any]:
    """``kloudmeter bench --shape wide``, small: 300 subjects on an embedded nats-server (so
    that disk and server CPU are known), short HTTP and lag phases; ``kw`` as bench.run's."""
    from kloudmeter_py import bench

    settings: dict[str, Any] = {
        "nats_url": None,
        "shape": "wide",
        "events_n": events,
        "subjects": 300,
        "http_seconds": 0.3,
        "lag_rate": 200,
        "lag_seconds": 0.3,
        "quiet": True,
    }
    results: dict[str, Any] = await bench.run(**{**settings, **kw})
    return results


async def until_serving(http: "aiohttp.ClientSession", base: str) -> None:
    """Wait (up to 30 s) until a `kloudmeter up` process at ``base`` answers /healthy."""
    import aiohttp

    from tests.conftest import eventually

    async def health() -> int:
        try:
            async with http.get(f"{base}/healthy") as r:
                return r.status
        except aiohttp.ClientError:
            return 0

    await eventually(health, lambda s: s == 200, timeout=30)


async def until_counted(
    http: "aiohttp.ClientSession", base: str, count: int, timeout: float = 15.0
) -> None:
    """Wait until the readings at ``base`` count ``count`` events in all."""
    from tests.conftest import eventually

    async def counted() -> int:
        async with http.get(f"{base}/api/readings") as r:
            return sum(x["count"] for x in await r.json())

    await eventually(counted, lambda c: c == count, timeout=timeout)
