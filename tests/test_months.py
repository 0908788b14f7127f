"""MONTH windows: calendar months in the query's time zone (DST, Jan 31 -> Feb, leap years),
covered by day summaries with finer ones at a boundary that needs them; and, against a real
server, MONTH answers equal to totals computed from the events sent."""

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from kloudmeter_py.config import Settings
from kloudmeter_py.core.models import Meter
from kloudmeter_py.core.query import MAX_WINDOWS, Query, build_query, plan
from kloudmeter_py.core.windows import DAY, HOUR, MONTH, QueryError, output_windows
from kloudmeter_py.store.server import NatsServer
from kloudmeter_py.worker import Worker
from tests.helpers import Http, create_meter
from tests.months import (
    SUBJECTS,
    UTC_ZONE,
    answered_months,
    expected_months,
    iso,
    meters_with_events,
    month_events,
    month_start,
    utc,
)

# zone, from, to (UTC), expected windows as (start in UTC, hours long)
MONTH_TABLE = [
    (  # Jan 31 -> Feb 1, not Feb 31; a range clips its first and last month
        "UTC",
        "2026-01-15T00:00:00Z",
        "2026-04-10T00:00:00Z",
        [
            ("2026-01-15T00:00:00Z", 17 * 24),
            ("2026-02-01T00:00:00Z", 28 * 24),
            ("2026-03-01T00:00:00Z", 31 * 24),
            ("2026-04-01T00:00:00Z", 9 * 24),
        ],
    ),
    (  # leap years: 2024 and 2000 have Feb 29; 2100 (divisible by 100, not 400) does not
        "UTC",
        "2024-02-01T00:00:00Z",
        "2024-03-01T00:00:00Z",
        [("2024-02-01T00:00:00Z", 29 * 24)],
    ),
    ("UTC", "2000-02-01T00:00:00Z", "2000-03-01T00:00:00Z", [("2000-02-01T00:00:00Z", 29 * 24)]),
    ("UTC", "2100-02-01T00:00:00Z", "2100-03-01T00:00:00Z", [("2100-02-01T00:00:00Z", 28 * 24)]),
    (  # December -> January of the next year
        "UTC",
        "2026-12-01T00:00:00Z",
        "2027-02-01T00:00:00Z",
        [("2026-12-01T00:00:00Z", 31 * 24), ("2027-01-01T00:00:00Z", 31 * 24)],
    ),
    (  # Berlin: March loses an hour, October gains one; months start at local midnight
        "Europe/Berlin",
        "2026-02-28T23:00:00Z",
        "2026-04-30T22:00:00Z",
        [("2026-02-28T23:00:00Z", 31 * 24 - 1), ("2026-03-31T22:00:00Z", 30 * 24)],
    ),
    (
        "Europe/Berlin",
        "2026-09-30T22:00:00Z",
        "2026-11-30T23:00:00Z",
        [("2026-09-30T22:00:00Z", 31 * 24 + 1), ("2026-10-31T23:00:00Z", 30 * 24)],
    ),
    (  # a range that starts mid-month in Berlin: the first window starts at from
        "Europe/Berlin",
        "2026-10-15T00:00:00Z",
        "2026-11-01T00:00:00Z",
        [("2026-10-15T00:00:00Z", 16 * 24 + 23), ("2026-10-31T23:00:00Z", 1)],
    ),
    (  # southern hemisphere: Sydney leaves DST in April, enters it in October
        "Australia/Sydney",
        "2026-03-31T13:00:00Z",
        "2026-05-31T14:00:00Z",
        [("2026-03-31T13:00:00Z", 30 * 24 + 1), ("2026-04-30T14:00:00Z", 31 * 24)],
    ),
    (  # a half-hour offset: months start at 18:30 UTC
        "Asia/Kolkata",
        "2026-01-31T18:30:00Z",
        "2026-03-31T18:30:00Z",
        [("2026-01-31T18:30:00Z", 28 * 24), ("2026-02-28T18:30:00Z", 31 * 24)],
    ),
    (  # Asuncion skipped midnight on 2023-10-01: October starts at 01:00 -03, after the gap
        "America/Asuncion",
        "2023-09-01T04:00:00Z",
        "2023-11-01T03:00:00Z",
        [("2023-09-01T04:00:00Z", 30 * 24), ("2023-10-01T04:00:00Z", 31 * 24 - 1)],
    ),
]


@pytest.mark.parametrize(("zone", "start", "end", "expected"), MONTH_TABLE)
def test_month_windows_are_calendar_months_in_the_zone(
    zone: str, start: str, end: str, expected: list[tuple[str, int]]
) -> None:
    """Each window is a calendar month in the zone (clipped to the range), whatever its length."""
    got = output_windows(utc(start), utc(end), MONTH, ZoneInfo(zone), 60)
    assert [(iso(a), (b - a).total_seconds() / 3600) for a, b in got] == expected


@pytest.mark.parametrize(
    "zone", ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "America/Asuncion"]
)
def test_every_month_starts_at_the_first_instant_of_its_first_day(zone: str) -> None:
    """Ten years of months: contiguous, each starting at the zone's first instant of day 1
    (after a gap when midnight is skipped), 28 to 31 days long give or take DST."""
    tz = ZoneInfo(zone)
    windows = output_windows(
        utc("2020-01-01T00:00:00Z"), utc("2030-01-01T00:00:00Z"), MONTH, tz, 60
    )
    for (_, end), (start, _) in itertools.pairwise(windows):
        assert end == start
    for start, end in windows[1:-1]:
        local = start.astimezone(tz)
        assert local.day == 1 and local.hour <= 1, (zone, local)
        assert (start - timedelta(seconds=1)).astimezone(tz).day != 1, (zone, local)
        assert 28 * 24 - 2 <= (end - start).total_seconds() / 3600 <= 31 * 24 + 2


def _query(start: str, end: str, zone: str = "UTC", size: str | None = MONTH) -> Query:
    return Query(start=utc(start), end=utc(end), window_size=size, tz=ZoneInfo(zone))


def test_a_utc_month_is_read_from_day_summaries_alone() -> None:
    """February 2026 in UTC: its 28 day windows feed one output window."""
    windows, feeds = plan(
        _query("2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z"),
        60,
        dict.fromkeys(("minute", HOUR, DAY), 0),
    )
    assert len(windows) == 1
    assert sorted(feeds) == [
        (DAY, int(utc(f"2026-02-{d:02d}T00:00:00Z").timestamp())) for d in range(1, 29)
    ]
    assert set(feeds.values()) == {0}


def test_a_month_in_a_zone_uses_hours_at_its_boundaries() -> None:
    """October 2026 in Berlin, 22:00 Sep 30 to 23:00 Oct 31 UTC: two hours, 30 days, 23 hours."""
    windows, feeds = plan(
        _query("2026-09-30T22:00:00Z", "2026-10-31T23:00:00Z", "Europe/Berlin"),
        60,
        dict.fromkeys(("minute", HOUR, DAY), 0),
    )
    levels = sorted(level for level, _ in feeds)
    assert levels.count(DAY) == 30 and levels.count(HOUR) == 2 + 23 and len(levels) == 55
    assert len(windows) == 1


def test_a_month_whose_boundary_hours_expired_is_refused_not_wrong() -> None:
    """A Berlin month needs hour summaries at its edges; with those expired (and the days
    kept) the answer would be wrong, so it is a 400 naming windowTimeZone. A UTC month of
    the same time needs no hours and is answered."""
    expired_hours = {"minute": 2 * 10**9, HOUR: 2 * 10**9, DAY: 0}
    with pytest.raises(QueryError) as err:
        plan(
            _query("2026-09-30T22:00:00Z", "2026-10-31T23:00:00Z", "Europe/Berlin"),
            60,
            expired_hours,
        )
    assert err.value.field == "windowTimeZone"
    _, feeds = plan(_query("2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z"), 60, expired_hours)
    assert {level for level, _ in feeds} == {DAY}
    # Days expired as well: nothing is stored there, so nothing is read and nothing refused.
    gone = dict.fromkeys(("minute", HOUR, DAY), 2 * 10**9)
    assert plan(_query("2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z"), 60, gone)[1] == {}


METER = Meter(
    id="m", eventType="t", aggregation="count", createdAt=datetime(2026, 1, 1, tzinfo=UTC)
)


def _build(**kw: Any) -> Query:
    args: dict[str, Any] = {
        "start": "2026-01-01T00:00:00Z",
        "end": "2026-07-01T00:00:00Z",
        "window_size": "month",
        "tz": None,
        "subjects": [],
        "group_by": [],
        "filter_group_by": {},
        "interval": 60,
        "now": datetime(2026, 12, 1, tzinfo=UTC),
        "day_retention_days": 400,
    }
    return build_query(METER, **{**args, **kw})


def test_month_is_a_window_size_in_any_case() -> None:
    """MONTH, month and Month ask for calendar months."""
    for spelling in ("MONTH", "month", "Month"):
        assert _build(window_size=spelling).window_size == MONTH


def test_month_errors_name_their_parameter() -> None:
    """A window size that is not one of the four names the field and lists MONTH; too many
    months are refused like too many days."""
    with pytest.raises(QueryError, match="MINUTE, HOUR, DAY or MONTH") as err:
        _build(window_size="MONTHLY")
    assert err.value.field == "windowSize"
    years = MAX_WINDOWS // 12 + 10
    with pytest.raises(QueryError) as err:
        _build(start="0100-01-01T00:00:00Z", end=f"{100 + years:04d}-01-01T00:00:00Z")
    assert err.value.field == "from"


def test_months_up_to_year_9999_end_with_the_range() -> None:
    """The last month of the calendar has no next month; the range's end closes it."""
    got = output_windows(
        utc("9999-11-01T00:00:00Z"), utc("9999-12-31T00:00:00Z"), MONTH, UTC_ZONE, 60
    )
    assert [iso(b) for _, b in got] == ["9999-12-01T00:00:00Z", "9999-12-31T00:00:00Z"]


# -- against a real server ------------------------------------------------------------------


@pytest.fixture
def settings(nats_server: NatsServer) -> Settings:
    # Hours kept as long as days: a month in a zone needs them at its boundaries.
    return Settings(
        nats_url=nats_server.url,
        partitions=2,
        hour_retention=400 * 86400,
        summary_flush_ms=0,
    )


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin", "America/New_York"])
async def test_month_answers_equal_totals_from_the_events(
    http: Http, worker: Worker, zone: str
) -> None:
    """MONTH by subject and region, in three zones, on both query APIs: each month's sum and
    count equal what the events sent add up to in that zone's calendar."""
    now = datetime.now(UTC)
    events = await meters_with_events(http, now)
    tz = ZoneInfo(zone)
    span = {"from": iso(month_start(now, tz, 5)), "to": iso(month_start(now, tz))}
    in_span = [e for e in events if span["from"] <= e["time"] < span["to"]]
    params = [("windowSize", "MONTH"), ("windowTimeZone", zone), *span.items()]
    expected = expected_months(in_span, tz, by_subject=True, by_region=True)
    assert len({key[:2] for key in expected}) == 5  # five months, each with data
    subjects = [("subject", s) for s in SUBJECTS]
    for meter, pick in (("usage", 0), ("calls", 1)):
        resp = await http.get(
            f"/api/meters/{meter}/query", params=[*params, *subjects, ("groupBy", "region")]
        )
        body = await resp.json()
        assert resp.status == 200, body
        assert body["windowSize"] == "MONTH" and body["windowTimeZone"] == zone
        got = answered_months(body["data"], tz, "region")
        assert got == {k: v[pick] for k, v in expected.items()}
    # OpenMeter's API: groupBy=subject splits by subject; no group: one row per month.
    resp = await http.get("/api/v1/meters/usage/query", params=[*params, ("groupBy", "subject")])
    body = await resp.json()
    assert resp.status == 200, body
    assert body["windowSize"] == "MONTH"
    by_subject = expected_months(in_span, tz, by_subject=True, by_region=False)
    assert answered_months(body["data"], tz, None) == {k: v[0] for k, v in by_subject.items()}
    resp = await http.post(
        "/api/v1/meters/calls/query",
        json={"windowSize": "MONTH", "windowTimeZone": zone, **span},
    )
    totals = expected_months(in_span, tz, by_subject=False, by_region=False)
    assert answered_months((await resp.json())["data"], tz, None) == {
        k: v[1] for k, v in totals.items()
    }


async def test_a_bad_window_size_names_the_parameter(http: Http, worker: Worker) -> None:
    """windowSize=MONTHLY is a 400 naming windowSize, on both query APIs."""
    await create_meter(http, id="m", eventType="t", aggregation="count")
    resp = await http.get("/api/meters/m/query", params={"windowSize": "MONTHLY"})
    assert resp.status == 400
    body = await resp.json()
    assert body["field"] == "windowSize" and "MONTH" in body["message"]
    resp = await http.get("/api/v1/meters/m/query", params={"windowSize": "MONTHLY"})
    assert resp.status == 400
    assert (await resp.json())["field"] == "windowSize"


def test_month_events_straddle_the_zone_boundaries() -> None:
    """The events straddle the boundaries they are meant to: some are in different months in
    UTC and in Berlin (else the zone would not be tested)."""
    events = month_events(datetime.now(UTC))
    berlin = ZoneInfo("Europe/Berlin")
    differ = [e for e in events if utc(e["time"]).astimezone(berlin).month != utc(e["time"]).month]
    assert len(differ) >= 5
