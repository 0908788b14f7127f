"""Operator tools: backfill, dead-letter replay, long dedup - each exactly once."""

import asyncio
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client

from kloudmeter_py.config import Settings
from kloudmeter_py.store import backfill, deadletters
from kloudmeter_py.store.layout import Layout
from kloudmeter_py.store.provision import provision
from kloudmeter_py.worker import Worker
from tests.conftest import eventually
from tests.helpers import Http, create_meter, post_event, publish_event, readings, total_count


async def test_backfill_counts_events_stored_before_the_meter_once(
    http: Http, nc: Client, worker: Worker, settings: Settings
) -> None:
    """Events before a meter's creation are counted by a backfill; twice changes nothing, and
    the other meters are untouched."""
    await create_meter(http, id="early", eventType="t", aggregation="sum", valueProperty="$.v")
    for i in range(40):
        await post_event(http, id=f"b{i}", eventType="t", subject=f"s{i % 4}", data={"v": i})
    await eventually(lambda: readings(http, meter="early"), lambda rs: total_count(rs) == 40)
    await create_meter(http, id="late", eventType="t", aggregation="sum", valueProperty="$.v")
    await post_event(http, id="after", eventType="t", subject="s0", data={"v": 1000})
    await eventually(lambda: readings(http, meter="late"), lambda rs: total_count(rs) == 1)
    layout = Layout(settings)
    for _ in range(2):
        meter, expected = await backfill.start(nc.jetstream(), layout, "late")
        assert (meter.startSeq, expected) == (0, 41)
        rs = await eventually(
            lambda: readings(http, meter="late"), lambda rs: total_count(rs) >= 41
        )
        assert total_count(rs) == 41 and sum(r["value"] for r in rs) == sum(range(40)) + 1000
    early = await readings(http, meter="early")
    assert total_count(early) == 41 and sum(r["value"] for r in early) == sum(range(40)) + 1000


async def test_backfill_from_a_time_and_through_the_cli(
    http: Http, nc: Client, worker: Worker, settings: Settings
) -> None:
    """`kloudmeter backfill --meter M --from T` counts only events stored from T on."""
    for i in range(5):
        await post_event(http, id=f"old{i}", eventType="t", subject="s")
    info = await nc.jetstream().stream_info("meters")
    old_last = info.state.last_seq
    cut = datetime.now(UTC)
    await eventually(
        lambda: nc.jetstream().get_msg("meters", old_last), lambda m: m.time is not None
    )
    for i in range(3):
        await post_event(http, id=f"new{i}", eventType="t", subject="s")
    await create_meter(http, id="m", eventType="t", aggregation="count")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kloudmeter_py",
        "--log-level",
        "warning",
        "backfill",
        "--meter",
        "m",
        "--from",
        cut.isoformat(),
        "--nats-url",
        settings.nats_url,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert "3 events" in err.decode() and "backfill done" in err.decode()
    rs = await readings(http, meter="m")
    assert total_count(rs) == 3


@pytest.fixture
async def strict_worker(nc: Client, settings: Settings) -> AsyncIterator[Worker]:
    """A worker whose unique meters keep at most 3 distinct values."""
    w = Worker(nc, msgspec.structs.replace(settings, unique_limit=3))
    await w.start()
    yield w
    await w.stop()


async def test_dead_letter_replay_applies_each_letter_once(
    http: Http, nc: Client, strict_worker: Worker, settings: Settings
) -> None:
    """Events refused by a limit are replayed after raising it; a second replay and a repeated
    write change nothing; letters that still fail stay."""
    await create_meter(http, id="users", eventType="t", aggregation="unique", valueProperty="$.u")
    await create_meter(http, id="bytes", eventType="t", aggregation="sum", valueProperty="$.b")
    for i in range(6):
        await post_event(
            http, id=f"u{i}", eventType="t", subject="s", data={"u": f"user{i}", "b": 1}
        )
    await post_event(http, id="bad", eventType="t", subject="s", data={"u": "user0", "b": "x"})
    js = nc.jetstream()
    layout = Layout(settings)
    await eventually(lambda: deadletters.counts(js, layout), lambda c: c["total"] == 4)
    rs = await readings(http, meter="users")
    assert rs[0]["value"] == 3
    resp = await http.get("/api/dead-letters/list", params={"meter": "users"})
    letters = await resp.json()
    assert [x["event"]["data"]["u"] for x in letters] == ["user3", "user4", "user5"]
    assert "distinct values" in letters[0]["reason"]

    # A crash between the reading write and the letter's deletion: the write is repeated.
    meters = {m["id"]: m for m in await (await http.get("/api/meters")).json()}
    meter = msgspec.convert(meters["users"], deadletters.Meter)
    letter = msgspec.convert(letters[0], deadletters.DeadLetter)
    kv = await js.key_value("readings")
    assert await deadletters._apply(js, kv, meter, letter, 100) == "applied"
    assert await deadletters._apply(js, kv, meter, letter, 100) == "already"

    report = await deadletters.replay(js, layout, unique_limit=100)
    assert (report.replayed, report.alreadyApplied, len(report.stillFailing)) == (2, 1, 1)
    assert "x" in report.stillFailing[0]["reason"]
    rs = await readings(http, meter="users")
    assert rs[0]["value"] == 6 and rs[0]["count"] == 7
    again = await deadletters.replay(js, layout, unique_limit=100)
    assert (again.replayed, again.alreadyApplied, len(again.stillFailing)) == (0, 0, 1)
    assert (await readings(http, meter="users"))[0]["value"] == 6
    # The worker never counts a replayed event a second time, even if it reads it again.
    await post_event(http, id="u-next", eventType="t", subject="s", data={"u": "user0", "b": 1})
    rs = await eventually(lambda: readings(http, meter="users"), lambda rs: rs[0]["count"] == 8)
    assert rs[0]["value"] == 6
    counts = (await (await http.get("/api/dead-letters")).json())["byMeter"]
    assert counts == {"bytes": 1}


async def test_long_dedup_drops_a_repeated_id_after_the_stream_window(
    nc: Client, settings: Settings, http: Http
) -> None:
    """With METER_DEDUP_HORIZON, an id stored twice in the stream (here: published without
    Nats-Msg-Id, as a careless producer would) is counted once, even on replay."""
    long = msgspec.structs.replace(settings, dedup_horizon=3600)
    await provision(nc.jetstream(), long)
    await create_meter(http, id="m", eventType="t", aggregation="count")
    w = Worker(nc, long)
    await w.start()
    try:
        js = nc.jetstream()
        body: dict[str, Any] = {"id": "same", "eventType": "t", "subject": "s"}
        for _ in range(3):
            await js.publish("meters.events.t.s", msgspec.json.encode(body))
        await publish_event(nc, id="other", eventType="t", subject="s")
        await eventually(lambda: _stats(w), lambda s: s >= 4)
        rs = await readings(http, meter="m")
        assert total_count(rs) == 2 and w.stats.deduplicated == 2
    finally:
        await w.stop()


async def _stats(w: Worker) -> int:
    return w.stats.events
