"""Meter-wide rollups: the partition a subject's events land in, and rollup keys that sum the
partition's subjects exactly, read by queries that do not split by subject."""

import random
import string
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client

from kloudmeter_py.config import Settings
from kloudmeter_py.core.keys import encode_token, subject_partition
from kloudmeter_py.store.kv import read, scan
from kloudmeter_py.store.layout import Layout
from kloudmeter_py.store.meters import MeterStore
from kloudmeter_py.store.migrate import NO_ROLLUP_KEY
from kloudmeter_py.store.provision import provision
from kloudmeter_py.store.server import NatsServer
from kloudmeter_py.worker import Worker
from tests.helpers import Http, publish_event
from tests.months import (
    answered_months,
    expected_months,
    iso,
    meters_with_events,
    month_start,
    utc,
)


@pytest.mark.parametrize("partitions", [2, 7])
async def test_subject_partition_is_the_servers(
    nc: Client, settings: Settings, partitions: int
) -> None:
    """core.keys.subject_partition agrees with the stream's partition transform for plain,
    encoded and unicode subjects."""
    s = Settings(nats_url=settings.nats_url, stream=f"p{partitions}", partitions=partitions)
    js = nc.jetstream()
    await provision(js, s)
    rng = random.Random(partitions)
    subjects = ["", "a", "customer-1", "x.y z", "Zürich", "*", ">"] + [
        "".join(rng.choices(string.ascii_letters + string.digits + "-_. é", k=rng.randint(1, 24)))
        for _ in range(150)
    ]
    for i, subject in enumerate(subjects):
        await publish_event(nc, stream=s.stream, id=f"e{i}", eventType="t", subject=subject)
    layout = Layout(s)
    msgs = await read(js, layout.stream, f"{layout.stream}.events.>")
    assert len(msgs) == len(subjects)
    seen = {int(m.subject.split(".")[2]) for m in msgs}
    assert len(seen) > 1
    for msg in msgs:
        token = msg.subject.split(".", 4)[4]
        subject = next(x for x in subjects if encode_token(x) == token)
        assert subject_partition(subject, partitions) == int(msg.subject.split(".")[2]), subject


@pytest.fixture
def settings(nats_server: NatsServer) -> Settings:
    # Hours kept as long as days (months at a zone's boundary need them); three partitions.
    return Settings(
        nats_url=nats_server.url, partitions=3, hour_retention=400 * 86400, summary_flush_ms=0
    )


async def test_meter_wide_reads_come_from_rollups_equal_to_the_events(
    http: Http, nc: Client, settings: Settings, worker: Worker
) -> None:
    """A query that does not split by subject reads the partitions' rollups, and its months
    (by region, and in all) equal totals computed from the events; a meter listed as older
    than rollups reads its subjects' pages instead; deleting a meter removes its rollups."""
    now = datetime.now(UTC)
    events = await meters_with_events(http, now)
    span = {"from": iso(month_start(now, UTC, 5)), "to": iso(month_start(now, UTC))}
    in_span = [e for e in events if span["from"] <= e["time"] < span["to"]]
    params = {"windowSize": "MONTH", **span}

    async def months(meter: str, group: str | None) -> dict[tuple[Any, ...], Any]:
        extra = {"groupBy": group} if group else {}
        resp = await http.get(f"/api/meters/{meter}/query", params={**params, **extra})
        body = await resp.json()
        assert resp.status == 200, body
        return answered_months(body["data"], UTC, group)

    # DAY and HOUR windows meter-wide, from the rollups, equal the events' sums per window.
    for size, width in (("DAY", 86400), ("HOUR", 3600)):
        resp = await http.get(
            "/api/meters/usage/query", params={**span, "windowSize": size, "groupBy": "region"}
        )
        body = await resp.json()
        assert resp.status == 200, body
        got = {
            (int(utc(r["windowStart"]).timestamp()), r["groupBy"]["region"]): r["value"]
            for r in body["data"]
        }
        want: dict[tuple[int, str], int] = {}
        for e in in_span:
            at = int(utc(e["time"]).timestamp())
            k = (at - at % width, e["data"]["region"])
            want[k] = want.get(k, 0) + e["data"]["v"]
        assert got == want, size

    by_region = expected_months(in_span, UTC, by_subject=False, by_region=True)
    totals = expected_months(in_span, UTC, by_subject=False, by_region=False)
    assert await months("usage", "region") == {k: v[0] for k, v in by_region.items()}
    assert await months("calls", None) == {k: v[1] for k, v in totals.items()}

    # The rollups as a `nats kv ls summaries_day` shows them: one series per partition and
    # region, beside the subjects' pages.
    js = nc.jetstream()
    day_keys = [k for k, _ in await scan(js, "summaries_day", "calls/all.>")]
    assert {k.split(".")[1] for k in day_keys} <= {"0", "1", "2"}
    assert {k.split(".")[2] for k in day_keys} == {"eu", "us"}

    # Without its rollups, the meter-wide read of a meter that has them finds nothing (so it
    # did read them); listed as older than rollups, the same meter reads its pages.
    for bucket in ("summaries_minute", "summaries_hour", "summaries_day"):
        await js.purge_stream(f"KV_{bucket}", subject=f"$KV.{bucket}.calls/all.>")
    assert await months("calls", None) == {}
    calls = await MeterStore(js, Layout(settings)).get("calls")
    offsets = await js.key_value("offsets")
    await offsets.put(NO_ROLLUP_KEY, msgspec.json.encode([["calls", calls.startSeq]]))
    assert await months("calls", None) == {k: v[1] for k, v in totals.items()}

    resp = await http.delete("/api/v1/meters/usage")
    assert resp.status in (200, 204), await resp.text()
    assert await scan(js, "summaries_day", "usage/all.>") == []
