"""Time windows: boundaries, time zones with DST, late events, merges, expiry, the query API."""

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp.test_utils import TestClient, TestServer
from nats.aio.client import Client

from kloudmeter_py.config import Settings
from kloudmeter_py.core.summaries import decode_page
from kloudmeter_py.core.windows import QueryError, cover, output_windows, widths
from kloudmeter_py.gateway import create_app
from kloudmeter_py.store.kv import scan
from kloudmeter_py.store.provision import provision
from kloudmeter_py.worker import Worker
from tests.conftest import eventually
from tests.helpers import Http, create_meter, post_event, readings, total_count

BERLIN = ZoneInfo("Europe/Berlin")


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def test_day_windows_follow_dst_in_the_zone() -> None:
    """A Berlin day is 25 hours when DST ends and 23 when it starts."""
    start = datetime(2026, 10, 24, 22, tzinfo=UTC)
    end = datetime(2026, 10, 26, 23, tzinfo=UTC)
    days = output_windows(start, end, "day", BERLIN, 60)
    assert [(a.isoformat(), (b - a).total_seconds() / 3600) for a, b in days] == [
        ("2026-10-24T22:00:00+00:00", 25.0),
        ("2026-10-25T23:00:00+00:00", 24.0),
    ]
    spring = output_windows(
        datetime(2026, 3, 28, 23, tzinfo=UTC),
        datetime(2026, 3, 29, 22, tzinfo=UTC),
        "day",
        BERLIN,
        60,
    )
    assert [(b - a).total_seconds() / 3600 for a, b in spring] == [23.0]


def test_days_in_a_zone_that_skips_midnight_move_past_the_gap() -> None:
    """Santiago skips 2026-09-06 00:00: that day starts at 01:00 -03 and is 23 hours long.
    (It used to resolve to 23:00 the day before, and the window loop stopped advancing:
    such a query hung the gateway.)"""
    tz = ZoneInfo("America/Santiago")
    start, end = datetime(2026, 9, 5, 4, tzinfo=UTC), datetime(2026, 9, 7, 3, tzinfo=UTC)
    days = output_windows(start, end, "day", tz, 60)
    assert [(_iso(a), (b - a).total_seconds() / 3600) for a, b in days] == [
        ("2026-09-05T04:00:00Z", 24.0),
        ("2026-09-06T04:00:00Z", 23.0),
    ]


def test_cover_uses_coarse_windows_and_finer_ones_at_the_edges() -> None:
    """[10:30, next day 01:00) is 30 minute windows, 13 hours... no: hours up to midnight, a
    day would not fit, then an hour."""
    w = widths(60)
    start = int(datetime(2026, 11, 20, 22, 30, tzinfo=UTC).timestamp())
    end = int(datetime(2026, 11, 22, 1, 0, tzinfo=UTC).timestamp())
    alive = {"minute": 0, "hour": 0, "day": 0}
    got = list(cover(start, end, w, alive))
    levels = [lv for lv, _ in got]
    assert levels == ["minute"] * 30 + ["hour"] + ["day"] + ["hour"]
    assert sum(w[lv] for lv in levels) == end - start


def test_cover_refuses_what_only_expired_summaries_could_answer() -> None:
    """A Berlin day needs hours; with hours expired the answer would be wrong, so it errors."""
    w = widths(60)
    start = int(datetime(2026, 10, 24, 22, tzinfo=UTC).timestamp())
    end = start + 25 * 3600
    far_future = end + 10**6
    with pytest.raises(QueryError) as err:
        list(cover(start, end, w, {"minute": far_future, "hour": far_future, "day": 0}, "day"))
    assert err.value.field == "windowTimeZone"
    # Minute windows that have expired simply hold no data.
    assert (
        list(cover(start, start + 120, w, {"minute": far_future, "hour": 0, "day": 0}, "minute"))
        == []
    )


@pytest.fixture
def long_settings(nats_server: Any) -> Settings:
    return Settings(
        nats_url=nats_server.url, partitions=2, hour_retention=400 * 86400, summary_flush_ms=0
    )


@pytest.fixture
async def stack(long_settings: Settings) -> AsyncIterator[tuple[Client, Http]]:
    import nats

    nc = await nats.connect(long_settings.nats_url)
    await provision(nc.jetstream(), long_settings)
    worker = Worker(nc, long_settings)
    await worker.start()
    async with TestClient(TestServer(create_app(long_settings, nc))) as client:
        yield nc, client
    await worker.stop()
    await nc.close()


async def _query(http: Http, meter: str, **params: Any) -> dict[str, Any]:
    resp = await http.get(f"/api/meters/{meter}/query", params=params)
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


def _hour_ago() -> datetime:
    now = datetime.now(UTC)
    return now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)


async def test_window_boundaries_are_half_open(stack: tuple[Client, Http]) -> None:
    """An event at exactly 10:01:00 is in [10:01, 10:02), one a millisecond earlier is not."""
    _, http = stack
    base = _hour_ago()
    await create_meter(http, id="m", eventType="t", aggregation="count")
    for i, t in enumerate(
        [base, base + timedelta(seconds=59, milliseconds=999), base + timedelta(minutes=1)]
    ):
        await post_event(http, id=f"e{i}", eventType="t", subject="s", time=_iso(t))
    await eventually(lambda: readings(http, meter="m"), lambda rs: total_count(rs) == 3)
    body = await _query(
        http,
        "m",
        windowSize="MINUTE",
        **{"from": _iso(base), "to": _iso(base + timedelta(hours=1))},
    )
    assert [(r["windowStart"], r["value"]) for r in body["data"]] == [
        (_iso(base), 2),
        (_iso(base + timedelta(minutes=1)), 1),
    ]
    body = await _query(
        http,
        "m",
        **{"from": _iso(base + timedelta(minutes=1)), "to": _iso(base + timedelta(minutes=2))},
    )
    assert [r["value"] for r in body["data"]] == [1]
    assert body["windowSize"] is None


AGG_VALUES = [5, 1, 9, 3, 7, 1]


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        ("count", 6),
        ("sum", 26),
        ("avg", 26 / 6),
        ("min", 1),
        ("max", 9),
        ("unique", 5),
        ("latest", 1),
    ],
)
async def test_every_aggregation_merges_across_windows(
    stack: tuple[Client, Http], aggregation: str, expected: float
) -> None:
    """Values spread over minutes, merged into an hour and into a total that mixes minute and
    hour windows, equal the hand-computed figure (avg is not an average of averages)."""
    _, http = stack
    base = _hour_ago()
    body: dict[str, Any] = {"id": "m", "eventType": "t", "aggregation": aggregation}
    if aggregation != "count":
        body["valueProperty"] = "$.v"
    await create_meter(http, **body)
    for i, v in enumerate(AGG_VALUES):
        t = base + timedelta(minutes=7 * i, seconds=i)
        await post_event(http, id=f"a{i}", eventType="t", subject="s", time=_iso(t), data={"v": v})
    await eventually(lambda: readings(http, meter="m"), lambda rs: total_count(rs) == 6)
    hour = await _query(
        http, "m", windowSize="HOUR", **{"from": _iso(base), "to": _iso(base + timedelta(hours=1))}
    )
    assert [r["value"] for r in hour["data"]] == [pytest.approx(expected)]
    mixed = await _query(
        http,
        "m",
        **{"from": _iso(base), "to": _iso(base + timedelta(minutes=150))},
    )
    assert [r["value"] for r in mixed["data"]] == [pytest.approx(expected)]
    minutes = await _query(
        http,
        "m",
        windowSize="MINUTE",
        **{"from": _iso(base), "to": _iso(base + timedelta(hours=1))},
    )
    assert len(minutes["data"]) == 6


async def test_days_in_a_dst_zone_are_built_from_hours(stack: tuple[Client, Http]) -> None:
    """Berlin days around the October DST change differ from UTC days, correctly."""
    _, http = stack
    await create_meter(http, id="m", eventType="t", aggregation="sum", valueProperty="$.v")
    events = [
        ("2026-10-24T22:30:00Z", 1),  # Oct 25 00:30 CEST: Berlin Oct 25, UTC Oct 24
        ("2026-10-25T12:00:00Z", 10),  # both Oct 25
        ("2026-10-25T23:30:00Z", 100),  # Oct 26 00:30 CET: Berlin Oct 26, UTC Oct 25
    ]
    for i, (t, v) in enumerate(events):
        await post_event(http, id=f"d{i}", eventType="t", subject="s", time=t, data={"v": v})
    await eventually(lambda: readings(http, meter="m"), lambda rs: total_count(rs) == 3)
    span = {"from": "2026-10-24T00:00:00Z", "to": "2026-10-27T00:00:00Z"}
    utc = await _query(http, "m", windowSize="DAY", **span)
    assert [(r["windowStart"], r["value"]) for r in utc["data"]] == [
        ("2026-10-24T00:00:00Z", 1),
        ("2026-10-25T00:00:00Z", 110),
    ]
    berlin_span = {"from": "2026-10-23T22:00:00Z", "to": "2026-10-26T23:00:00Z"}
    berlin = await _query(
        http, "m", windowSize="DAY", windowTimeZone="Europe/Berlin", **berlin_span
    )
    assert [(r["windowStart"], r["windowEnd"], r["value"]) for r in berlin["data"]] == [
        ("2026-10-24T22:00:00Z", "2026-10-25T23:00:00Z", 11),
        ("2026-10-25T23:00:00Z", "2026-10-26T23:00:00Z", 100),
    ]


async def test_subject_and_group_filters_split_and_select_rows(stack: tuple[Client, Http]) -> None:
    """subject splits rows by subject; groupBy splits by group; filterGroupBy selects."""
    _, http = stack
    base = _hour_ago()
    await create_meter(
        http,
        id="m",
        eventType="t",
        aggregation="sum",
        valueProperty="$.v",
        groupBy={"model": "$.model", "region": "$.region"},
    )
    rows = [
        ("a", "gpt", "eu", 1),
        ("a", "gpt", "us", 2),
        ("b", "gpt", "eu", 4),
        ("b", "llama", "eu", 8),
    ]
    for i, (subject, model, region, v) in enumerate(rows):
        await post_event(
            http,
            id=f"f{i}",
            eventType="t",
            subject=subject,
            time=_iso(base),
            data={"v": v, "model": model, "region": region},
        )
    await eventually(lambda: readings(http, meter="m"), lambda rs: total_count(rs) == 4)
    span = {"from": _iso(base), "to": _iso(base + timedelta(hours=1))}
    total = await _query(http, "m", **span)
    assert [(r["subject"], r["groupBy"], r["value"]) for r in total["data"]] == [(None, {}, 15)]
    resp = await http.get(
        "/api/meters/m/query",
        params=[("subject", "a"), ("subject", "b"), ("groupBy", "model"), *span.items()],
    )
    got = [(r["subject"], r["groupBy"], r["value"]) for r in (await resp.json())["data"]]
    assert got == [
        ("a", {"model": "gpt"}, 3),
        ("b", {"model": "gpt"}, 4),
        ("b", {"model": "llama"}, 8),
    ]
    resp = await http.get("/api/meters/m/query", params={"filterGroupBy[region]": "eu", **span})
    assert [r["value"] for r in (await resp.json())["data"]] == [13]
    resp = await http.post("/api/meters/m/query", json={"groupBy": ["region"], **span})
    assert {r["groupBy"]["region"]: r["value"] for r in (await resp.json())["data"]} == {
        "eu": 13,
        "us": 2,
    }


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"windowSize": "WEEK"}, "windowSize"),
        ({"windowTimeZone": "Mars/Olympus"}, "windowTimeZone"),
        ({"from": "yesterday"}, "from"),
        ({"from": "2026-11-22T10:00:30Z", "to": "2026-11-22T11:00:00Z"}, "from"),
        ({"from": "2026-11-22T11:00:00Z", "to": "2026-11-22T10:00:00Z"}, "from"),
        ({"groupBy": "colour"}, "groupBy"),
    ],
)
async def test_bad_queries_name_the_parameter(
    stack: tuple[Client, Http], params: dict[str, str], field: str
) -> None:
    """Each invalid query parameter answers 400 naming it."""
    _, http = stack
    await create_meter(http, id="m", eventType="t", aggregation="count")
    resp = await http.get("/api/meters/m/query", params=params)
    assert resp.status == 400
    assert (await resp.json())["field"] == field
    assert (await http.get("/api/meters/nope/query")).status == 404


async def test_an_event_too_old_for_every_summary_is_late_but_counted(
    http: Http, worker: Worker, nc: Client
) -> None:
    """An event older than every level's retention updates the reading and its late figure."""
    await create_meter(http, id="m", eventType="t", aggregation="count")
    old = datetime.now(UTC) - timedelta(days=500)
    await post_event(http, id="old", eventType="t", subject="s", time=_iso(old))
    await post_event(http, id="new", eventType="t", subject="s")
    rs = await eventually(lambda: readings(http, meter="m"), lambda rs: total_count(rs) == 2)
    assert rs[0]["late"] == 1
    days = await scan(nc.jetstream(), "summaries_day", "m.>")  # (not its rollup)
    assert [[w.count for w in decode_page(v).windows.values()] for _, v in days] == [[1]]


async def test_summaries_expire_by_themselves(nats_server: Any) -> None:
    """With a 1 s interval and 2 s minute retention, a minute summary disappears on its own,
    while the hour and day summaries stay."""
    import nats

    settings = Settings(nats_url=nats_server.url, partitions=1, interval=1, minute_retention=2)
    nc = await nats.connect(settings.nats_url)
    await provision(nc.jetstream(), settings)
    worker = Worker(nc, settings)
    await worker.start()
    try:
        async with TestClient(TestServer(create_app(settings, nc))) as http:
            await create_meter(http, id="m", eventType="t", aggregation="count")
            await post_event(http, id="x", eventType="t", subject="s")
            js = nc.jetstream()
            # (each level: the subject's page and the meter's rollup page)
            await eventually(lambda: scan(js, "summaries_minute"), lambda keys: len(keys) == 2)
            await eventually(
                lambda: scan(js, "summaries_minute"), lambda keys: keys == [], timeout=20
            )
            assert len(await scan(js, "summaries_hour")) == 2
            assert len(await scan(js, "summaries_day")) == 2
            assert total_count(await readings(http, meter="m")) == 1
    finally:
        await worker.stop()
        await nc.close()


async def test_a_listing_racing_an_expiry_returns_what_is_left(nats_server: Any) -> None:
    """A key counted when the listing starts and gone (expired, purged) before it is read:
    the listing ends with what is there instead of waiting out its timeout and failing."""
    import nats

    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        kv = await js.create_key_value(bucket="racing")
        await kv.put("a", b"1")
        add_consumer = js.add_consumer

        async def add_then_purge(stream: str, config: Any) -> Any:
            info = await add_consumer(stream, config)
            await js.purge_stream(stream)  # after the consumer counted the key
            return info

        js.add_consumer = add_then_purge  # type: ignore[method-assign]
        started = asyncio.get_running_loop().time()
        assert await scan(js, "racing") == []
        assert asyncio.get_running_loop().time() - started < 4  # not the 5 s fetch timeout
    finally:
        await nc.close()
