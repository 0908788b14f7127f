"""Corrections as decisions, from tables with no server (core.corrections, core.plan): which
version a correction replaces, and that folding corrections into rounds - whole, split, or
replayed over states that already hold part of them - leaves every reading and summary
window equal to the events with the corrections applied by hand."""

import random
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from kloudmeter_py.core.aggregate import Acc, fold
from kloudmeter_py.core.corrections import (
    CORRECTION_PREFIX,
    History,
    correction_id,
    counted,
    replaced,
    with_applied,
)
from kloudmeter_py.core.meters import CompiledMeter
from kloudmeter_py.core.models import Correction, Event, Meter, event_decoder
from kloudmeter_py.core.plan import (
    CorrectionRow,
    KeyState,
    Rebuild,
    Series,
    Version,
    apply,
    empty_state,
    exact_items,
    fold_corrections,
    fold_rows,
    rebuild_targets,
    rebuilt_states,
    spread,
)
from kloudmeter_py.core.summaries import open_windows
from tests.helpers import compiled_meter

NOW = 1_764_676_800  # 2025-12-02T12:00:00Z
LEVELS = [(1, 60, NOW - 7200), (2, 3600, NOW - 172800), (3, 86400, NOW - 400 * 86400)]


_meter = compiled_meter


@pytest.mark.parametrize(
    ("applied", "seq", "expected"),
    [
        ([], 10, None),  # the first correction replaces the original
        ([(10, "amend")], 10, None),  # replayed: still the original
        ([(10, "amend")], 12, (10, "amend")),
        ([(10, "amend"), (12, "cancel")], 12, (10, "amend")),  # later ones do not count
        ([(10, "amend"), (12, "cancel")], 15, (12, "cancel")),
    ],
)
def test_replaced_is_the_last_correction_before(
    applied: list[tuple[int, str]], seq: int, expected: tuple[int, str] | None
) -> None:
    assert replaced(History(of="e", applied=applied), seq) == expected


def test_with_applied_adds_once_in_order() -> None:
    h = with_applied(None, "e", 12, "cancel")
    h = with_applied(h, "e", 10, "amend")
    assert h.applied == [(10, "amend"), (12, "cancel")]
    assert with_applied(h, "e", 12, "cancel").applied == h.applied
    assert msgspec.json.decode(msgspec.json.encode(h), type=History) == h


def test_correction_ids_repeat_for_a_retry_and_differ_by_content() -> None:
    at = datetime(2025, 12, 2, tzinfo=UTC)
    assert correction_id(7, "cancel", None, None) == f"{CORRECTION_PREFIX}7.cancel"
    assert correction_id(7, "amend", {"v": 1}, at) == correction_id(7, "amend", {"v": 1}, at)
    assert correction_id(7, "amend", {"v": 1}, at) != correction_id(7, "amend", {"v": 2}, at)
    assert correction_id(7, "amend", {"v": 1}, at) != correction_id(8, "amend", {"v": 1}, at)


@pytest.mark.parametrize(
    "body",
    [
        b'{"id":"kloudmeter-correction#1.cancel","eventType":"t","subject":"s"}',
        b'{"id":"x","eventType":"t","subject":"s","correction":{"action":"cancel","of":"e"}}',
        b'{"id":"1","source":"kloudmeter-correction","specversion":"1.0","type":"t","subject":"s"}',
    ],
)
def test_the_correction_id_space_is_only_for_corrections(body: bytes) -> None:
    with pytest.raises(msgspec.ValidationError, match="correction"):
        event_decoder.decode(body)


# --- folding corrections, against the events corrected by hand --------------------------

# ("event", seq, at, data) | ("cancel", seq, of) | ("amend", seq, of, at, data)
Op = tuple[Any, ...]


def _event(seq: int, data: dict[str, Any], subject: str = "s") -> Event:
    return Event(id=f"e{seq}", eventType="t", subject=subject, data=data)


def _resolve(ops: list[Op]) -> tuple[list[tuple[str, int, int, Event]], list[CorrectionRow]]:
    """Rows and resolved corrections, as worker.corrections resolves them (History per
    original, the replaced version read back from the ops)."""
    by_seq = {op[1]: op for op in ops}
    histories: dict[int, History] = {}
    rows = []
    corrections: list[CorrectionRow] = []
    for op in ops:
        if op[0] == "event":
            rows.append((f"m{op[1]}", op[1], op[2] * 1000, _event(op[1], op[3])))
            continue
        kind, seq, of = op[:3]
        original = by_seq[of]
        before = replaced(histories.get(of), seq)
        removed: Version | None
        if before is None:
            removed = (original[2] * 1000, _event(of, original[3]), of)
        elif before[1] == "cancel":
            removed = None
        else:
            amend = by_seq[before[0]]
            removed = (amend[3] * 1000, _event(of, amend[4]), amend[1])
        added = (op[3] * 1000, _event(of, op[4])) if kind == "amend" else None
        histories[of] = with_applied(histories.get(of), f"e{of}", seq, kind)
        corrections.append((f"m{seq}", seq, removed, added))
    return rows, corrections


def _stored(ops: list[Op], through: int) -> list[tuple[int, int, Event, str | None]]:
    """The ops as stored rows up to ``through``, corrections as correction events (what a
    unique meter's states are rebuilt from)."""
    out: list[tuple[int, int, Event, str | None]] = []
    for op in ops:
        if op[1] > through:
            continue
        if op[0] == "event":
            out.append((op[1], op[2] * 1000, _event(op[1], op[3]), None))
            continue
        at = datetime.fromtimestamp(op[3], UTC) if op[0] == "amend" else None
        event = Event(
            id=f"{CORRECTION_PREFIX}{op[1]}",
            eventType="t",
            subject="s",
            time=at,
            data=op[4] if op[0] == "amend" else {},
            correction=Correction(action=op[0], of=f"e{op[2]}", seq=op[2]),
        )
        out.append((op[1], 0, event, None))
    return out


def _by_hand(ops: list[Op]) -> list[tuple[int, int, dict[str, Any]]]:
    """The events as they count after every correction: (seq, at, data), an amended one at
    its amendment's seq (what orders a latest value among equal times)."""
    current: dict[int, tuple[int, int, dict[str, Any]] | None] = {}
    for op in ops:
        if op[0] == "event":
            current[op[1]] = (op[1], op[2], op[3])
        elif op[0] == "cancel":
            current[op[2]] = None
        else:
            current[op[2]] = (op[1], op[3], op[4])
    return sorted(v for v in current.values() if v is not None)


def _round(
    states: dict[tuple[int, str], KeyState],
    ops: list[Op],
    meters: list[CompiledMeter],
    history: list[Op],
    crash: random.Random | None = None,
) -> list[tuple[Any, ...]]:
    """One round of ``ops`` (resolved against ``history`` + ``ops``) over ``states``; with
    ``crash``, only a random half of its keys is written (a worker killed mid-round)."""
    all_rows, all_corr = _resolve(history + ops)
    seqs = {op[1] for op in ops}
    rows = [r for r in all_rows if r[1] in seqs]
    corrections = [c for c in all_corr if c[1] in seqs]
    series: Series = {}
    by_type = {"t": meters}
    failures: list[tuple[Any, ...]] = list(fold_rows(series, rows, by_type, 60))
    rebuilds: list[Rebuild] = []
    failures += fold_corrections(series, corrections, by_type, 60, rebuilds)
    rebuilt = []
    for _, seq, cm, removed, added in rebuilds:
        versions = [(v[0], v[1]) for v in (removed, added) if v is not None]
        targets = rebuild_targets(cm, versions, LEVELS, 2)
        stored = _stored(history + ops, seq)
        rebuilt += rebuilt_states(seq, cm, counted(stored), targets, LEVELS, 2)
    work = spread(series, LEVELS, 60, partitions=2)
    items = exact_items(
        [(r[1], r[2], r[3]) for r in rows], by_type, LEVELS, 2, corrections, rebuilt
    )
    for wkey, kw in work.items():
        if crash is not None and crash.random() < 0.5:
            continue
        state = states.get(wkey) or empty_state(wkey[0], 0, 0)
        states[wkey] = state
        apply(wkey, kw, state, 10_000, lambda: items)
    return failures


def _values(states: dict[tuple[int, str], KeyState]) -> dict[tuple[int, str, int], Any]:
    """(store, key, window start or 0) -> (count, sum) of every state, zero ones left out."""
    out: dict[tuple[int, str, int], Any] = {}
    for (store, key), state in states.items():
        if state.windows is None:
            accs = {0: state.acc}
        else:
            windows = open_windows(state.raw) if state.raw is not None else state.windows
            accs = {s: w for s, w in windows.items() if isinstance(w, Acc)}
        for start, acc in accs.items():
            if acc.count or acc.sum:
                distinct = len(acc.distinct) if acc.distinct is not None else None
                value: tuple[Any, ...] = (acc.count, acc.sum, distinct)
                if key.split(".")[0].split("/")[0] in ("min", "max", "latest"):
                    # (count, sum and avg meters take a version out of count and sum only)
                    value += (acc.min, acc.max, acc.latest, acc.latest_at, acc.latest_seq)
                out[(store, key, start)] = value
    return out


def _expected(ops: list[Op], meters: list[CompiledMeter]) -> dict[tuple[int, str, int], Any]:
    states: dict[tuple[int, str], KeyState] = {}
    events = [("event", seq, at, data) for seq, at, data in _by_hand(ops)]
    _round(states, events, meters, [])
    return _values(states)


_METERS = [
    _meter("count"),
    _meter("sum", groupBy={"r": "$.r"}),
    _meter("avg"),
    _meter("unique", value="$.u", groupBy={"r": "$.r"}),
    _meter("min"),
    _meter("max", groupBy={"r": "$.r"}),
    _meter("latest"),
]


def _scenario(rng: random.Random, n: int) -> list[Op]:
    """Events over two days and two groups, then corrections of random ones: cancels,
    amendments that move time and group, amendments of cancelled and amended events."""
    ops: list[Op] = []
    seq = 0
    for _ in range(n):
        seq += 1
        at = NOW - rng.choice([0, 30, 3600, 86400 + 7, 2 * 86400])
        data = {"v": rng.randint(1, 9), "r": rng.choice("ab"), "u": rng.choice("xyz")}
        ops.append(("event", seq, at, data))
        if rng.random() < 0.4:
            of = rng.choice([op[1] for op in ops if op[0] == "event"])
            seq += 1
            if rng.random() < 0.4:
                ops.append(("cancel", seq, of))
            else:
                at = NOW - rng.choice([0, 61, 7200, 86400])
                data = {"v": rng.randint(1, 9), "r": rng.choice("ab"), "u": rng.choice("xyz")}
                ops.append(("amend", seq, of, at, data))
    return ops


@pytest.mark.parametrize("seed", range(16))
def test_corrections_fold_to_the_events_corrected_by_hand(seed: int) -> None:
    """Whole, in rounds split anywhere, and with a round replayed over states that already
    hold part of it (the exact path, as after a crash): every reading, page window and
    meter-wide rollup window equals folding the corrected events."""
    rng = random.Random(seed)
    ops = _scenario(rng, 30)
    expected = _expected(ops, _METERS)
    assert expected  # something is counted

    whole: dict[tuple[int, str], KeyState] = {}
    assert _round(whole, ops, _METERS, []) == []
    assert _values(whole) == expected

    cut = rng.randrange(1, len(ops))
    split: dict[tuple[int, str], KeyState] = {}
    _round(split, ops[:cut], _METERS, [])
    _round(split, ops[cut:], _METERS, ops[:cut])
    assert _values(split) == expected

    # Crashes after some keys of a round were written: the next round starts again from
    # the round's start (the checkpoint), over states that hold part of it; each key skips
    # what its last_seq covers, folding the rest event by event.
    crashed: dict[tuple[int, str], KeyState] = {}
    start = 0
    while start < len(ops):
        # the replayed round need not end where the crashed one did
        end, replay_end = (rng.randrange(start + 1, len(ops) + 1) for _ in range(2))
        _round(crashed, ops[start:end], _METERS, ops[:start], crash=rng)
        _round(crashed, ops[start:replay_end], _METERS, ops[:start])
        start = replay_end
    assert _values(crashed) == expected


def test_a_cancelled_maximum_is_rebuilt_from_the_rest() -> None:
    """A max meter cannot take a value out: its states are rebuilt from the events as they
    count (the next largest value); without a rebuild the correction fails for the meter."""
    ops: list[Op] = [
        ("event", 1, NOW, {"v": 3}),
        ("event", 2, NOW, {"v": 9}),
        ("cancel", 3, 2),
    ]
    states: dict[tuple[int, str], KeyState] = {}
    assert _round(states, ops, [_meter("count"), _meter("max")], []) == []
    assert states[(0, "max.s")].acc.max == 3 and states[(0, "count.s")].acc.count == 1
    _, corrections = _resolve(ops)
    failures = fold_corrections({}, corrections, {"t": [_meter("max")]}, 60)
    assert [(f[1], f[2]) for f in failures] == [(3, "max")]
    assert "max meters" in failures[0][3]


def test_a_version_before_a_meters_start_is_not_taken_out_of_it() -> None:
    """A meter started after the original (without it) counts only the amendment."""
    late = _meter("count", id="late", startSeq=1)
    ops: list[Op] = [("event", 1, NOW, {"v": 3}), ("amend", 2, 1, NOW, {"v": 4})]
    states: dict[tuple[int, str], KeyState] = {}
    _round(states, ops, [late], [])
    assert states[(0, "late.s")].acc.count == 1


def test_an_amendment_a_meter_cannot_use_fails_like_an_event() -> None:
    ops: list[Op] = [("event", 1, NOW, {"v": 3}), ("amend", 2, 1, NOW, {"v": "x"})]
    states: dict[tuple[int, str], KeyState] = {}
    failures = _round(states, ops, [_meter("sum")], [])
    assert [(f[1], f[2]) for f in failures] == [(2, "sum")]
    assert states[(0, "sum.s")].acc.sum == 0  # the original taken out, nothing put in


def test_a_correction_event_is_not_folded_as_an_event() -> None:
    """exact_items leaves correction events among the rows to their resolved rows."""
    corr = Event(
        id=f"{CORRECTION_PREFIX}1.cancel",
        eventType="t",
        subject="s",
        correction=Correction(action="cancel", of="e1", seq=1),
    )
    items = exact_items([(2, NOW * 1000, corr)], {"t": [_meter("count")]}, LEVELS)
    assert items == {}
    acc = Acc()
    fold(acc, None, None, 0, 1)
    assert acc.count == 1


# --- lifecycle resources (core.lifecycle) ------------------------------------------------


@pytest.mark.parametrize("cancel_amendment", [False, True])
def test_lifecycle_corrections_fold_to_the_same_state_in_every_order(
    cancel_amendment: bool,
) -> None:
    """A resource's points with its stop cancelled and its resize amended (moved in time),
    that amendment maybe cancelled again: every order of application, one change at a time,
    gives the points of the events corrected by hand; each correction applies once and a
    version taken out is never folded in again."""
    import dataclasses
    from itertools import permutations

    from kloudmeter_py.core.lifecycle import Change, DurationMeter, fold

    dm = DurationMeter(
        Meter(
            id="vcpu",
            eventType="vm",
            aggregation="duration",
            valueProperty="$.vcpus",
            resourceProperty="$.rid",
            actionProperty="$.a",
            createdAt=datetime(2025, 1, 1, tzinfo=UTC),
        )
    )

    def point(action: str, minute: int, seq: int, vcpus: int = 2) -> Change:
        at = datetime(2026, 11, 20, 10, minute, tzinfo=UTC)
        data = {"a": action, "rid": "vm-1", "vcpus": vcpus}
        c = dm.change(Event(id="x", eventType="vm", subject="acme", time=at, data=data), seq, at)
        assert c is not None
        return c

    create, resize, stop = point("create", 0, 1), point("resize", 10, 2, 4), point("delete", 30, 3)
    # 4: the stop (3) cancelled; 5: the resize (2) amended to minute 20; 6: 5 cancelled
    cancel_stop = dataclasses.replace(stop, point=None, removes=3, correction=4)
    amended = dataclasses.replace(point("resize", 20, 5, 4), removes=2, correction=5)
    changes = [create, resize, stop, cancel_stop, amended]
    kept, gone, corrected = [1, 5], [2, 3], [4, 5]
    if cancel_amendment:
        changes.append(dataclasses.replace(amended, point=None, removes=5, correction=6))
        kept, gone, corrected = [1], [2, 3, 5], [4, 5, 6]
    for order in permutations(changes):
        state = None
        for c in order:
            state = fold(state, [c]) or state
        assert state is not None
        assert [p.seq for p in state.points] == kept, order
        assert state.gone == gone and state.corrected == corrected
        assert [p.at.minute for p in state.points] == [0, 20][: len(kept)]
        # each correction and each taken-out version folded again changes nothing
        assert fold(state, [cancel_stop, stop, amended, resize]) is None
