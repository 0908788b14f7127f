"""Events around month boundaries, and their totals computed straight from the events: shared
by the MONTH and export tests."""

import random
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from tests.conftest import eventually
from tests.helpers import Http, total_count

UTC_ZONE = ZoneInfo("UTC")


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


SUBJECTS = ("acme", "globex", "initech")
REGIONS = ("eu", "us")


def month_start(t: datetime, tz: ZoneInfo, back: int = 0) -> datetime:
    """The first instant of the month ``back`` months before ``t``'s, in ``tz``."""
    local = t.astimezone(tz)
    index = local.year * 12 + local.month - 1 - back
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=tz).astimezone(UTC)


def month_events(now: datetime) -> list[dict[str, Any]]:
    """Events around every UTC and Berlin month boundary of the last five full months (and the
    DST changes in them), mid-month, by three subjects in two regions, with random values."""
    rng = random.Random(15)
    berlin = ZoneInfo("Europe/Berlin")
    instants: list[datetime] = []
    for back in range(6):
        for tz in (UTC_ZONE, berlin):
            edge = month_start(now, tz, back)
            for offset in (-1800, -1, 0, 1, 1800, 12 * 86400 + 3600):
                instants.append(edge + timedelta(seconds=offset))
    first = month_start(now, berlin, 5)
    for day in range(0, 160, 7):
        instants.append(first + timedelta(days=day, hours=1, minutes=30))
    events = []
    for i, t in enumerate(sorted(instants)):
        if not first <= t < month_start(now, UTC_ZONE):
            continue
        events.append(
            {
                "id": f"mo-{i}",
                "source": "test",
                "specversion": "1.0",
                "type": "t",
                "subject": rng.choice(SUBJECTS),
                "time": iso(t),
                "data": {"v": rng.randint(1, 1000), "region": rng.choice(REGIONS)},
            }
        )
    return events


def expected_months(
    events: list[dict[str, Any]], tz: ZoneInfo, by_subject: bool, by_region: bool
) -> dict[tuple[Any, ...], tuple[int, int]]:
    """(year, month in tz, subject?, region?) -> (sum, count), straight from the events."""
    out: dict[tuple[Any, ...], tuple[int, int]] = {}
    for e in events:
        local = utc(e["time"]).astimezone(tz)
        key = (
            local.year,
            local.month,
            e["subject"] if by_subject else None,
            e["data"]["region"] if by_region else None,
        )
        total, count = out.get(key, (0, 0))
        out[key] = (total + e["data"]["v"], count + 1)
    return out


def answered_months(
    rows: list[dict[str, Any]], tz: ZoneInfo, group: str | None
) -> dict[tuple[Any, ...], Any]:
    out = {}
    for r in rows:
        local = utc(r["windowStart"]).astimezone(tz)
        assert (local.day, local.hour, local.minute) == (1, 0, 0), r
        key = (local.year, local.month, r["subject"], r["groupBy"].get(group) if group else None)
        assert key not in out
        out[key] = r["value"]
    return out


async def send(http: Http, events: list[dict[str, Any]], **headers: str) -> None:
    resp = await http.post(
        "/api/v1/events",
        json=events,
        headers={"Content-Type": "application/cloudevents-batch+json", **headers},
    )
    assert resp.status == 204, await resp.text()


async def meters_with_events(http: Http, now: datetime, **headers: str) -> list[dict[str, Any]]:
    """A sum and a count meter over the same events, every event applied."""
    for meter in (
        {"id": "usage", "aggregation": "sum", "valueProperty": "$.v"},
        {"id": "calls", "aggregation": "count"},
    ):
        resp = await http.post(
            "/api/create-meter",
            json={"eventType": "t", "groupBy": {"region": "$.region"}, **meter},
            headers=headers,
        )
        assert resp.status == 201, await resp.text()
    events = month_events(now)
    assert len(events) > 40
    await send(http, events, **headers)

    async def applied() -> int:
        resp = await http.get("/api/readings", params={"meter": "calls"}, headers=headers)
        return total_count(await resp.json())

    await eventually(applied, lambda n: n == len(events))
    return events
