"""Time windows: which stored window an event falls in, and how a query's windows are covered
by stored ones (coarsest first, finer where a boundary needs it).

Stored levels are minute, hour and day. A query may also ask for calendar months in its time
zone: a month is never stored, it is covered by the day windows inside it, with hours (and
minutes) at a boundary that is not a UTC midnight, as a day in a non-UTC zone is."""

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

MINUTE, HOUR, DAY, MONTH = "minute", "hour", "day", "month"
LEVELS = (MINUTE, HOUR, DAY)  # stored
WINDOW_SIZES = {"MINUTE": MINUTE, "HOUR": HOUR, "DAY": DAY, "MONTH": MONTH}  # asked for
# The coarsest stored level a window of each size is built from (a month: from days).
STORED_LEVEL = {MINUTE: MINUTE, HOUR: HOUR, DAY: DAY, MONTH: DAY}


class QueryError(ValueError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def widths(interval: int) -> dict[str, int]:
    """Width in seconds of each stored level; the finest is METER_INTERVAL."""
    return {MINUTE: interval, HOUR: 3600, DAY: 86400}


def window_count(start: datetime, end: datetime, size: str, interval: int) -> float:
    """About how many windows of ``size`` [start, end) holds, before they are planned (months
    counted on the UTC calendar: one more or less in a zone)."""
    if size == MONTH:
        return (end.year - start.year) * 12 + end.month - start.month + 1
    return (end - start).total_seconds() / widths(interval)[size]


def window_start(at_ms: int, width: int) -> int:
    """Start (epoch seconds) of the UTC-aligned window of ``width`` seconds holding ``at_ms``."""
    seconds = at_ms // 1000
    return seconds - seconds % width


@lru_cache(maxsize=1 << 14)
def window_token(start: int) -> str:
    return datetime.fromtimestamp(start, UTC).strftime("%Y%m%dT%H%M%SZ")


def parse_window_token(token: str) -> int:
    return int(datetime.strptime(token, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp())


def output_windows(
    start: datetime, end: datetime, size: str | None, tz: ZoneInfo, interval: int
) -> list[tuple[datetime, datetime]]:
    """The query's windows over [start, end): aligned in ``tz``, clipped to the range."""
    if size is None:
        return [(start, end)]
    out = []
    cursor = _floor_local(start, size, tz, interval)
    while cursor < end:
        try:
            nxt = _next_local(cursor, size, tz, interval)
        except (OverflowError, ValueError):  # past year 9999: the range ends first
            nxt = end
        out.append((max(cursor, start), min(nxt, end)))
        cursor = nxt
    return out


def _floor_local(t: datetime, size: str, tz: ZoneInfo, interval: int) -> datetime:
    local = t.astimezone(tz)
    if size == MONTH:
        floored = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    elif size == DAY:
        floored = local.replace(hour=0, minute=0, second=0, microsecond=0)
    elif size == HOUR:
        floored = local.replace(minute=0, second=0, microsecond=0)
    else:
        since_midnight = local.hour * 3600 + local.minute * 60 + local.second
        floored = local.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(
            seconds=since_midnight - since_midnight % interval
        )
    return _resolve(floored.replace(tzinfo=None), tz)


def _next_local(t: datetime, size: str, tz: ZoneInfo, interval: int) -> datetime:
    local = t.astimezone(tz).replace(tzinfo=None)
    if size == MONTH:
        return _resolve(first_of_next_month(local), tz)
    if size == DAY:
        nxt = local.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
        return _resolve(nxt, tz)
    step = 3600 if size == HOUR else interval
    # Hours and minutes advance in absolute time, so a repeated hour (DST end) stays two windows.
    return (t + timedelta(seconds=step)).astimezone(UTC)


def first_of_next_month(local: datetime) -> datetime:
    """Midnight on the first of the month after ``local``'s (Jan 31 -> Feb 1, Dec -> Jan)."""
    year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
    return local.replace(year=year, month=month, day=1, hour=0, minute=0, second=0, microsecond=0)


def _resolve(naive_local: datetime, tz: ZoneInfo) -> datetime:
    """A wall-clock time in ``tz`` as UTC; a time skipped by DST moves forward to a real one.

    With ``fold=0`` (PEP 495) a time in a gap is read with the offset in force before it, which
    lands on the first instant after the gap (Santiago's skipped midnight 00:00 -04 is 01:00
    -03); ``fold=1`` would land before it, on the previous day. A repeated time is its first
    occurrence."""
    return naive_local.replace(tzinfo=tz, fold=0).astimezone(UTC)


def cover(
    start: int,
    end: int,
    level_widths: dict[str, int],
    horizons: dict[str, int],
    requested: str | None = None,
) -> Iterator[tuple[str, int]]:
    """Stored windows (level, start) that tile [start, end) exactly, coarsest where possible.

    ``horizons`` gives, per level, the oldest window end still stored. A stretch that only an
    expired level could tile, while a level no coarser than the requested window size still
    holds it (unaligned, as a day in a non-UTC zone), cannot be answered exactly: that raises
    QueryError. Otherwise expired stretches hold no data and are skipped.
    """
    finest = min(level_widths.values())
    if start % finest or end % finest:
        raise QueryError("from", f"from and to must be multiples of {finest}s (METER_INTERVAL)")
    ordered = sorted(level_widths.items(), key=lambda kv: -kv[1])
    t = start
    while t < end:
        aligned = [(lv, w) for lv, w in ordered if t % w == 0 and t + w <= end]
        live = [(lv, w) for lv, w in aligned if t + w > horizons[lv]]
        if live:
            level, width = live[0]
            yield level, t
            t += width
            continue
        limit = level_widths[requested] if requested else max(level_widths.values())
        alive = [lv for lv, w in ordered if w <= limit and t - t % w + w > horizons[lv]]
        if alive:
            raise QueryError(
                "windowTimeZone",
                "windows at this time can only be built from finer summaries, which have "
                "expired; ask for UTC windows or a more recent range",
            )
        # Expired here, and so is everything finer inside: skip the coarsest aligned window.
        t += aligned[0][1] if aligned else finest
