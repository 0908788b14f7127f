"""Meter queries (OpenMeter's shape), planned and merged over stored window summaries."""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from kloudmeter_py.core.aggregate import AGGREGATIONS, Acc, merge
from kloudmeter_py.core.budget import ReadBudget
from kloudmeter_py.core.meters import from_reading
from kloudmeter_py.core.models import Meter, Reading
from kloudmeter_py.core.windows import (
    DAY,
    MINUTE,
    STORED_LEVEL,
    WINDOW_SIZES,
    QueryError,
    cover,
    output_windows,
    widths,
    window_count,
)

# Output windows one query may ask for: planning them is CPU work on the event loop.
MAX_WINDOWS = 20_000


@dataclass
class Query:
    start: datetime
    end: datetime
    window_size: str | None  # "minute" | "hour" | "day" | "month" | None
    tz: ZoneInfo
    subjects: list[str] = field(default_factory=list)
    group_by: list[str] = field(default_factory=list)
    filter_group_by: dict[str, str] = field(default_factory=dict)
    # Rows split by subject even when ``subjects`` names none (every subject: the export).
    # A read must then bring every subject's summaries, never a meter-wide rollup.
    by_subject: bool = False


def parse_time(field_name: str, value: str) -> datetime:
    try:
        t = datetime.fromisoformat(value.strip().replace(" ", "+"))
    except ValueError:
        raise QueryError(field_name, f"{value!r} is not an RFC 3339 time") from None
    if t.tzinfo is None:
        raise QueryError(field_name, "needs a UTC offset, for example 2026-11-22T10:00:00Z")
    try:
        return t.astimezone(UTC)
    except OverflowError:
        raise QueryError(field_name, f"{value!r} is out of range") from None


def build_query(
    meter: Meter,
    *,
    start: str | None,
    end: str | None,
    window_size: str | None,
    tz: str | None,
    subjects: Iterable[str],
    group_by: Iterable[str],
    filter_group_by: Mapping[str, str],
    interval: int,
    now: datetime,
    day_retention_days: int,
) -> Query:
    """Validate a query's parameters; each error names its parameter."""
    size = None
    if window_size:
        size = WINDOW_SIZES.get(window_size.upper())
        if size is None:
            raise QueryError("windowSize", f"{window_size!r} is not MINUTE, HOUR, DAY or MONTH")
    try:
        zone = ZoneInfo(tz or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        raise QueryError("windowTimeZone", f"{tz!r} is not an IANA time zone") from None
    step = interval
    if end is None:
        epoch = int(now.timestamp())
        stop = datetime.fromtimestamp(epoch - epoch % step + step, UTC)
    else:
        stop = parse_time("to", end)
    if start is None:
        # Minute windows: the last day by default (minute summaries are kept for hours).
        first = now - timedelta(days=1 if size == MINUTE else day_retention_days)
        begin = first.replace(hour=0, minute=0, second=0, microsecond=0)
    else:
        begin = parse_time("from", start)
    if begin >= stop:
        raise QueryError("from", "must be before to")
    for name, t in (("from", begin), ("to", stop)):
        if int(t.timestamp()) % step or t.microsecond:
            raise QueryError(name, f"must fall on a {step}s boundary (METER_INTERVAL)")
    if size is not None:
        count = window_count(begin, stop, size, interval)
        if count > MAX_WINDOWS:
            raise QueryError(
                "from",
                f"{count:.0f} {size} windows from {begin:%Y-%m-%dT%H:%M:%SZ}; at most "
                f"{MAX_WINDOWS}: narrow from/to or ask for a larger windowSize",
            )
    groups = list(dict.fromkeys(group_by))
    for g in [*groups, *filter_group_by]:
        if g not in meter.groupBy:
            known = ", ".join(sorted(meter.groupBy)) or "none"
            raise QueryError("groupBy", f"meter {meter.id!r} has no group {g!r} (groups: {known})")
    return Query(
        start=begin,
        end=stop,
        window_size=size,
        tz=zone,
        subjects=list(dict.fromkeys(subjects)),
        group_by=groups,
        filter_group_by=dict(filter_group_by),
    )


def plan(
    q: Query, interval: int, horizons: dict[str, int]
) -> tuple[list[tuple[datetime, datetime]], dict[tuple[str, int], int]]:
    """Output windows, and which stored window (level, start) feeds which output window."""
    level_widths = widths(interval)
    windows = output_windows(q.start, q.end, q.window_size, q.tz, interval)
    feeds: dict[tuple[str, int], int] = {}
    requested = STORED_LEVEL[q.window_size] if q.window_size else None
    if requested is None and len(windows) == 1:
        requested = DAY
    for i, (ws, we) in enumerate(windows):
        for level, start in cover(
            int(ws.timestamp()), int(we.timestamp()), level_widths, horizons, requested
        ):
            feeds[(level, start)] = i
    return windows, feeds


async def merge_rows(
    q: Query,
    meter: Meter,
    windows: list[tuple[datetime, datetime]],
    feeds: dict[tuple[str, int], int],
    summaries: Iterable[tuple[str, Reading]],
    budget: ReadBudget | None = None,
) -> list[dict[str, Any]]:
    """Merge the summaries into one row per output window x (subject) x requested groups.

    Each summary and each row is a tick of ``budget`` (a turn for the event loop every slice)."""
    if budget is None:
        budget = ReadBudget(None)
    agg = AGGREGATIONS[meter.aggregation]
    subjects = set(q.subjects)
    split = bool(subjects) or q.by_subject
    rows: dict[tuple[int, str | None, tuple[str | None, ...]], Acc] = {}
    for level, s in summaries:
        await budget.tick()
        if s.windowStart is None or s.meterStartSeq != meter.startSeq:
            continue
        index = feeds.get((level, int(s.windowStart.timestamp())))
        if index is None:
            continue
        if subjects and s.subject not in subjects:
            continue
        if any(s.groupBy.get(k) != v for k, v in q.filter_group_by.items()):
            continue
        key = (
            index,
            s.subject if split else None,
            tuple(s.groupBy.get(g) for g in q.group_by),
        )
        acc = from_reading(s)
        rows[key] = merge(rows[key], acc) if key in rows else acc
    out = []
    for (index, subject, groups), acc in sorted(
        rows.items(), key=lambda kv: (kv[0][0], kv[0][1] or "", [g or "" for g in kv[0][2]])
    ):
        await budget.tick()
        ws, we = windows[index]
        out.append(
            {
                "value": agg.result(acc),
                "windowStart": ws,
                "windowEnd": we,
                "subject": subject,
                "groupBy": dict(zip(q.group_by, groups, strict=True)),
            }
        )
    return out
