"""Round planning (core.plan) from tables, with no server: which windows an event falls in and
whether they are kept, which keys a round changes, and what a key's state becomes."""

from typing import Any

import pytest

from kloudmeter_py.core import rounds
from kloudmeter_py.core.aggregate import Acc
from kloudmeter_py.core.models import Event
from kloudmeter_py.core.plan import (
    KeyState,
    Series,
    apply,
    exact_items,
    fold_rows,
    kept_windows,
    spread,
)
from kloudmeter_py.core.summaries import page_token
from tests.helpers import compiled_meter

NOW = 1_764_676_800  # 2025-12-02T12:00:00Z
# minute (store 1), hour (2), day (3): kept for 2 h, 2 days, 400 days after they close
LEVELS = [(1, 60, NOW - 7200), (2, 3600, NOW - 172800), (3, 86400, NOW - 400 * 86400)]


_meter = compiled_meter


def _row(seq: int, at: int, subject: str = "s", **data: Any) -> tuple[str, int, int, Event]:
    return (
        f"msg{seq}",
        seq,
        at * 1000,
        Event(id=f"e{seq}", eventType="t", subject=subject, data=data),
    )


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        # now: a minute, an hour and a day window
        (NOW, [(1, NOW, 60), (2, NOW, 3600), (3, NOW - 43200, 86400)]),
        # 1 h 59 min ago: its minute window still ends inside the 2 h
        (NOW - 7140, [(1, NOW - 7140, 60), (2, NOW - 7200, 3600), (3, NOW - 43200, 86400)]),
        # 2 h ago exactly: its minute window ended 1 min before the edge: gone
        (NOW - 7260, [(2, NOW - 10800, 3600), (3, NOW - 43200, 86400)]),
        # 3 days ago: a day window only
        (NOW - 3 * 86400, [(3, NOW - 43200 - 3 * 86400, 86400)]),
        # 500 days ago: too old for every level
        (NOW - 500 * 86400, []),
    ],
)
def test_kept_windows(at: int, expected: list[tuple[int, int, int]]) -> None:
    """Each level's window holding the time, while the level still keeps it."""
    assert kept_windows(at, LEVELS) == expected


def test_fold_rows_folds_per_series_and_finest_window_and_fails_exactly_the_bad_events() -> None:
    """Events of one subject and minute fold together; an event a sum meter cannot use fails
    for it alone (the count meter still counts it); events before a meter's start are not its."""
    count = _meter("count")
    total = _meter("sum", groupBy={"r": "$.r"})
    late_meter = _meter("count", id="late", startSeq=2)
    series: Series = {}
    rows = [
        _row(1, NOW, v=2, r="eu"),
        _row(2, NOW + 1, v="x", r="eu"),
        _row(3, NOW + 2, v=5, r="us"),
        _row(4, NOW - 3600, v=7, r="eu"),
    ]
    failures = fold_rows(series, rows, {"t": [count, total, late_meter]}, 60)
    assert failures == [
        ("msg2", 2, "sum", "valueProperty $.v: expected a number or numeric string, got 'x'")
    ]
    got = {
        (key, bucket): (p.acc.count, p.acc.sum, p.first_seq, p.last_seq)
        for (key, bucket), p in series.items()
    }
    assert got == {
        ("count.s", NOW // 60): (3, 0, 1, 3),
        ("count.s", (NOW - 3600) // 60): (1, 0, 4, 4),
        ("sum.s.eu", NOW // 60): (1, 2, 1, 1),
        ("sum.s.us", NOW // 60): (1, 5, 3, 3),
        ("sum.s.eu", (NOW - 3600) // 60): (1, 7, 4, 4),
        ("late.s", NOW // 60): (1, 0, 3, 3),
        ("late.s", (NOW - 3600) // 60): (1, 0, 4, 4),
    }


def test_spread_names_the_reading_and_each_kept_page_once() -> None:
    """Two minutes of one hour and a day before make one reading key, a minute page (the hour;
    a day ago is past the minutes kept), two hour pages (days) and one day page (the month);
    a part too old for every level
    changes only its reading and is counted late there."""
    count = _meter("count")
    series: Series = {}
    rows = [_row(1, NOW), _row(2, NOW + 60), _row(4, NOW - 86400), _row(3, NOW - 500 * 86400)]
    fold_rows(series, rows, {"t": [count]}, 60)
    work = spread(series, LEVELS, 60)
    got = {k: (w.first_seq, w.last_seq, w.events, w.width) for k, w in work.items()}
    assert got == {
        (0, "count.s"): (1, 4, 4, 0),
        (1, "count.s.2025-12-02T12"): (1, 2, 2, 60),
        (2, "count.s.2025-12-02"): (1, 2, 2, 3600),
        (2, "count.s.2025-12-01"): (4, 4, 1, 3600),
        (3, "count.s.2025-12"): (1, 4, 3, 86400),
    }
    assert [p.late for p in work[(0, "count.s")].parts] == [0, 0, 0, 1]
    assert page_token(86400, NOW) == "2025-12"


@pytest.mark.parametrize(
    ("parts", "first", "last", "events", "rebuild"),
    [
        ([(11, 12, 2, False)], 11, 12, 2, False),
        ([(11, 12, 2, False), (5, 30, 3, False)], 5, 30, 5, False),
        ([(11, 40, 2, False), (20, 21, 1, True), (9, 9, 1, False)], 9, 40, 4, True),
    ],
)
def test_key_work_spans_its_parts(
    parts: list[tuple[int, int, int, bool]], first: int, last: int, events: int, rebuild: bool
) -> None:
    """A key's work (core.plan.KeyWork) reads from its parts the seqs they span, their events
    and whether one is a rebuild; a key of one part holds it alone (no list)."""
    from kloudmeter_py.core.plan import KeyWork, Part

    cm = _meter("count")
    made = [Part(cm, "s", (), Acc(), f, 0, lst, n, rebuild=r) for f, lst, n, r in parts]
    kw = KeyWork(made[0], 86400, 7)
    for part in made[1:]:
        kw.add(part)
    assert (kw.first_seq, kw.last_seq, kw.events, kw.rebuild) == (first, last, events, rebuild)
    assert list(kw.parts) == made and (kw.meter, kw.subject, kw.groups) == (cm, "s", ())
    assert (kw.width, kw.oldest) == (86400, 7)
    assert isinstance(kw.parts, tuple) == (len(made) == 1)


def test_apply_folds_each_part_into_its_window_of_the_page() -> None:
    """A page keeps one state per window; windows the level no longer keeps are dropped
    from it when it is written."""
    from kloudmeter_py.core.plan import CLOSED, empty_state, open_page

    count = _meter("count")
    series: Series = {}
    rows = [_row(1, NOW), _row(2, NOW + 60), _row(3, NOW + 61), _row(4, NOW - 86400)]
    fold_rows(series, rows, {"t": [count]}, 60)
    work = spread(series, LEVELS, 60)
    items = exact_items([(r[1], r[2], r[3]) for r in rows], {"t": [count]}, LEVELS)
    page = (1, "count.s.2025-12-02T12")
    state = empty_state(1, 0, 0)
    open_page(state)[NOW - 8000] = Acc()  # expired (ends more than 2 h ago)
    assert apply(page, work[page], state, 10, lambda: items) == (True, [])
    assert {s: a.count for s, a in state.windows.items()} == {NOW: 1, NOW + 60: 2}
    month = (3, "count.s.2025-12")
    state = empty_state(3, 0, 0)
    state.last_seq = 2  # holds 1 and 2 already: 3 and 4 are folded one by one
    open_page(state)[NOW - 43200] = Acc()
    open_page(state)[NOW - 43200].count = 2
    assert apply(month, work[month], state, 10, lambda: items) == (True, [])
    assert state.windows is not None
    assert {s: a.count for s, a in state.windows.items()} == {
        NOW - 43200: 3,
        NOW - 43200 - 86400: 1,
    }
    assert state.last_seq == 4
    # Empty and closed pages share one dict until they are opened: it stays empty.
    assert CLOSED == {}
    fresh = empty_state(3, 0, 0)
    assert fresh.windows is CLOSED and fresh.acc is empty_state(2, 0, 0).acc
    assert open_page(fresh) is not CLOSED


def test_a_closed_page_opens_into_windows_of_its_own() -> None:
    """Folding into a page closed after a write changes that page only."""
    from kloudmeter_py.core.plan import CLOSED, close_page, empty_state, open_page
    from kloudmeter_py.core.summaries import as_acc, encode_page

    count = _meter("count")
    series: Series = {}
    fold_rows(series, [_row(1, NOW), _row(2, NOW + 60)], {"t": [count]}, 60)
    work = spread(series, LEVELS, 60)
    page = (1, "count.s.2025-12-02T12")
    a, b = empty_state(1, 0, 0), empty_state(1, 0, 0)
    assert apply(page, work[page], a, 10, dict) == (True, [])
    assert a.windows is not None
    close_page(a, encode_page(a.windows, a.last_seq, 0, None))
    assert a.windows is CLOSED and a.raw is not None
    windows = open_page(a)
    assert {s: as_acc(w).count for s, w in windows.items()} == {NOW: 1, NOW + 60: 1}
    assert a.raw is None and CLOSED == {}
    assert open_page(b) == {}


def _state(last_seq: int = 0, count: int = 0, replayed: list[int] | None = None) -> KeyState:
    acc = Acc()
    acc.count = count
    return KeyState(acc, last_seq, 5, 0, replayed)


@pytest.mark.parametrize(
    ("state", "changed", "count", "last_seq"),
    [
        (_state(), True, 3, 13),  # new key: the parts merged at once
        (_state(last_seq=9, count=4), True, 7, 13),  # written before the round: merged
        (_state(last_seq=13, count=3), False, 3, 13),  # the round is in it already
        (_state(last_seq=11, count=2), True, 4, 13),  # holds 11: 12 and 13 folded
        (_state(last_seq=9, count=4, replayed=[12]), True, 6, 13),  # 12 replayed before
    ],
)
def test_apply_folds_only_what_is_new(
    state: KeyState, changed: bool, count: int, last_seq: int
) -> None:
    """Whatever the stored state already holds (by lastSeq or as a replayed dead letter) is
    not folded again."""
    series: Series = {}
    rows = [_row(11, NOW), _row(12, NOW + 1), _row(13, NOW + 2)]
    fold_rows(series, rows, {"t": [_meter("count")]}, 60)
    work = spread(series, LEVELS, 60)
    items = exact_items([(r[1], r[2], r[3]) for r in rows], {"t": [_meter("count")]}, LEVELS)
    got = apply((0, "count.s"), work[(0, "count.s")], state, 10, lambda: items)
    assert got == (changed, [])
    assert (state.acc.count, state.last_seq) == (count, last_seq)


def test_apply_fails_the_values_past_a_unique_limit_and_keeps_the_rest() -> None:
    """A unique reading at its limit takes the events with known values and fails the new
    value past the limit (to be dead-lettered); windows have no limit of their own."""
    users = _meter("unique")
    rows = [_row(1, NOW, v="a"), _row(2, NOW, v="b"), _row(3, NOW, v="a"), _row(4, NOW, v="c")]
    series: Series = {}
    fold_rows(series, rows, {"t": [users]}, 60)
    work = spread(series, LEVELS, 60)
    items = exact_items([(r[1], r[2], r[3]) for r in rows], {"t": [users]}, LEVELS)
    state = _state()
    changed, failures = apply((0, "unique.s"), work[(0, "unique.s")], state, 2, lambda: items)
    assert changed and [(seq, meter) for seq, meter, _ in failures] == [(4, "unique")]
    assert state.acc.distinct == {"a", "b"} and state.last_seq == 4
    window = (1, f"unique.s.{page_token(60, NOW)}")
    window_state = _state()
    window_state.windows = {}
    assert apply(window, work[window], window_state, 2, lambda: items) == (True, [])
    assert window_state.windows[NOW].distinct == {"a", "b", "c"}


@pytest.mark.parametrize(
    ("events", "parts", "limit"),
    [
        (50_000, 5_000, 50_000),  # live: many events per part, rounds stay METER_BATCH_SIZE
        (50_000, 150_000, 3_333),  # wide: three parts an event, rounds of 3,333
        (3_333, 10_000, 3_333),  # and they stay there (no flip-flop back to 50,000)
        (10_000, 3_000_000, 1_000),  # never below 1,000
        (0, 0, 50_000),
    ],
)
def test_round_limit_follows_the_parts_events_make(events: int, parts: int, limit: int) -> None:
    """A round's memory is bounded by its parts, not its events; never above the batch size."""

    assert rounds.round_limit(50_000, events, parts) == limit
    assert rounds.round_limit(300, events, parts) == min(300, limit)


@pytest.mark.parametrize(
    ("bytes_per_event", "room", "limit"),
    [
        (0, 32 << 20, 3_333),  # nothing known yet: by parts only
        (16_000, 32 << 20, 2_097),  # 16 KB of key states an event: what fits in 32 MB
        (100, 32 << 20, 3_333),  # small states: by parts
        (1 << 20, 32 << 20, 1_000),  # never below 1,000
    ],
)
def test_round_limit_keeps_a_rounds_key_states_in_the_cache(
    bytes_per_event: int, room: int, limit: int
) -> None:
    """A round's key states are held until written: the round is sized so they fit."""

    assert rounds.round_limit(50_000, 25_000, 75_000, bytes_per_event, room) == limit


@pytest.mark.parametrize(
    ("events", "parts", "fresh", "limit"),
    [
        (3_333, 10_000, 0.0, 3_333),  # nothing known yet: by parts only
        (3_333, 10_000, 3.3, 1_000),  # wide, 10,000 subjects: ~11,000 fresh keys a round
        (3_333, 10_000, 1.5, 2_000),  # one partition at a time: ~5,000 fresh a round
        (3_333, 10_000, 0.7, 3_333),  # wide, 1,000 subjects: by parts
        (35_000, 5_000, 0.0, 50_000),  # live: the keys of the round before, none fresh
        (35_000, 5_000, 0.05, 50_000),  # live, a new minute's pages
    ],
)
def test_round_limit_holds_a_rounds_fresh_keys_near_3000(
    events: int, parts: int, fresh: float, limit: int
) -> None:
    """Keys the round before did not touch are what a round adds to a worker's memory: a
    round is sized so that about 3,000 of them are new to it; keys touched again do not
    count, so that rounds over a few keys stay large however many keys they touch."""

    assert rounds.ROUND_FRESH == 3_000
    assert rounds.round_limit(50_000, events, parts, fresh=fresh) == limit


def _wkeys(names: str) -> dict[tuple[int, str], None]:
    return {(0, name): None for name in names}


@pytest.mark.parametrize(
    ("steps", "counted", "limit"),
    [
        # (keys a round writes, its events, bytes of pages it parked) in turn; then how many
        # rounds were counted and the next round's limit (batch 50,000, 3,333 events that
        # made 10,000 parts: 3,333 by parts alone; room 1,000,000 bytes)
        ([("abc", 3, 0)], 0, 3_333),  # a runner's first round: every key new, not counted
        ([("abc", 3, 0), ("abcd", 1, 0)], 1, 3_000),  # 1 fresh an event: 3,000 / 1
        ([("abc", 2, 0), ("defg", 2, 0)], 1, 1_500),  # 2 fresh an event: 3,000 / 2
        ([("abc", 2_000, 0), ("defg", 2_000, 0)], 1, 3_333),  # 4 fresh of 2,000: by parts
        ([("abc", 2, 0), ("abcdefgh", 1, 0)], 1, 1_000),  # 5 fresh of 1: 600, at least 1,000
        ([("abc", 10, 0), ("", 10, 0), ("abc", 10, 0)], 1, 3_333),  # none after no keys
        ([("abc", 10, 0), ("abc", 10, 0), ("abc", 10, 0)], 2, 3_333),  # live: none fresh
        ([("abc", 1_000, 600_000)], 0, 1_663),  # pages of ~601 bytes an event: 1,000,000/601
    ],
)
def test_a_runners_rounds_size_the_next_from_their_fresh_keys_and_pages(
    steps: list[tuple[str, int, int]], counted: int, limit: int
) -> None:
    """What a runner's rounds tell of the next one (core.rounds.Sizer): the keys each round
    writes that the round before did not, per event, from its second round on (a round that
    writes no key is counted, and the one after it is not); and the bytes of the pages it
    parked, per event. The next round's limit follows (round_limit)."""
    sizes = rounds.Sizer()
    for names, events, held in steps:
        sizes.touching(_wkeys(names), events)
        sizes.stored(held, events)
    assert sizes.counted == counted
    assert sizes.limit(50_000, 3_333, 10_000, 1_000_000) == limit


@pytest.mark.parametrize(
    ("steps", "limit"),
    [
        # (keys a round writes, its events, keys the runner holds before its write, whether
        # it has outgrown its key store by then) in turn; then the next round's limit (as
        # above: 3,333 by parts alone)
        ([("abc", 2, "", False), ("defg", 2, "abc", False)], 1_500),  # 4 new keys: 3,000 / 2
        ([("abc", 2, "", False), ("defg", 1, "abcdef", False)], 3_000),  # d, e, f held: 1 new
        ([("abc", 2, "", False), ("defg", 2, "abcdefg", False)], 3_333),  # all held: parts
        ([("abc", 2, "", False), ("defg", 2, "abcdefg", True)], 1_500),  # outgrown: 4 fresh
        # once outgrown, always: held keys count again from then on
        ([("ab", 2, "", True), ("abc", 1, "abc", False), ("cdef", 2, "abcdef", False)], 2_000),
    ],
)
def test_a_runner_that_holds_every_key_it_touched_counts_only_new_keys_fresh(
    steps: list[tuple[str, int, str, bool]], limit: int
) -> None:
    """Until a runner has outgrown its key store (a spill, or its cache let go at a turn),
    a key it holds is not fresh, though the round before did not touch it: a worker that
    holds every key it has met (the live shape) lets its rounds grow as soon as most keys
    are met. After that every key the round before did not touch counts, held or not."""
    sizes = rounds.Sizer()
    for names, events, held, outgrown in steps:
        if outgrown:
            sizes.outgrow()
        holds = set(_wkeys(held))
        sizes.touching(_wkeys(names), events, holds.__contains__)
    assert sizes.limit(50_000, 3_333, 10_000, 1_000_000) == limit


@pytest.mark.parametrize(
    ("rounds_at", "heavy"),
    [
        # (events, began to gather, gathered) per round: whether the last one is heavy
        ([(2_000, 0.0, 0.1)], True),  # 2,000 in 0.1 s since the start: 20,000 a second
        ([(500, 0.0, 0.1)], False),  # 5,000 a second
        ([(1_000, 0.0, 0.02)], True),  # 0.02 s counts as the linger (0.1): 1,000 / 0.1
        ([(500, 0.0, 0.02)], False),  # 500 / 0.1
        ([(2_000, 0.0, 0.1), (2_000, 0.1, 1.1)], False),  # 2,000 since the last began: 1.1 s
        ([(2_000, 5.0, 5.1), (2_500, 5.1, 5.2)], True),  # since the last began (0.2 s)
        ([(2_000, 5.0, 5.1), (2_500, 5.15, 5.3)], False),  # 0.3 s since it began, not 0.2
    ],
)
def test_a_runners_rounds_are_heavy_by_their_rate_since_the_round_before_began(
    rounds_at: list[tuple[int, float, float]], heavy: bool
) -> None:
    """A round's events came at core.rounds.HEAVY a second or more, counted from when the
    round before began to gather (when the runner last took what had arrived), over at
    least the linger; ``heavy`` keeps the last answer."""
    sizes = rounds.Sizer()
    got = False
    for events, started, now in rounds_at:
        got = sizes.begun(events, started, now, 0.1)
    assert got is heavy and sizes.heavy is heavy


@pytest.mark.parametrize(
    ("marked", "keys", "bits", "unmarked"),
    [
        ([1, 2, 3], [1, 2, 3], 1 << 19, 0),  # the round again: nothing fresh
        ([1, 2, 3], [4, 5], 1 << 19, 2),  # other keys: all fresh
        ([1, 2, 3], [3, 4, 2, 5], 1 << 19, 2),
        ([], [1, 2], 1 << 19, 2),
        ([1, 2, 3], [9, 12, 13], 8, 2),  # 9 falls on 1's bit (9 & 7): taken as marked
        ([(1, "m.acme.2026-11"), (0, "m.acme")], [(1, "m.acme.2026-11"), (0, "m.acme")], 64, 0),
    ],
)
def test_key_marks_count_the_keys_a_round_did_not_touch(
    marked: list[object], keys: list[object], bits: int, unmarked: int
) -> None:
    """A round's keys as bits (core.plan.KeyMarks): the next round's keys without a mark are
    its fresh keys (rounds.round_limit); two keys on one bit count as one."""
    from kloudmeter_py.core.plan import KeyMarks

    assert KeyMarks(marked, bits).unmarked(keys) == unmarked
    # and with a predicate of the keys held, those without a mark that are not held
    held = {k for k in keys if k not in marked}
    assert KeyMarks(marked, bits).unmarked(keys, held.__contains__) == 0
    assert KeyMarks(marked, bits).unmarked(keys, lambda _: False) == unmarked


def test_key_marks_undercount_by_their_collisions_only() -> None:
    """At the wide bench shape's size (~10,000 keys a round) on 2**19 bits, about 2% of
    another round's keys fall on a marked bit: the fresh count is off by about that much."""
    from kloudmeter_py.core.plan import MARK_BITS, KeyMarks

    def keys(name: str) -> list[tuple[int, str]]:
        return [(i % 4, f"{name}.subject-{i}") for i in range(10_000)]

    marks = KeyMarks(keys("count"))
    assert marks.unmarked(keys("count")) == 0
    assert 9_600 <= marks.unmarked(keys("sum")) <= 10_000
    assert MARK_BITS == 1 << 19 and len(marks.bits) == 64 << 10


@pytest.mark.parametrize(
    ("rounds", "touched"),
    [
        ([[]], {}),
        # readings only: one subject per meter that folds it, pages add nothing
        ([[("acme", NOW)]], {"count": {"acme"}, "sum": {"acme"}}),
        # a month ago (day pages only), another subject
        (
            [[("acme", NOW), ("globex", NOW - 30 * 86400)]],
            {"count": {"acme", "globex"}, "sum": {"acme", "globex"}},
        ),
        # rounds add to what the rounds before touched, each subject once
        (
            [[("acme", NOW)], [("acme", NOW + 60), ("initech", NOW)]],
            {"count": {"acme", "initech"}, "sum": {"acme", "initech"}},
        ),
    ],
)
def test_touch_subjects_names_each_meter_and_subject_a_round_folds_into(
    rounds: list[list[tuple[str, int]]], touched: dict[str, set[str]]
) -> None:
    """The (meter, subject) pairs kept for the alert check (core.plan.touch_subjects) as
    subjects per meter: those of the readings a round's work folds into, across rounds."""
    from kloudmeter_py.core.plan import touch_subjects

    count, total = _meter("count"), _meter("sum")
    got: dict[str, set[str]] = {}
    seq = 0
    for rnd in rounds:
        series: Series = {}
        rows = []
        for subject, at in rnd:
            seq += 1
            rows.append(_row(seq, at, subject, v=1))
        fold_rows(series, rows, {"t": [count, total]}, 60)
        touch_subjects(got, spread(series, LEVELS, 60))
    assert got == touched


def test_touch_subjects_keeps_one_string_for_a_subject_a_round_names_for_two_meters() -> None:
    """A round names a subject with one string for all its meters' parts: the sets share it."""
    from kloudmeter_py.core.plan import touch_subjects

    count, total = _meter("count"), _meter("sum")
    series: Series = {}
    fold_rows(series, [_row(1, NOW, "".join(["ac", "me"]), v=1)], {"t": [count, total]}, 60)
    got: dict[str, set[str]] = {}
    touch_subjects(got, spread(series, LEVELS, 60))
    (a,), (b,) = got["count"], got["sum"]
    assert a == "acme" and a is b


def test_a_key_marked_dirty_again_is_held_by_its_latest_string() -> None:
    """A key deferred again by a later round (core.plan.mark_dirty, mark_dirty_page) is held
    by that round's string, the one its packed reading or parked page is kept under, not by
    the first round's equal one: one string a key alive, not two."""
    from kloudmeter_py.core.plan import mark_dirty, mark_dirty_page

    first, later = "".join(["count.", "acme"]), "".join(["count.ac", "me"])
    assert first == later and first is not later
    dirty: dict[str, str] = {}
    mark_dirty(dirty, first, "generation 1")
    mark_dirty(dirty, later, "generation 2")
    ((held, meter),) = dirty.items()
    assert held is later and meter == "generation 2"

    pages: set[str] = set()
    mark_dirty_page(pages, first)
    mark_dirty_page(pages, later)
    (page,) = pages
    assert page is later


@pytest.mark.parametrize(
    ("events", "subjects", "first_subjects", "gathered"),
    [
        (250, 250, 400, False),  # the first round, wide: still gathering
        (420, 400, 400, True),  # its events name 400 subjects: it ends there
        (500, 480, 400, True),  # (a take of 250 can pass the mark)
        (4_999, 399, 400, False),  # fewer subjects than that: to 5,000 events
        (5_000, 399, 400, True),
        (4_999, 4_999, 0, False),  # later rounds: by events only
        (5_000, 4_999, 0, True),
    ],
)
def test_a_first_round_ends_at_5000_events_or_400_subjects(
    events: int, subjects: int, first_subjects: int, gathered: bool
) -> None:
    """A consumer's first round, whose parts an event are not yet known, is bounded by the
    subjects its events name as well as by its events (rounds.FIRST_SUBJECTS); later
    rounds by their limit (rounds.round_limit) only."""

    assert (rounds.FIRST_ROUND, rounds.FIRST_SUBJECTS) == (5_000, 400)
    assert rounds.gathered(events, subjects, 5_000, first_subjects) is gathered


@pytest.mark.parametrize(
    ("events", "since", "heavy"),
    [
        (20_000, 1.0, True),  # the live burst, ~20,000 events a second a worker
        (2_500, 1.0, False),  # the lag phase, 2,500 a second a worker
        (1_500, 0.1, True),  # 15,000 a second over the linger
        (900, 0.01, False),  # a moment is counted as the linger (0.1 s): 9,000 a second
        (20_000, 60.0, False),  # a round after an idle minute
    ],
)
def test_a_heavy_stream_is_one_of_10000_events_a_second(
    events: int, since: float, heavy: bool
) -> None:

    assert rounds.is_heavy(events, since, 0.1) is heavy


@pytest.mark.parametrize(
    ("gathered", "backlog", "heavy", "wait"),
    [
        (0.0, False, False, 0.1),  # a light stream lingers 0.1 s
        (0.1, False, False, 0.0),  # ... and no more
        (0.3, True, False, 0.7),  # a backlog: up to METER_FLUSH_MS (1 s)
        (0.3, True, True, 0.7),
        (0.3, False, True, 0.1),  # a heavy stream: 0.1 s at a time, ended by a pause
        (0.95, False, True, 0.05),  # ... and never past METER_FLUSH_MS
        (1.2, False, True, -0.2),
    ],
)
def test_a_round_gathers_a_heavy_stream_until_it_pauses(
    gathered: float, backlog: bool, heavy: bool, wait: float
) -> None:

    got = rounds.gather_wait(gathered, backlog=backlog, heavy=heavy, flush_s=1.0, linger=0.1)
    assert got == pytest.approx(wait)


@pytest.mark.parametrize(
    ("gathered", "backlog", "heavy", "wait"),
    [
        (0.3, True, False, 0.7),  # the partition in hand has more: up to METER_FLUSH_MS
        (0.3, False, False, 0.0),  # it has delivered all it had: the next one, at once
        (0.0, False, True, 0.0),  # no linger either, even for a heavy stream
    ],
)
def test_a_round_ends_without_a_linger_while_other_partitions_wait_their_turn(
    gathered: float, backlog: bool, heavy: bool, wait: float
) -> None:

    got = rounds.gather_wait(
        gathered, backlog=backlog, heavy=heavy, flush_s=1.0, linger=0.1, others_behind=True
    )
    assert got == pytest.approx(wait)


@pytest.mark.parametrize(
    ("held", "packed", "spill_mb", "unheld", "lets_go"),
    [
        (0, 0, 12, 0, False),  # nothing held: kept (nothing to write)
        # under METER_SPILL_MB, the next round's keys held (one worker's next pass): kept
        ((12 << 20) - 1, 0, 12, 0, False),
        (12 << 20, 0, 12, 0, True),  # at it: written and let go at the turn
        (40 << 20, 0, 12, 0, True),
        ((5 << 20) - 1, (3 << 20) - 1, 12, 0, False),  # readings under a quarter of it: kept
        (5 << 20, 3 << 20, 12, 0, True),  # at a quarter: written and let go
        (0, 0, 0, 0, True),  # METER_SPILL_MB 0: always let go
        # Three quarters of it, and the next round's keys mostly to be read (of 100):
        (9 << 20, 0, 12, 51, True),  # the next partition's keys come on top: let go
        (9 << 20, 0, 12, 50, False),  # half of them held: a partition seen before, kept
        ((9 << 20) - 1, 0, 12, 100, False),  # under three quarters: kept
    ],
)
def test_a_runner_lets_its_keys_go_at_a_turn_only_when_they_are_many(
    held: int, packed: int, spill_mb: int, unheld: int, lets_go: bool
) -> None:

    assert rounds.lets_go(held, packed, spill_mb, unheld=unheld, keys=100) is lets_go


@pytest.mark.parametrize(
    ("parked", "packed", "spill_mb", "spills", "readings"),
    [
        (0, 0, 12, False, False),  # nothing held
        ((12 << 20) - 1, 0, 12, False, False),  # pages just under METER_SPILL_MB: kept
        (12 << 20, 0, 12, True, False),  # at it: the pages written and let go
        # pages and readings together at it: the pages go, the readings (a quarter) stay
        (9 << 20, 3 << 20, 12, True, False),
        ((9 << 20) - 1, 3 << 20, 12, False, False),  # together just under it: kept
        (6 << 20, 6 << 20, 12, True, True),  # readings half of it: they go too
        (0, 12 << 20, 12, True, True),  # readings alone
        ((6 << 20) + 1, (6 << 20) - 1, 12, True, False),  # readings just under half
        (0, 0, 0, True, True),  # METER_SPILL_MB 0: after every round, both
    ],
)
def test_a_runner_behind_writes_and_lets_go_what_it_holds_past_the_spill_bound(
    parked: int, packed: int, spill_mb: int, spills: bool, readings: bool
) -> None:

    assert rounds.spills(parked, packed, spill_mb) == (spills, readings)


@pytest.mark.parametrize(
    ("dirty", "waited", "pending", "heavy", "behind", "full", "due"),
    [
        (False, 0.0, 5000, True, True, False, True),  # nothing deferred: checkpoint now
        (True, 0.5, 0, False, False, False, False),  # caught up, within METER_FLUSH_MS
        (True, 1.0, 0, False, False, False, True),  # caught up, METER_FLUSH_MS passed
        (True, 0.2, 0, False, True, False, True),  # a backlog just cleared
        (True, 5.0, 0, True, False, False, False),  # keeping up with a heavy stream
        (True, 0.2, 0, True, True, False, False),  # heavy: not even after a backlog
        (True, 5.0, 3, False, False, False, False),  # events left waiting
        (True, 30.0, 3, True, False, False, True),  # METER_SUMMARY_FLUSH_MS passed
        (True, 0.0, 3, True, False, True, True),  # the cache is full
    ],
)
def test_when_deferred_keys_are_flushed(
    dirty: bool, waited: float, pending: int, heavy: bool, behind: bool, full: bool, due: bool
) -> None:

    got = rounds.flush_due(
        dirty=dirty,
        waited=waited,
        pending=pending,
        heavy=heavy,
        behind=behind,
        cache_full=full,
        flush_s=1.0,
        summary_flush_s=30.0,
    )
    assert got is due


def test_rollups_sum_a_partitions_subjects_per_group_and_replay_exactly() -> None:
    """With partitions, each part also changes its partition's rollup page (per group values)
    at every level that keeps its window: subjects of one partition share it, a unique meter
    has none, and a too-old part none either. Folded event by event (a replay), a rollup page
    holds what folding the parts gives, and skips what its lastSeq covers."""
    from kloudmeter_py.core.keys import subject_partition
    from kloudmeter_py.core.plan import empty_state

    total = _meter("sum", groupBy={"r": "$.r"})
    users = _meter("unique", id="users", value="$.u")
    by_type = {"t": [total, users]}
    subjects = ["a", "b", "c", "d", "e", "f"]
    part_of = {s: subject_partition(s, 2) for s in subjects}
    assert set(part_of.values()) == {0, 1}
    rows = [
        _row(i + 1, NOW - 60 * (i % 3), subject=s, v=i + 1, r="eu" if i < 6 else "us", u=str(i))
        for i, s in enumerate(subjects * 2)
    ]
    rows.append(_row(13, NOW - 500 * 86400, subject="a", v=100, r="eu", u="x"))
    series: Series = {}
    fold_rows(series, rows, by_type, 60)
    work = spread(series, LEVELS, 60, partitions=2)
    rollups = {k: w for k, w in work.items() if "/all" in k[1]}
    # Per level: one page per partition and region; none for the unique meter.
    assert sorted(k for k in rollups if k[0] == 3) == sorted(
        (3, f"sum/all.{p}.{r}.2025-12") for p in (0, 1) for r in ("eu", "us")
    )
    expected: dict[tuple[int, str], int] = {}
    for *_, event in rows[:-1]:
        p, r = part_of[event.subject], event.data["r"]
        expected[(p, r)] = expected.get((p, r), 0) + event.data["v"]
    items = exact_items([(r[1], r[2], r[3]) for r in rows], by_type, LEVELS, 2)
    for (p, r), want in expected.items():
        wkey = (3, f"sum/all.{p}.{r}.2025-12")
        merged = empty_state(3, 0, 0)
        assert apply(wkey, rollups[wkey], merged, 10, lambda: {}) == (True, [])
        assert merged.windows is not None
        assert sum(a.sum for a in merged.windows.values()) == want  # type: ignore[union-attr]
        # Event by event, after a crash that stored the page up to its second event.
        one_by_one = empty_state(3, 0, 0)
        assert one_by_one.windows is not None
        mine = items[wkey]
        first_two = [i for i in mine if i[0] <= mine[1][0]]
        one_by_one.last_seq = first_two[-1][0]
        assert apply(wkey, rollups[wkey], one_by_one, 10, lambda: items)[0]
        done = sum(a.sum for a in one_by_one.windows.values())  # type: ignore[union-attr]
        assert done == want - sum(i[2] or 0 for i in first_two)


@pytest.mark.parametrize(
    ("distinct", "page"),
    [({"a", "b", "c"}, False), (None, False), (set(), False), ({"a"}, True)],
    ids=["reading", "no-distinct", "empty", "page"],
)
def test_freeze_holds_a_readings_distinct_values_as_a_tuple_and_thaw_restores_them(
    distinct: set[str] | None, page: bool
) -> None:
    from kloudmeter_py.core.plan import freeze, thaw

    acc = Acc()
    acc.distinct = None if distinct is None else set(distinct)
    state = KeyState(acc, 5, 2, 0, windows={} if page else None)
    freeze(state)
    if distinct is None or page:  # nothing to freeze (a page folds into its windows)
        assert state.frozen is None and acc.distinct == distinct
    else:
        assert acc.distinct is None and state.frozen is not None
        assert sorted(state.frozen) == sorted(distinct)
    thaw(state)
    assert state.frozen is None and acc.distinct == distinct
    thaw(state)  # twice: nothing changes
    assert acc.distinct == distinct


def _acc(**values: Any) -> Acc:
    acc = Acc()
    for name, value in values.items():
        setattr(acc, name, value)
    return acc


@pytest.mark.parametrize(
    ("acc", "replayed", "late"),
    [
        (_acc(), None, 0),  # nothing folded yet
        (_acc(count=3, sum=7, min=1, max=4, first_at=1_700_000_000_000), None, 0),
        # floats stay floats and ints ints, -0.0 and big counts included
        (
            _acc(count=2**40, sum=-0.0, min=-1.5, max=2.25, latest=3, latest_at=9, latest_seq=8),
            [4],
            2,
        ),
        (_acc(count=1, sum=2**64 - 1, last_at=5), [1, 2], 0),
        (_acc(count=2, distinct={"a", "b"}), None, 1),
        (_acc(count=0, distinct=set()), None, 0),
    ],
    ids=["empty", "ints", "floats", "largest-int", "distinct", "no-distinct-yet"],
)
def test_a_packed_reading_unpacks_to_the_same_state(
    acc: Acc, replayed: list[int] | None, late: int
) -> None:
    from kloudmeter_py.core.plan import pack_reading, unpack_reading

    state = KeyState(acc, 123_456_789, 2**40 + 7, -1, replayed, late)
    packed = pack_reading(state)
    assert packed is not None
    back = unpack_reading(packed)
    assert back.acc == acc
    assert [type(getattr(back.acc, s)) for s in Acc.__slots__] == [
        type(getattr(acc, s)) for s in Acc.__slots__
    ]
    assert (back.last_seq, back.revision, back.meter_start_seq) == (123_456_789, 2**40 + 7, -1)
    assert (back.replayed, back.late, back.frozen, back.windows) == (replayed, late, None, None)


def test_a_frozen_reading_packs_its_distinct_values_and_a_sum_past_64_bits_does_not_pack() -> None:
    from kloudmeter_py.core.plan import freeze, pack_reading, unpack_reading

    state = KeyState(_acc(count=2, distinct={"x", "y"}), 5, 2, 0)
    freeze(state)
    packed = pack_reading(state)
    assert packed is not None and unpack_reading(packed).acc.distinct == {"x", "y"}
    assert pack_reading(KeyState(_acc(count=1, sum=2**64), 5, 2, 0)) is None


@pytest.mark.parametrize(
    ("pending", "current", "since", "focus", "waiting"),
    [
        ([0, 0], None, 0.0, None, ()),  # caught up: all together
        ([50_000, 5], None, 0.0, None, ()),  # one behind: all together, the other is live
        ([50_000, 30_000], None, 0.0, 0, (1,)),  # two behind: the first, the other waits
        ([50_000, 30_000], 0, 10.0, 0, (1,)),  # kept while behind
        ([50_000, 30_000], 1, 10.0, 1, (0,)),  # whichever it is on
        ([5_000, 30_000], 0, 10.0, 0, (1,)),  # kept until caught up, not only below 20,000
        ([999, 30_000], 0, 10.0, 1, ()),  # caught up: the next behind (the other is live)
        ([999, 10], 1, 10.0, None, ()),  # all caught up: all together
        ([50_000, 30_000], 0, 60.0, 1, (0,)),  # its slice is over: the next in turn
        ([50_000, 30_000], 1, 60.0, 0, (1,)),  # ... round again
        ([50_000, 10], 0, 60.0, 0, ()),  # slice over, but no other is behind: kept
        ([50_000, 30_000, 40_000], 0, 5.0, 0, (1, 2)),  # three behind
        ([50_000, 30_000, 40_000], 0, 30.0, 1, (0, 2)),  # two wait: half the slice each
        ([50_000, 30_000, 40_000], 2, 30.0, 0, (1, 2)),  # ... in turn
        ([500, 30_000, 40_000], 0, 5.0, 1, (2,)),  # caught up: the next behind
        ([50_000, 30_000, 10], 2, 5.0, 0, (1,)),  # the one on is live: the first behind
    ],
)
def test_a_runner_works_through_one_backlogged_partition_at_a_time(
    pending: list[int],
    current: int | None,
    since: float,
    focus: int | None,
    waiting: tuple[int, ...],
) -> None:

    got = rounds.focus(pending, current, since, at=20_000, release=1000, slice_s=60.0)
    assert got == (focus, frozenset(waiting))


@pytest.mark.parametrize(
    ("backlog", "merged", "focus", "partitions", "split"),
    [
        (0, False, None, 4, False),  # keeping up: one consumer
        (79_999, False, None, 4, False),  # under 20,000 a partition: one consumer
        (80_000, False, None, 4, True),  # 20,000 a partition: a consumer each
        (500_000, False, None, 1, False),  # one partition: one consumer whatever waits
        (50_000, True, 2, 4, True),  # split, working through one: stays split
        (500, True, 2, 4, True),  # ... while it works through one alone
        (5_000, True, None, 4, True),  # split, none alone, not caught up: stays split
        (999, True, None, 4, False),  # caught up: one consumer again
        (0, True, None, 4, False),
        (40_000, False, None, 2, True),  # the threshold grows with the partitions
    ],
)
def test_a_runner_of_every_partition_splits_its_consumer_while_behind(
    backlog: int, merged: bool, focus: int | None, partitions: int, split: bool
) -> None:

    got = rounds.split(
        backlog, merged=merged, focus=focus, partitions=partitions, at=20_000, release=1000
    )
    assert got is split


@pytest.mark.parametrize(
    ("backlog", "merged", "split"),
    [
        (300, True, True),  # 200 or more waiting: it would split again at once, so stays
        (199, True, False),  # under what it splits at: one consumer
        (199, False, False),  # ... and stays one
        (200, False, True),
    ],
)
def test_a_runner_of_every_partition_joins_only_below_where_it_splits(
    backlog: int, merged: bool, split: bool
) -> None:
    """With a split threshold (``at`` x partitions) under ``release``, as the tests' small
    thresholds make it, a runner joins only once it would not split again at once: joined
    with 300 waiting it split again after one round, a second regroup."""

    got = rounds.split(backlog, merged=merged, focus=None, partitions=4, at=50, release=1000)
    assert got is split
