"""How window summaries are stored: pages of windows, compact JSON arrays, identity in the key.

A level's windows are kept in pages, one key per series (meter, subject, group values) and
page: a minute level's windows in hour pages, hours in (UTC) day pages, days in (UTC) month
pages. The key is ``<meter>.<subject>[.<group>...].<page>``, the page token
``YYYY-MM-DDTHH`` (hour page), ``YYYY-MM-DD`` (day page) or ``YYYY-MM`` (month page). The
value holds what makes a replay exact and, per window (keyed by its start in epoch
seconds), the mergeable state: ``[2, meterStartSeq, lastSeq, replayed, {"<start>": [count,
sum, min, max, latest, latestAt, latestSeq, firstAt, lastAt, distinct], ...}]`` (times in
epoch ms). A page is written whole; its ``lastSeq`` covers every window in it (a series belongs to
one partition, whose events are folded in stream order), so a replay skips what the page
holds exactly as it does for a reading.

Why pages: the number of keys is what nats-server's cost grows with (measured ~8 us per
conditional write on a fresh bucket, ~36 us once it held 1.6M keys), and on the wide bench
shape (10,000 subjects, event times over 30 days) one key per day window made 1.33M summary
keys for 1M events, each written ~3 times. Month pages hold the same windows in ~140,000 keys;
a read of 30 days of one series is two keys instead of 30.

Window-per-key values of layout 1 (``<...>.<YYYYMMDDTHHMMSSZ>``: an array starting with 1,
or a reading object) are still decoded (``decode_window``): ``setup`` folds them into pages
(store/migrate.py) and readers accept them.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import cast

import msgspec

from kloudmeter_py.core.aggregate import Acc, Number, shared
from kloudmeter_py.core.keys import decode_token
from kloudmeter_py.core.meters import from_reading, to_reading
from kloudmeter_py.core.models import Meter, Reading, reading_decoder
from kloudmeter_py.core.windows import parse_window_token

FORMAT = 1


class WindowValue(msgspec.Struct, array_like=True):
    """The stored value of one window summary (see the module docstring)."""

    format: int
    meterStartSeq: int
    lastSeq: int
    count: int
    sum: Number = 0
    min: Number | None = None
    max: Number | None = None
    latest: Number | None = None
    latestAt: int = 0
    latestSeq: int = 0
    firstAt: int | None = None
    lastAt: int | None = None
    distinct: list[str] | None = None
    replayed: list[int] | None = None


@dataclass(slots=True)
class WindowState:
    """A summary's state as the worker folds into it."""

    acc: Acc
    last_seq: int
    meter_start_seq: int
    replayed: list[int] | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(WindowValue)


def encode_window(
    acc: Acc, last_seq: int, meter_start_seq: int, replayed: list[int] | None = None
) -> bytes:
    return _encoder.encode(
        WindowValue(
            FORMAT,
            meter_start_seq,
            last_seq,
            acc.count,
            acc.sum,
            acc.min,
            acc.max,
            acc.latest,
            acc.latest_at,
            acc.latest_seq,
            acc.first_at,
            acc.last_at,
            sorted(acc.distinct) if acc.distinct is not None else None,
            replayed or None,
        )
    )


def decode_window(data: bytes) -> WindowState:
    """A stored summary, in either form (array, or a reading object written before)."""
    if data[:1] == b"{":
        r = reading_decoder.decode(data)
        return WindowState(from_reading(r), r.lastSeq, r.meterStartSeq, r.replayed)
    v = _decoder.decode(data)
    if v.format != FORMAT:
        raise msgspec.ValidationError(f"unknown summary format {v.format}")
    return WindowState(cell_acc(v), v.lastSeq, v.meterStartSeq, v.replayed)


def parse_summary_key(key: str, groups: int) -> tuple[str, tuple[str | None, ...], int]:
    """(subject, group values, start) of a summary key of a meter with ``groups`` group
    names: the start of its page, or of its window (layout 1)."""
    tokens = key.split(".")
    if len(tokens) != groups + 3:
        raise ValueError(f"not a summary key of a meter with {groups} groups: {key!r}")
    subject = decode_token(tokens[1]) or ""
    values = tuple(decode_token(t) for t in tokens[2:-1])
    last = tokens[-1]
    return (
        subject,
        values,
        parse_page_token(last) if is_page_token(last) else parse_window_token(last),
    )


def summary_reading(key: str, data: bytes, meter: Meter, width: int) -> Reading:
    """A stored summary as a reading of its window, for the readers that merge them."""
    if data[:1] == b"{":
        return reading_decoder.decode(data)
    subject, groups, start = parse_summary_key(key, len(meter.groupBy))
    state = decode_window(data)
    at = datetime.fromtimestamp((state.acc.last_at or start * 1000) / 1000, UTC)
    return to_reading(
        state.acc,
        _with_start(meter, state),
        subject,
        groups,
        state.last_seq,
        at,
        state.replayed,
        window=(start, width),
    )


def _with_start(meter: Meter, state: "WindowState | PageState") -> Meter:
    """The meter as it was when the summary was written (its startSeq tells generations
    apart: a summary of an earlier meter of the same id is ignored by its readers)."""
    if meter.startSeq == state.meter_start_seq:
        return meter
    return msgspec.structs.replace(meter, startSeq=state.meter_start_seq)


PAGE_FORMAT = 2
_PAGE_FORMATS = {3600: "%Y-%m-%dT%H", 86400: "%Y-%m-%d", 0: "%Y-%m"}


class Cell(msgspec.Struct, array_like=True):
    """One window of a page, its start being its key in the page (see the module docstring)."""

    count: int
    sum: Number = 0
    min: Number | None = None
    max: Number | None = None
    latest: Number | None = None
    latestAt: int = 0
    latestSeq: int = 0
    firstAt: int | None = None
    lastAt: int | None = None
    distinct: list[str] | None = None


class PageValue(msgspec.Struct, array_like=True):
    """The stored value of one page of windows."""

    format: int
    meterStartSeq: int
    lastSeq: int
    replayed: list[int] | None
    windows: dict[int, Cell]


class _RawPage(msgspec.Struct, array_like=True):
    """A page with its windows left undecoded (each a slice of the stored bytes)."""

    format: int
    meterStartSeq: int
    lastSeq: int
    replayed: list[int] | None
    windows: dict[int, msgspec.Raw]


class PageHead(msgspec.Struct, array_like=True):
    """What the worker needs of a stored page before a round touches its windows."""

    format: int
    meterStartSeq: int
    lastSeq: int
    replayed: list[int] | None


# A window of a page in the worker: its stored bytes (msgspec.Raw), or an Acc once a round
# folds into it. A page is read and written whole, but a round seldom touches more than one or
# two of its windows: the others are copied through as the bytes they were. Decoding every
# window into an Acc (its distinct values into a set) and back made the worker's CPU per event
# grow with the page (wide bench shape, 1M events: 150 s against 115 s before pages), and
# holding them decoded took ~300 bytes a window against ~45 as bytes.
Window = Acc | msgspec.Raw


@dataclass(slots=True)
class PageState:
    """A page decoded: window start -> state."""

    windows: dict[int, Acc]
    last_seq: int
    meter_start_seq: int
    replayed: list[int] | None = None


_page_decoder = msgspec.json.Decoder(PageValue)
_raw_page_decoder = msgspec.json.Decoder(_RawPage)
_head_decoder = msgspec.json.Decoder(PageHead)
_cell_decoder = msgspec.json.Decoder(Cell)


def page_width(width: int) -> int:
    """The span of the page that holds windows of ``width`` seconds: 3600 (an hour page of
    minute windows), 86400 (a day page of hours), or 0 (a calendar month of days, UTC)."""
    if width < 3600:
        return 3600
    if width < 86400:
        return 86400
    return 0


def page_start(width: int, start: int) -> int:
    """The start (epoch seconds) of the page holding the window of ``width`` at ``start``."""
    span = page_width(width)
    if span:
        return start - start % span
    d = datetime.fromtimestamp(start, UTC)
    return int(datetime(d.year, d.month, 1, tzinfo=UTC).timestamp())


def page_end(width: int, start: int) -> int:
    """The end of the page that begins at ``start``."""
    span = page_width(width)
    if span:
        return start + span
    d = datetime.fromtimestamp(start, UTC)
    year, month = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
    return int(datetime(year, month, 1, tzinfo=UTC).timestamp())


@lru_cache(maxsize=1 << 14)
def page_token(width: int, start: int) -> str:
    """The key token of the page holding the window of ``width`` at ``start``."""
    fmt = _PAGE_FORMATS[page_width(width)]
    return datetime.fromtimestamp(page_start(width, start), UTC).strftime(fmt)


def is_page_token(token: str) -> bool:
    """A page token (``2026-12``, ``2026-12-02``, ``2026-12-02T15``), not a layout 1 window
    token (``20261202T150000Z``)."""
    return "-" in token


def parse_page_token(token: str) -> int:
    """The start (epoch seconds, UTC) of the page a token names."""
    fmt = {7: "%Y-%m", 10: "%Y-%m-%d", 13: "%Y-%m-%dT%H"}.get(len(token))
    if fmt is None:
        raise ValueError(f"not a page token: {token!r}")
    return int(datetime.strptime(token, fmt).replace(tzinfo=UTC).timestamp())


def cell_acc(cell: "Cell | WindowValue") -> Acc:
    """A decoded window (of a page, or of layout 1) as a state to fold into (its distinct
    values held once each in the worker's shared table)."""
    acc = Acc()
    acc.count = cell.count
    acc.sum = cell.sum
    acc.min = cell.min
    acc.max = cell.max
    acc.latest = cell.latest
    acc.latest_at = cell.latestAt
    acc.latest_seq = cell.latestSeq
    acc.first_at = cell.firstAt
    acc.last_at = cell.lastAt
    if cell.distinct is not None:
        acc.distinct = set(shared(cell.distinct))
    return acc


def merge_cell(acc: Acc, cell: Cell) -> None:
    """Merge a stored window into ``acc`` in place (``merge_into`` without an Acc of it)."""
    acc.count += cell.count
    acc.sum += cell.sum
    if cell.min is not None and (acc.min is None or cell.min < acc.min):
        acc.min = cell.min
    if cell.max is not None and (acc.max is None or cell.max > acc.max):
        acc.max = cell.max
    if cell.firstAt is not None and (acc.first_at is None or cell.firstAt < acc.first_at):
        acc.first_at = cell.firstAt
    if cell.lastAt is not None and (acc.last_at is None or cell.lastAt > acc.last_at):
        acc.last_at = cell.lastAt
    if cell.latest is not None and (
        acc.latest is None or (cell.latestAt, cell.latestSeq) >= (acc.latest_at, acc.latest_seq)
    ):
        acc.latest, acc.latest_at, acc.latest_seq = cell.latest, cell.latestAt, cell.latestSeq
    if cell.distinct is not None:
        if acc.distinct is None:
            acc.distinct = set(cell.distinct)
        else:
            acc.distinct.update(cell.distinct)


def as_acc(window: Window) -> Acc:
    """A window of a page as a state to fold into (decoded now if it was bytes)."""
    if isinstance(window, Acc):
        return window
    return cell_acc(_cell_decoder.decode(window))


def encode_page(
    windows: Mapping[int, Window],
    last_seq: int,
    meter_start_seq: int,
    replayed: list[int] | None = None,
) -> bytes:
    cells: dict[int, Cell | msgspec.Raw] = {}
    for start in sorted(windows):
        acc = windows[start]
        if not isinstance(acc, Acc):
            cells[start] = acc
            continue
        cells[start] = Cell(
            acc.count,
            acc.sum,
            acc.min,
            acc.max,
            acc.latest,
            acc.latest_at,
            acc.latest_seq,
            acc.first_at,
            acc.last_at,
            sorted(acc.distinct) if acc.distinct is not None else None,
        )
    return _encoder.encode([PAGE_FORMAT, meter_start_seq, last_seq, replayed or None, cells])


def page_head(data: bytes) -> PageHead:
    """The generation, lastSeq and replays of a stored page, its windows left as they are."""
    head = _head_decoder.decode(data)
    if head.format != PAGE_FORMAT:
        raise msgspec.ValidationError(f"unknown page format {head.format}")
    return head


def open_windows(data: bytes) -> dict[int, Window]:
    """A stored page's windows, each as its bytes."""
    # (the decoded dict itself: a round puts Accs in it, never a page of its own)
    return cast(dict[int, Window], _raw_page_decoder.decode(data).windows)


class CountSum(msgspec.Struct, array_like=True):
    """A stored window's count and sum only (the rest of its array is skipped)."""

    count: int
    sum: Number = 0


class _CountSumPage(msgspec.Struct, array_like=True):
    format: int
    meterStartSeq: int
    lastSeq: int
    replayed: list[int] | None
    windows: dict[int, CountSum]


_count_sum_decoder = msgspec.json.Decoder(_CountSumPage)


class Count(msgspec.Struct, array_like=True, gc=False):
    """A stored window's count only (the rest of its array is skipped)."""

    count: int


class _CountPage(msgspec.Struct, array_like=True):
    format: int
    meterStartSeq: int
    lastSeq: int
    replayed: list[int] | None
    windows: dict[int, Count]


_count_decoder = msgspec.json.Decoder(_CountPage)


def decode_cells(data: bytes) -> tuple[int, int, dict[int, Cell]]:
    """(format, meterStartSeq, windows) of a stored page, for readers: format and
    generation are the caller's to check (a layout 1 window decodes with format 1 and no
    windows)."""
    if not data.startswith(b"[2,"):
        return (1, -1, {})
    page = _page_decoder.decode(data)
    return page.format, page.meterStartSeq, page.windows


def decode_count_sum(data: bytes) -> tuple[int, int, dict[int, CountSum]]:
    """``decode_cells`` keeping each window's count and sum only: for the readers of
    meters whose result is made of those (count, sum, avg)."""
    if not data.startswith(b"[2,"):
        return (1, -1, {})
    page = _count_sum_decoder.decode(data)
    return page.format, page.meterStartSeq, page.windows


def decode_counts(data: bytes) -> tuple[int, int, dict[int, Count]]:
    """``decode_cells`` keeping each window's count only: for the readers of meters whose
    result is the count (count, duration). A month page of 30 days decodes in ~70% of the
    time ``decode_count_sum`` takes (its sum is an int or a float: the slower number path)."""
    if not data.startswith(b"[2,"):
        return (1, -1, {})
    page = _count_decoder.decode(data)
    return page.format, page.meterStartSeq, page.windows


def decode_page(data: bytes) -> PageState:
    v = _page_decoder.decode(data)
    if v.format != PAGE_FORMAT:
        raise msgspec.ValidationError(f"unknown page format {v.format}")
    windows = {start: cell_acc(cell) for start, cell in v.windows.items()}
    return PageState(windows, v.lastSeq, v.meterStartSeq, v.replayed)


def summary_readings(key: str, data: bytes, meter: Meter, width: int) -> list[Reading]:
    """A stored page (or a layout 1 window) as a reading per window, for the readers that
    merge them."""
    if not is_page_token(key[key.rfind(".") + 1 :]):
        return [summary_reading(key, data, meter, width)]
    subject, groups, _ = parse_summary_key(key, len(meter.groupBy))
    page = decode_page(data)
    as_written = _with_start(meter, page)
    out = []
    for start, acc in page.windows.items():
        at = datetime.fromtimestamp((acc.last_at or start * 1000) / 1000, UTC)
        out.append(
            to_reading(
                acc,
                as_written,
                subject,
                groups,
                page.last_seq,
                at,
                page.replayed,
                window=(start, width),
            )
        )
    return out
