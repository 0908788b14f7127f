"""Meter queries (OpenMeter's shape), planned and merged over stored window summaries."""

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from kloudmeter_py.core.aggregate import AGGREGATIONS, Acc
from kloudmeter_py.core.budget import ReadBudget
from kloudmeter_py.core.keys import ROLLUP, decode_token, encode_token
from kloudmeter_py.core.models import Meter
from kloudmeter_py.core.summaries import (
    PAGE_FORMAT,
    CountSum,
    decode_cells,
    decode_count_sum,
    merge_cell,
    page_token,
)
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


RowKey = tuple[int, str | None, tuple[str | None, ...]]


def page_filters(
    meter: Meter,
    q: Query,
    pages: Iterable[str],
    *,
    rollup: bool,
) -> list[str]:
    """Key filters (NATS wildcards) naming exactly the pages a query reads at one level: the
    meter's rollups (``rollup``), the subjects asked for, or every subject; the group values
    in ``filterGroupBy`` named, the others any."""
    m = encode_token(meter.id)
    groups = ".".join(
        encode_token(q.filter_group_by[g]) if g in q.filter_group_by else "*"
        for g in sorted(meter.groupBy)
    )
    if rollup:
        series = [f"{m}{ROLLUP}.*"]
    elif q.subjects:
        series = [f"{m}.{encode_token(s)}" for s in q.subjects]
    else:
        series = [f"{m}.*"]
    if groups:
        series = [f"{s}.{groups}" for s in series]
    return [f"{s}.{page}" for s in series for page in pages]


def level_pages(
    feeds: Mapping[tuple[str, int], int], level_widths: Mapping[str, int]
) -> dict[str, list[str]]:
    """Per summary level the query reads, the page tokens holding its windows."""
    out: dict[str, set[str]] = {}
    for level, start in feeds:
        out.setdefault(level, set()).add(page_token(level_widths[level], start))
    return {level: sorted(tokens) for level, tokens in out.items()}


class PageMerge:
    """A query's rows merged straight from stored pages (core.summaries), subjects' or
    rollups': each window a feed names is added to its output row without building a
    reading, so the cost is one decode per page and one merge per window read.

    Rows are (output window, subject when split, requested group values). A page of
    another meter generation, or outside the subjects and group filter asked, adds nothing.
    """

    def __init__(self, q: Query, meter: Meter, feeds: Mapping[tuple[str, int], int]) -> None:
        self.q = q
        self.meter = meter
        self.feeds = feeds
        self.subjects = set(q.subjects)
        self.split = bool(self.subjects) or q.by_subject
        names = sorted(meter.groupBy)
        self.ngroups = len(names)
        self.pick = [names.index(g) for g in q.group_by]
        self.filters = [(names.index(g), v) for g, v in q.filter_group_by.items()]
        self.rows: dict[RowKey, Acc] = {}
        self._tokens: dict[str, str | None] = {}
        # Only what the aggregation's result reads is merged (a month by subject merges
        # ~300,000 stored days at 10,000 subjects: merging every field took ~0.6 s).
        self.merge: Callable[[Acc, Any], None] = _MERGES.get(meter.aggregation, merge_cell)
        self.decode: Callable[[bytes], tuple[int, int, Mapping[int, Any]]] = (
            decode_count_sum if meter.aggregation in _MERGES else decode_cells
        )

    def _decode(self, token: str) -> str | None:
        value = self._tokens.get(token, "\0")
        if value == "\0":
            value = self._tokens[token] = decode_token(token)
        return value

    def add(self, level: str, key: str, data: bytes) -> int:
        """Add one stored page (key in its bucket, value); the windows it added."""
        tokens = key.split(".")
        if len(tokens) != self.ngroups + 3:
            return 0
        rollup = tokens[0].endswith(ROLLUP)
        if rollup and self.split:
            return 0
        subject = None if rollup else self._decode(tokens[1])
        if self.subjects and subject not in self.subjects:
            return 0
        values = [self._decode(t) for t in tokens[2:-1]]
        if any(values[i] != v for i, v in self.filters):
            return 0
        fmt, start_seq, cells = self.decode(data)
        if fmt != PAGE_FORMAT or start_seq != self.meter.startSeq:
            return 0
        row_subject = subject if self.split else None
        groups = tuple(values[i] for i in self.pick)
        feeds = self.feeds
        rows = self.rows
        merge = self.merge
        added = 0
        for start, cell in cells.items():
            index = feeds.get((level, start))
            if index is None:
                continue
            rk = (index, row_subject, groups)
            acc = rows.get(rk)
            if acc is None:
                acc = rows[rk] = Acc()
            merge(acc, cell)
            added += 1
        return added

    async def result(
        self, windows: list[tuple[datetime, datetime]], budget: ReadBudget | None = None
    ) -> list["QueryRow"]:
        """The rows in order (window, subject, groups), each a tick of ``budget``."""
        if budget is None:
            budget = ReadBudget(None)
        value = AGGREGATIONS[self.meter.aggregation].result
        names = self.q.group_by
        items = list(self.rows.items())
        self.rows = {}
        try:  # (subject and group values compare as they are unless some are None)
            items.sort(key=_first)
        except TypeError:
            items.sort(key=_comparable)
        out = []
        tick = budget.tick
        for i, ((index, subject, groups), acc) in enumerate(items):
            if not i & 255:
                await tick()
            ws, we = windows[index]
            by = dict(zip(names, groups, strict=True)) if names else {}
            out.append(QueryRow(value(acc), ws, we, subject, by))
        return out


def _merge_count(acc: Acc, cell: CountSum) -> None:
    acc.count += cell.count


def _merge_sum(acc: Acc, cell: CountSum) -> None:
    acc.count += cell.count
    acc.sum += cell.sum


_MERGES: dict[str, Callable[[Acc, CountSum], None]] = {
    "count": _merge_count,
    "duration": _merge_count,
    "sum": _merge_sum,
    "avg": _merge_sum,
}


def _first(kv: tuple[RowKey, Acc]) -> RowKey:
    return kv[0]


def _comparable(kv: tuple[RowKey, Acc]) -> tuple[int, str, tuple[str, ...]]:
    index, subject, groups = kv[0]
    return index, subject or "", tuple(g or "" for g in groups)


class QueryRow(msgspec.Struct):
    """One window (or the total) of one subject and group combination."""

    value: int | float | None
    windowStart: datetime
    windowEnd: datetime
    subject: str | None
    groupBy: dict[str, str | None]
