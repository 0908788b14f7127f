"""The stored form of window summaries: compact arrays, and objects written before still read."""

from datetime import UTC, datetime

import msgspec
import pytest

from kloudmeter_py.core.aggregate import Acc, fold
from kloudmeter_py.core.keys import reading_key
from kloudmeter_py.core.meters import to_reading
from kloudmeter_py.core.models import Meter, encoder
from kloudmeter_py.core.summaries import (
    as_acc,
    decode_cells,
    decode_count_sum,
    decode_counts,
    decode_page,
    decode_window,
    encode_page,
    encode_window,
    is_page_token,
    open_windows,
    page_end,
    page_head,
    page_start,
    page_token,
    parse_page_token,
    parse_summary_key,
    summary_reading,
    summary_readings,
)
from kloudmeter_py.core.windows import window_token

START = 1_764_633_600  # 2025-12-02T00:00:00Z


def _meter(aggregation: str, group_by: dict[str, str] | None = None) -> Meter:
    return Meter(
        id="m",
        eventType="t",
        aggregation=aggregation,
        valueProperty=None if aggregation == "count" else "$.v",
        groupBy=group_by or {},
        startSeq=7,
        createdAt=datetime(2025, 12, 1, tzinfo=UTC),
    )


def _acc(values: list[tuple[float | int | None, str | None]]) -> Acc:
    acc = Acc()
    for i, (number, key) in enumerate(values):
        fold(acc, number, key, START * 1000 + i * 1000, 100 + i)
    return acc


CASES = [
    ("count", [(None, None), (None, None)]),
    ("sum", [(3, None), (4.5, None), (-1, None)]),
    ("avg", [(1, None), (2, None)]),
    ("min", [(5, None), (2, None), (9, None)]),
    ("max", [(5, None), (2.25, None), (9, None)]),
    ("latest", [(5, None), (2, None)]),
    ("unique", [(None, "a"), (None, "b"), (None, "a"), (None, "a.b c")]),
]


@pytest.mark.parametrize(("aggregation", "values"), CASES)
def test_a_window_survives_its_compact_form(aggregation: str, values: list[object]) -> None:
    """Every aggregation's state comes back equal from the array, replays included."""
    acc = _acc(values)  # type: ignore[arg-type]
    data = encode_window(acc, 123, 7, [99, 101])
    assert data.startswith(b"[1,7,123,")
    state = decode_window(data)
    assert state.acc == acc
    assert (state.last_seq, state.meter_start_seq, state.replayed) == (123, 7, [99, 101])


@pytest.mark.parametrize(("aggregation", "values"), CASES)
def test_a_window_written_as_a_reading_object_is_still_read(
    aggregation: str, values: list[object]
) -> None:
    """Summaries stored by the previous version (reading objects) decode to the same result,
    and read back as the same reading."""
    meter = _meter(aggregation)
    acc = _acc(values)  # type: ignore[arg-type]
    old = to_reading(acc, meter, "s", (), 123, datetime.now(UTC), window=(START, 86400))
    data = encoder.encode(old)
    state = decode_window(data)
    assert (state.last_seq, state.meter_start_seq) == (123, 7)
    assert state.acc.count == acc.count and state.acc.sum == acc.sum
    assert state.acc.distinct == acc.distinct
    key = reading_key("m", "s", ()) + "." + window_token(START)
    assert summary_reading(key, data, meter, 86400).value == old.value
    new = summary_reading(key, encode_window(acc, 123, 7), meter, 86400)
    assert (new.value, new.count, new.windowStart, new.windowEnd) == (
        old.value,
        old.count,
        old.windowStart,
        old.windowEnd,
    )


def test_a_summary_key_names_its_subject_groups_and_window() -> None:
    """Encoded subjects and group values (dots, spaces, missing) come back from the key."""
    key = reading_key("m", "a b.c", ("eu", None)) + "." + window_token(START)
    assert parse_summary_key(key, 2) == ("a b.c", ("eu", None), START)
    with pytest.raises(ValueError, match="2 groups"):
        parse_summary_key(reading_key("m", "s", ()) + "." + window_token(START), 2)


def test_an_unknown_format_is_refused() -> None:
    """A value of a format this version does not know is an error, not a wrong number."""
    with pytest.raises(msgspec.ValidationError):
        decode_window(b"[2,7,123,1]")


@pytest.mark.parametrize(("aggregation", "values"), CASES)
def test_a_page_holds_each_window_as_its_own_state(aggregation: str, values: list[object]) -> None:
    """A page of two day windows comes back window by window, and reads back as one reading
    per window equal to the window-per-key form of layout 1."""
    meter = _meter(aggregation)
    first = _acc(values)  # type: ignore[arg-type]
    second = _acc(values[:1])  # type: ignore[arg-type]
    data = encode_page({START + 86400: second, START: first}, 123, 7, [99])
    assert data.startswith(b'[3,7,123,[99],{"%d":[' % START)
    page = decode_page(data)
    assert page.windows == {START: first, START + 86400: second}
    # the worker's view: windows left as bytes until one is folded into, written back as such
    windows = open_windows(data)
    assert {s: as_acc(w, s) for s, w in windows.items()} == page.windows
    assert encode_page(windows, 123, 7, [99]) == data
    windows[START] = as_acc(windows[START], START)
    assert encode_page(windows, 123, 7, [99]) == data
    assert (page_head(data).lastSeq, page_head(data).meterStartSeq) == (123, 7)
    assert (page.last_seq, page.meter_start_seq, page.replayed) == (123, 7, [99])
    key = reading_key("m", "s", ()) + "." + page_token(86400, START)
    assert key.endswith(".2025-12")
    got = summary_readings(key, data, meter, 86400)
    one = summary_reading("m.s." + window_token(START), encode_window(first, 123, 7), meter, 86400)
    assert [(r.value, r.count, r.windowStart, r.windowEnd) for r in got[:1]] == [
        (one.value, one.count, one.windowStart, one.windowEnd)
    ]
    assert got[1].windowStart == datetime.fromtimestamp(START + 86400, UTC)


def _format_2(windows: dict[int, Acc]) -> bytes:
    """A page as versions before format 3 wrote it: every field, in the old order."""
    cells = {
        start: [
            a.count,
            a.sum,
            a.min,
            a.max,
            a.latest,
            a.latest_at,
            a.latest_seq,
            a.first_at,
            a.last_at,
            sorted(a.distinct) if a.distinct is not None else None,
        ]
        for start, a in windows.items()
    }
    return msgspec.json.encode([2, 7, 123, [99], cells])


@pytest.mark.parametrize(("aggregation", "values"), CASES)
def test_a_format_2_page_is_read_and_written_again_as_format_3(
    aggregation: str, values: list[object]
) -> None:
    """Pages written before format 3 read as the same windows by every reader, and the worker
    writes them back in format 3 with nothing lost (no setup step migrates them)."""
    windows = {START: _acc(values), START + 86400: _acc(values[:1])}  # type: ignore[arg-type]
    old = _format_2(windows)
    new = encode_page(windows, 123, 7, [99])
    assert old.startswith(b"[2,") and new.startswith(b"[3,")
    assert decode_page(old) == decode_page(new)
    assert decode_page(new).windows == windows
    for decode in (decode_counts, decode_count_sum):
        assert decode(old) == decode(new)
    fmt, start_seq, cells = decode_cells(old)
    fmt3, start_seq3, cells3 = decode_cells(new)
    assert (fmt, start_seq) == (fmt3, start_seq3) == (3, 7)
    for start, cell in cells.items():
        assert msgspec.structs.asdict(cell) == msgspec.structs.asdict(cells3[start])
    opened = open_windows(old)
    assert {s: as_acc(w, s) for s, w in opened.items()} == windows
    assert encode_page(opened, 123, 7, [99]) == new
    assert page_head(old).lastSeq == page_head(new).lastSeq == 123
    meter = _meter(aggregation)
    key = reading_key("m", "s", ()) + "." + page_token(86400, START)
    assert summary_readings(key, old, meter, 86400) == summary_readings(key, new, meter, 86400)


def test_format_3_writes_only_the_fields_a_meter_sets() -> None:
    """A count window is its count, sum and first and last times; a unique one adds its
    values; only min, max and latest windows carry every field."""
    count = _acc([(None, None), (None, None)])
    unique = _acc([(None, "a"), (None, "b")])
    assert msgspec.json.decode(encode_page({START: count}, 1, 0))[4] == {
        str(START): [2, 0, 0, 1000]
    }
    assert len(msgspec.json.decode(encode_page({START: unique}, 1, 0))[4][str(START)]) == 5
    # a month page of a count meter, its events at 10:00 each day: ~1.9x smaller
    month = {START + d * 86400: _acc([(None, None)] * 3) for d in range(30)}
    for d, acc in month.items():
        acc.first_at, acc.last_at = (d + 36000) * 1000, (d + 36060) * 1000
    old, new = _format_2(month), encode_page(month, 123, 7, [99])
    assert len(new) * 1.8 < len(old)


@pytest.mark.parametrize(
    ("width", "at", "token", "start", "end"),
    [
        (60, START + 3 * 3600 + 120, "2025-12-02T03", START + 3 * 3600, START + 4 * 3600),
        (3600, START + 7200, "2025-12-02", START, START + 86400),
        (86400, START, "2025-12", START - 86400, START + 30 * 86400),
        # December's page ends with the year; February of a leap year has 29 days
        (86400, 1_767_139_200, "2025-12", START - 86400, 1_767_225_600),
        (86400, 1_709_164_800, "2024-02", 1_706_745_600, 1_709_251_200),
    ],
)
def test_a_window_falls_in_one_page(width: int, at: int, token: str, start: int, end: int) -> None:
    """Minute windows in hour pages, hours in day pages, days in calendar months (UTC)."""
    assert page_token(width, at) == token
    assert page_start(width, at) == start == parse_page_token(token)
    assert page_end(width, start) == end
    assert is_page_token(token) and not is_page_token(window_token(at))
    key = reading_key("m", "s", ("eu",)) + "." + token
    assert parse_summary_key(key, 1) == ("s", ("eu",), start)


@pytest.mark.parametrize(("aggregation", "values"), CASES)
def test_pages_merge_into_rows_as_their_events_fold(aggregation: str, values: list[object]) -> None:
    """A query's rows merged from stored pages (core.query.PageMerge: per subject, and
    meter-wide over subjects and rollups alike) equal folding the events themselves, for
    every aggregation: the count/sum fast paths give what merging every field gives."""
    from datetime import timedelta
    from zoneinfo import ZoneInfo

    from kloudmeter_py.core.aggregate import AGGREGATIONS, merge
    from kloudmeter_py.core.query import PageMerge, Query

    meter = _meter(aggregation)
    # subject a: all the values in one window; subject b: the first value, a day later too
    a = _acc(values)  # type: ignore[arg-type]
    b = _acc(values[:1])  # type: ignore[arg-type]
    pages = [
        (f"m.a.{page_token(86400, START)}", encode_page({START: a}, 200, 7)),
        (f"m.b.{page_token(86400, START)}", encode_page({START: b, START + 86400: b}, 200, 7)),
        (f"m/all.0.{page_token(86400, START)}", encode_page({START: merge(a, b)}, 200, 7)),
        (f"m.c.{page_token(86400, START)}", encode_page({START: a}, 200, 6)),  # older meter
    ]
    day = datetime.fromtimestamp(START, UTC)
    windows = [(day, day + timedelta(days=1)), (day + timedelta(days=1), day + timedelta(days=2))]
    feeds = {("day", START): 0, ("day", START + 86400): 1}
    result = AGGREGATIONS[aggregation].result

    def rows(by_subject: bool, keys: list[int]) -> list[tuple[int, str | None, object]]:
        q = Query(day, day + timedelta(days=2), "day", ZoneInfo("UTC"), by_subject=by_subject)
        merged = PageMerge(q, meter, feeds)
        for i in keys:
            merged.add("day", *pages[i])
        import asyncio

        out = asyncio.run(merged.result(windows))
        return [(windows.index((r.windowStart, r.windowEnd)), r.subject, r.value) for r in out]

    split = rows(True, [0, 1, 2, 3])  # (a rollup is no subject's: left out)
    assert split == [(0, "a", result(a)), (0, "b", result(b)), (1, "b", result(b))]
    both = [(0, None, result(merge(a, b))), (1, None, result(b))]
    assert rows(False, [0, 1, 3]) == both  # from the subjects' pages
    assert rows(False, [2]) == [both[0]]  # from the rollup page


# A month of day windows (2025-12-02 .. 2025-12-05) and a window of each neighbour month: how
# a page's windows feed a query's output windows decides whether they are added one by one or
# as one total (core.query.PageMerge); the rows must be the same either way.
DAYS = [START + i * 86400 for i in range(4)]
BEFORE = START - 86400  # a window of the page the query does not read


def _feeds_table() -> list[tuple[str, dict[tuple[str, int], int], int]]:
    """(name, feeds, output windows): every day in one window (a MONTH); each day its own
    window (a DAY); the first two days in one window, the last two in another; a query that
    reads only some of the page's windows; and one whose hours feed the same window as
    days (a month whose last day is still made of hours)."""
    hours = {("hour", DAYS[3] + h * 3600): 0 for h in range(3)}
    return [
        ("month", {("day", d): 0 for d in DAYS}, 1),
        ("days", {("day", d): i for i, d in enumerate(DAYS)}, 4),
        ("halves", {("day", d): i // 2 for i, d in enumerate(DAYS)}, 2),
        ("part", {("day", d): 0 for d in DAYS[1:3]}, 1),
        ("days and hours", {**{("day", d): 0 for d in DAYS[:3]}, **hours}, 1),
    ]


@pytest.mark.parametrize("feeds_case", _feeds_table(), ids=lambda c: c[0])
@pytest.mark.parametrize(("aggregation", "values"), [*CASES, ("duration", [(1, None)] * 2)])
def test_a_page_merges_into_the_rows_its_windows_feed(
    aggregation: str,
    values: list[tuple[float | int | None, str | None]],
    feeds_case: tuple[str, dict[tuple[str, int], int], int],
) -> None:
    """Whatever the windows of a page feed (one row, several, some of them or none), the
    rows equal the events of the windows read folded into each row, for every aggregation:
    a page of one row's windows totalled at once gives what merging each window gives."""
    import asyncio
    from datetime import timedelta
    from zoneinfo import ZoneInfo

    from kloudmeter_py.core.aggregate import AGGREGATIONS
    from kloudmeter_py.core.query import PageMerge, Query

    _, feeds, n = feeds_case
    meter = _meter(aggregation)
    # window d holds the first 1 + d % len(values) values, at its own times
    events: dict[int, list[tuple[float | int | None, str | None]]] = {}
    for i, start in enumerate([BEFORE, *DAYS]):
        events[start] = values[: 1 + i % len(values)]
    hours = {start: values[-1:] for (level, start) in feeds if level == "hour"}

    def acc_of(start: int, items: list[tuple[float | int | None, str | None]]) -> Acc:
        acc = Acc()
        for i, (number, key) in enumerate(items):
            fold(acc, number, key, start * 1000 + i, start + i)
        return acc

    def page(windows: dict[int, list[tuple[float | int | None, str | None]]]) -> bytes:
        return encode_page({s: acc_of(s, v) for s, v in windows.items()}, 900, 7)

    # subject a's month page holds a window before the query, b's only the query's days
    month = (f"m.a.{page_token(86400, START)}", page(events))
    month_b = (f"m.b.{page_token(86400, START)}", page({d: events[d] for d in DAYS}))
    before = (f"m.c.{page_token(86400, BEFORE)}", page({BEFORE: events[BEFORE]}))
    day_pages = [(f"m.{s}.{page_token(3600, DAYS[3])}", page(hours)) for s in "ab"]
    q = Query(
        datetime.fromtimestamp(START, UTC),
        datetime.fromtimestamp(DAYS[3] + 86400, UTC),
        "day",
        ZoneInfo("UTC"),
        by_subject=True,
    )
    windows = [(q.start + timedelta(days=i), q.start + timedelta(days=i + 1)) for i in range(n)]
    merged = PageMerge(q, meter, feeds)
    read = sum(merged.add("day", *p) for p in (before, month, month_b))
    if hours:
        read += sum(merged.add("hour", *p) for p in day_pages)
    assert read == 2 * len(feeds)  # (every window fed, none other)
    rows = asyncio.run(merged.result(windows))

    expected: dict[int, Acc] = {}
    for (level, start), index in sorted(feeds.items(), key=lambda kv: (kv[0][0] != "day", kv)):
        acc = expected.setdefault(index, Acc())
        for i, (number, key) in enumerate(events[start] if level == "day" else hours[start]):
            fold(acc, number, key, start * 1000 + i, start + i)
    result = AGGREGATIONS[aggregation].result
    assert [(r.windowStart, r.subject, r.value) for r in rows] == [
        (windows[i][0], s, result(expected[i])) for i in sorted(expected) for s in "ab"
    ]


def test_float_sums_add_in_the_order_the_windows_are_stored() -> None:
    """A sum of floats is added window after window in the page's order, pages in the order
    read, as merging each window adds it: the same last bit (a compensated or reordered sum
    differs: 0.1 + 0.2 + 0.3 is not 0.3 + 0.2 + 0.1)."""
    import asyncio
    from zoneinfo import ZoneInfo

    from kloudmeter_py.core.query import PageMerge, Query

    numbers = [0.1, 0.2, 0.3, 1e16, 1.0, -1e16, 0.7]
    meter = _meter("sum")
    pages = []
    for p, chunk in enumerate([numbers[:4], numbers[4:]]):
        windows = {}
        for i, number in enumerate(chunk):
            acc = Acc()
            fold(acc, number, None, START * 1000, 1)
            windows[DAYS[i] if p == 0 else START - 86400 * (i + 1)] = acc
        pages.append((f"m.a.{page_token(86400, START - 86400 * p * 31)}", windows))
    feeds = {("day", s): 0 for _, windows in pages for s in windows}
    q = Query(
        datetime.fromtimestamp(START - 86400 * 40, UTC),
        datetime.fromtimestamp(START + 86400 * 4, UTC),
        "month",
        ZoneInfo("UTC"),
        by_subject=True,
    )
    merged = PageMerge(q, meter, feeds)
    for key, windows in pages:
        merged.add("day", key, encode_page(windows, 900, 7))
    (row,) = asyncio.run(merged.result([(q.start, q.end)]))
    expected = 0
    for _, windows in pages:
        for start in sorted(windows):  # (a page is stored in window order)
            expected += windows[start].sum
    assert row.value == expected
    assert row.value != sum(sorted(numbers))  # (the order matters for these numbers)


@pytest.mark.parametrize(
    ("indexes", "index", "picked"),
    [
        ([0, 0, 0], 0, ["a", "b", "c"]),  # one row: every window
        ([None, 2, 2], 2, ["b", "c"]),  # one row and a window not read
        ([1, None, 1], 1, ["a", "c"]),
        ([None, None], None, []),  # nothing read
        ([0, 1, 1], None, []),  # two rows
        ([0, None, 1], None, []),
        ([], None, []),
    ],
)
def test_one_row_names_the_row_all_read_windows_feed(
    indexes: list[int | None], index: int | None, picked: list[str]
) -> None:
    from kloudmeter_py.core.query import one_row

    assert one_row(indexes, ["a", "b", "c"][: len(indexes)]) == (index, picked)


def _sorted_keys(keys: list[tuple[int, str | None, tuple[str | None, ...]]]) -> list[object]:
    """Rows' keys ordered as a plain sort of them does, None as "" when it cannot."""
    out = list(keys)
    try:
        out.sort()  # type: ignore[arg-type]
    except TypeError:
        out.sort(key=lambda k: (k[0], k[1] or "", tuple(g or "" for g in k[2])))
    return out


ROW_KEYS = [
    ("by subject", True, [(1, "b", ()), (0, "b", ()), (1, "a", ()), (0, "c", ()), (0, "a", ())]),
    ("by group", False, [(1, None, ("us",)), (0, None, ("eu",)), (0, None, ("us",))]),
    (
        "subject and groups",
        True,
        [(0, "b", ("x", "1")), (0, "a", ("y", "0")), (0, "a", ("x", "2")), (1, "a", ("x", "1"))],
    ),
    ("a None group", False, [(0, None, ("us",)), (0, None, (None,)), (1, None, ("eu",))]),
    ("a None group, other rows", True, [(1, "b", (None,)), (0, "a", ("eu",)), (0, "b", ("us",))]),
    ("a None subject", True, [(0, "b", ()), (0, None, ()), (0, "", ()), (1, None, ())]),
    ("every subject None", True, [(1, None, ("b",)), (0, None, ("b",)), (0, None, ("a",))]),
    ("one row", True, [(3, "a", ())]),
    ("none", True, []),
]


@pytest.mark.parametrize(("name", "split", "keys"), ROW_KEYS, ids=[c[0] for c in ROW_KEYS])
def test_rows_come_in_the_order_a_sort_of_their_keys_gives(
    name: str, split: bool, keys: list[tuple[int, str | None, tuple[str | None, ...]]]
) -> None:
    """Window, then subject, then groups, sorted part by part: the order of one sort of the
    keys, None as "" where a None meets a text."""
    from kloudmeter_py.core.query import row_order

    assert row_order(keys, split=split) == _sorted_keys(keys)
