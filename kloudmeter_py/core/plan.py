"""Planning a write round, with no I/O: which keys a round changes, and what each becomes.

The worker's runner calls these in this order for every round:

1. ``fold_rows``: the round's events folded per series (meter x subject x group values) and
   finest window, all of one type, subject and window together (``Part``).
2. ``spread``: the parts spread over the keys they change: the reading, and at each summary
   level that still keeps the part's window (``kept_windows``, the one place that decides
   which windows an event falls in and whether they are kept) the page holding that window
   (core.summaries: minute windows in hour pages, hours in day pages, days in month pages).
   One ``KeyWork`` per key.
3. ``apply``: a key's stored state (``KeyState``) and its ``KeyWork`` give the new state, or
   "nothing new". Where the stored state already holds part of the round (a replay after a
   crash, a lost compare-and-set, a replayed dead letter), the key is folded event by event
   from ``exact_items`` instead, skipping what its ``last_seq`` covers.

Keys are ``(store, key)``: store 0 is the readings bucket, 1.. the summary levels in
``Levels`` order. Events are rows ``(tag, stream seq, event time ms, event)``; the tag is the
caller's (the worker's message) and comes back with any failure.
"""

import operator
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from kloudmeter_py.core.aggregate import (
    Acc,
    Number,
    ValueError_,
    fold,
    fold_many,
    merge_into,
    shared,
    unfold,
)
from kloudmeter_py.core.corrections import invertible
from kloudmeter_py.core.keys import rollup_key, subject_partition
from kloudmeter_py.core.meters import CompiledMeter
from kloudmeter_py.core.models import Event
from kloudmeter_py.core.summaries import Window, as_acc, open_windows, page_token

# (store, width in seconds, oldest window end still kept) per summary level
Levels = Sequence[tuple[int, int, int]]
WKey = tuple[int, str]
_V = TypeVar("_V")
_K = TypeVar("_K")
Row = tuple[Any, int, int, Event]
# (tag, stream seq, meter id, reason) of an event a meter cannot use
Failure = tuple[Any, int, str, str]
# (stream seq, event time ms, number, distinct key, too old for every summary level,
# 1 to fold in or -1 to take out: a correction's replaced version, or 0: a state rebuilt at
# a correction, the distinct key then being the whole state)
Item = tuple[int, int, Number | None, "str | Acc | None", bool, int]
# A state rebuilt at a correction (min, max, latest and unique meters): (its seq, key,
# window start in seconds or 0 for a reading, the state)
Rebuilt = tuple[int, "WKey", int, Acc]
# A correction a unique meter's keys are rebuilt for: (tag, seq, meter, removed, added)
# A correction as the worker resolved it (core.corrections): (tag, its stream seq, the
# version it takes out as (event time ms, event, that version's stream seq) or None, the
# version it puts in as (event time ms, event) or None).
Version = tuple[int, Event, int]
CorrectionRow = tuple[Any, int, Version | None, tuple[int, Event] | None]
Rebuild = tuple[Any, int, CompiledMeter, Version | None, tuple[int, Event] | None]
NO_LIMIT = 1 << 60


def kept_windows(at_seconds: int, levels: Levels) -> list[tuple[int, int, int]]:
    """(store, window start, width) of each summary level whose window holding
    ``at_seconds`` is still kept (its end is after the level's oldest kept end)."""
    out = []
    for store, width, oldest in levels:
        start = at_seconds - at_seconds % width
        if start + width > oldest:
            out.append((store, start, width))
    return out


@dataclass(slots=True)
class Part:
    """The events of one round for one series within one finest window, folded together."""

    meter: CompiledMeter
    subject: str
    groups: tuple[str | None, ...]
    acc: Acc
    first_seq: int
    at: int = 0  # start (epoch seconds) of its finest window
    last_seq: int = 0
    events: int = 0
    late: int = 0  # events too old for every summary level
    rebuild: bool = False  # a unique meter's state is rebuilt here at a correction


class KeyWork:
    """What one round changes in one key: the parts that fall in it.

    Held as its part alone while it has one (a list from the second), with what the parts
    share (meter, subject, groups) and what they span (first and last seq, whether one is
    a rebuild) read from them: three fields. Why: a round's work is held while its keys are
    loaded, folded and written, with the next round folded beside it, and that is where a
    wide worker's peaks were (README, Performance). As nine fields and a list of parts a key
    took ~170 bytes (~210 with the allocator's rounding) in three blocks of Python's
    small-object heap, now ~57 (64) in one, or the list's two more where several parts fall
    in a key; on the wide bench shape a round at
    10,000 subjects had up to ~11,400 keys (1,700-4,000 at 1,000), most of them a day page
    one event of the round falls in. Cost: the spans are computed over the parts where
    read (once or twice a key a round; a key has few parts, one on most wide pages). Peak
    RSS a worker (means of six peaks, 2026-12-06): 10,000 subjects 80.5 -> 79.25 MB, 1,000
    subjects 77.85 -> 77.3 (README, Performance).
    """

    __slots__ = ("_parts", "oldest", "width")

    def __init__(self, part: Part, width: int = 0, oldest: int = 0) -> None:
        self._parts: Part | list[Part] = part
        self.width = width  # a page's window width in seconds (0: a reading)
        self.oldest = oldest  # a page's oldest window end still kept

    def add(self, part: Part) -> None:
        parts = self._parts
        if isinstance(parts, list):
            parts.append(part)
        else:
            self._parts = [parts, part]

    @property
    def parts(self) -> Sequence[Part]:
        parts = self._parts
        return parts if isinstance(parts, list) else (parts,)

    @property
    def _first(self) -> Part:
        parts = self._parts
        return parts[0] if isinstance(parts, list) else parts

    @property
    def meter(self) -> CompiledMeter:
        return self._first.meter

    @property
    def subject(self) -> str:
        return self._first.subject

    @property
    def groups(self) -> tuple[str | None, ...]:
        return self._first.groups

    @property
    def first_seq(self) -> int:
        parts = self._parts
        if isinstance(parts, list):
            return min(p.first_seq for p in parts)
        return parts.first_seq

    @property
    def last_seq(self) -> int:
        parts = self._parts
        if isinstance(parts, list):
            return max(p.last_seq for p in parts)
        return parts.last_seq

    @property
    def rebuild(self) -> bool:
        parts = self._parts
        if isinstance(parts, list):
            return any(p.rebuild for p in parts)
        return parts.rebuild

    @property
    def events(self) -> int:
        parts = self._parts
        if isinstance(parts, list):
            return sum(p.events for p in parts)
        return parts.events


@dataclass(slots=True)
class KeyState:
    """A key's stored state as the worker holds it: what it folds the round into. A
    reading's state is ``acc``; a page's is ``windows`` (window start -> state)."""

    acc: Acc
    last_seq: int  # highest stream sequence folded in
    revision: int  # the key's KV revision (0: never written), for compare-and-set
    meter_start_seq: int  # the meter generation it was written for (-1: nothing stored)
    replayed: list[int] | None = None  # dead letters replayed into it
    late: int = 0  # readings: events too old for every summary level
    size: int = 0  # estimated bytes in memory
    windows: dict[int, Window] | None = None  # pages only
    # A page's stored bytes while its windows are closed (``windows`` then empty): a page is
    # held as the bytes last read or written until a round folds into it (``open_page``).
    raw: bytes | None = None
    # A reading's distinct values while no round folds into it (``acc.distinct`` then None):
    # a tuple takes 8 bytes a value, a set ~40 (see freeze).
    frozen: tuple[str, ...] | None = None


# Bits of a round's key marks (KeyMarks): 2**19, one bytearray of 64 KB. A round touches
# ~4,000-17,000 keys on the wide bench shape, so one of another round's keys falls on a
# marked bit (is taken as touched) ~1-3% of the time: the fresh keys are undercounted by
# about that much, an estimate either way.
MARK_BITS = 1 << 19


class KeyMarks:
    """Which keys a round touched, as one bit each in a bytearray (a key's hash picks the
    bit): ``unmarked`` counts the keys of the next round that this one did not touch (its
    fresh keys, core.rounds.round_limit).

    Why not a set of the keys or their hashes: the set held an int object a key (~7,300-
    8,300 at 10,000 subjects on the wide bench shape, the round's keys kept until the next
    round is counted, and the next round's set and the difference built beside them), each
    a block of Python's small-object heap, whose arenas stay at their high-water mark; the
    bits are one object outside it, whatever the keys. Cost: ~4 ms a round of 10,000 keys
    (marking and counting) against ~1 ms for the sets, on this busy machine: ~1.4 s of a
    wide worker's ~45 s of CPU at ~340 rounds. Peak RSS a worker at 10,000 subjects (two
    workers, six peaks each, 2026-12-06): 82.5 -> 80.8 MB (means); at 1,000 subjects
    79.0 -> 78.7, within the spread (README, Performance).
    """

    __slots__ = ("bits",)

    def __init__(self, keys: Iterable[object], bits: int = MARK_BITS) -> None:
        assert bits > 0 and bits & (bits - 1) == 0 and bits >= 8, "a power of two, >= 8"
        marks = bytearray(bits >> 3)
        mask = bits - 1
        for key in keys:
            h = hash(key) & mask
            marks[h >> 3] |= 1 << (h & 7)
        self.bits = marks

    def unmarked(self, keys: Iterable[_K], held: Callable[[_K], bool] | None = None) -> int:
        """How many of ``keys`` have no mark (a key on a bit another marked counts as marked)
        and, with ``held``, are not held either."""
        marks = self.bits
        mask = (len(marks) << 3) - 1
        n = 0
        for key in keys:
            h = hash(key) & mask
            if not marks[h >> 3] & (1 << (h & 7)) and (held is None or not held(key)):
                n += 1
        return n


def touch_subjects(touched: dict[str, set[str]], work: Mapping[WKey, KeyWork]) -> None:
    """Add to ``touched`` (meter id -> subjects) the subjects whose readings ``work`` folds
    into: the (meter, subject) pairs the alert check is made for at the flush
    (worker.alerts). Pages are passed over: the same work names their subjects' readings.

    Why a set of subjects per meter, not a set of (meter, subject) tuples: a tuple is a
    block of Python's small-object heap besides the subject's string, held from the round
    to the flush. A wide worker at 10,000 subjects held up to ~5,700 such pairs (~500-1,600
    at 1,000 subjects), and built a list of the round's pairs (~4,000-7,500) beside the
    round's keys while they were written, where its peaks were set. Here: a string per
    subject and meter, one for all the meters where a round touches them first together
    (its parts of one subject name it with one string), and nothing built. What it holds
    grows with the subjects touched between flushes, not with events or windows. Measured
    with mark_dirty (2026-12-06, six peaks each): a wide worker at 10,000 subjects 80.8 ->
    80.1 MB, at 1,000 78.6 -> 78.4, within the spread of the runs (README, Performance).
    """
    for wkey, kw in work.items():
        if wkey[0]:
            continue
        meter_id = kw.meter.meter.id
        subjects = touched.get(meter_id)
        if subjects is None:
            subjects = touched[meter_id] = set()
        subjects.add(kw.subject)


def mark_dirty(dirty: dict[str, _V], key: str, value: _V) -> None:
    """``dirty[key] = value`` (a key to write at the flush), keyed by ``key``'s own string
    object: the one the key store packs the key's state under in the same round.

    Why: a round names each key with a new string (a meter keeps the reading keys of one
    round only, a page key is built per round), and a dict or set that already holds an
    equal key keeps its first string. A key deferred by several rounds before a flush then
    had two strings alive, the first round's in ``dirty`` and the last one's beside its
    packed reading or parked page. At 10,000 subjects on the wide bench shape a worker's
    count and unique readings (~5,000 subjects a worker) are touched by most rounds between
    flushes, and they were most of its 7,600-13,400 readings waiting for the flush. Cost:
    one more dict operation a deferred key a round. Measured with touch_subjects (see
    there): within the spread of the runs.
    """
    dirty.pop(key, None)
    dirty[key] = value


def mark_dirty_page(dirty: set[str], key: str) -> None:
    """Add ``key`` to ``dirty`` as its own string object (see ``mark_dirty``)."""
    dirty.discard(key)
    dirty.add(key)


# What every page state shares instead of objects of its own: its ``acc`` (a page folds
# into its windows, never into it) and, while closed or empty, its ``windows``. Neither is
# ever written to: ``open_page`` gives a page a dict of its own before anything is folded.
# A cached page then costs ~180 bytes less (an Acc and an empty dict): on the wide bench
# shape the cache holds ~150,000 pages.
PAGE_ACC = Acc()
CLOSED: dict[int, Window] = {}


def open_page(state: KeyState) -> dict[int, Window]:
    """A page's windows to fold into, opened from its bytes if they are closed."""
    assert state.windows is not None
    if state.raw is not None:
        state.windows = open_windows(state.raw)
        state.raw = None
    elif state.windows is CLOSED:
        state.windows = {}
    return state.windows


def close_page(state: KeyState, raw: bytes) -> None:
    """Hold a page as its encoded bytes (written or about to be) until a round opens it."""
    state.raw = raw
    state.windows = CLOSED


def freeze(state: KeyState) -> None:
    """Hold a reading's distinct values as a tuple until a round folds into it again (thaw).

    A unique meter's reading holds every distinct value of its series: on the wide bench
    shape ~100 a subject for 10,000 subjects, whose sets (~4 KB each, a 256-slot table)
    took ~40 MB of the worker at the end of a million events; as tuples ~9 MB. A round
    thaws only the readings it touches (~2 us for 100 values).
    """
    distinct = state.acc.distinct
    if distinct is not None and state.windows is None:
        state.frozen = tuple(distinct)
        state.acc.distinct = None


def thaw(state: KeyState) -> None:
    """A frozen reading's distinct values back as the set that folding adds to."""
    if state.frozen is not None:
        state.acc.distinct = set(state.frozen)
        state.frozen = None


# A packed reading: its revision (first, so that a write's new one replaces the first 8
# bytes, as a parked page's does: worker.keystore), lastSeq, meter generation and late count,
# then its aggregation state and replayed dead letters as MessagePack.
_READING_HEAD = struct.Struct(">qqqq")
READING_HEAD = _READING_HEAD.size
_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder().decode
# An Acc's numbers, in the order a packed reading holds them (its distinct values follow).
_NUMBERS = (
    "count",
    "sum",
    "min",
    "max",
    "latest",
    "latest_at",
    "latest_seq",
    "first_at",
    "last_at",
)
_numbers = operator.attrgetter(*_NUMBERS)


def pack_reading(state: KeyState) -> bytes | None:
    """A reading's state as one object, until a round folds into it again (unpack_reading);
    None where it cannot be packed (a sum beyond 64 bits: it is then held as it is).

    Why: held as a ``KeyState``, a reading is ~12 objects (the state, its ``Acc``, eight
    ints over 256, ...), ~600 bytes besides its key; packed ~140 in one. A worker holds the
    readings of every series its partitions' events touch: on the wide bench shape at
    10,000 subjects ~25,000 of them a worker (~16 MB), against ~3,500 at 1,000 subjects,
    and their objects were a large part of what set a wide worker's peak above a
    1,000-subject one's (docs/performance-history.md). Packing took ~0.5 us and
    unpacking ~2 us, the state made included (25,000 sum readings, this machine).
    """
    acc = state.acc
    distinct = acc.distinct if acc.distinct is not None else state.frozen
    try:
        body = _pack((*_numbers(acc), None if distinct is None else list(distinct), state.replayed))
    except OverflowError:
        return None
    # bytes, one allocation: a bytearray is two (its object and its buffer), and a wide
    # worker holds ~20,000 packed readings at its highs (worker.keystore).
    return (
        _READING_HEAD.pack(state.revision, state.last_seq, state.meter_start_seq, state.late) + body
    )


def unpack_reading(value: bytes | bytearray) -> KeyState:
    """The state a packed reading holds (pack_reading), its distinct values as a set."""
    revision, last_seq, meter_start_seq, late = _READING_HEAD.unpack_from(value)
    acc = Acc()
    *numbers, distinct, replayed = _unpack(memoryview(value)[READING_HEAD:])
    for name, number in zip(_NUMBERS, numbers, strict=True):
        setattr(acc, name, number)
    if distinct is not None:
        acc.distinct = set(shared(distinct))
    return KeyState(acc, last_seq, revision, meter_start_seq, replayed, late)


def empty_state(store: int, revision: int, meter_start_seq: int) -> KeyState:
    """The state of a key that holds nothing (yet) for this meter generation."""
    if store:
        return KeyState(PAGE_ACC, 0, revision, meter_start_seq, windows=CLOSED)
    return KeyState(Acc(), 0, revision, meter_start_seq)


Series = dict[tuple[str, int], Part]  # (reading key, finest window) -> part


def fold_rows(
    series: Series,
    rows: Iterable[Row],
    by_type: Mapping[str, Sequence[CompiledMeter]],
    interval: int,
) -> list[Failure]:
    """Fold events into ``series`` per series and finest window: the events of one type,
    subject and window together, each meter over all of them at once; event by event for a
    meter that some of them do not fit, so that exactly those fail."""
    bucket_ms = interval * 1000
    together: dict[tuple[str, str, int], list[Row]] = {}
    for row in rows:
        event = row[3]
        gkey = (event.eventType, event.subject, row[2] // bucket_ms)
        group = together.get(gkey)
        if group is None:
            together[gkey] = [row]
        else:
            group.append(row)
    failures: list[Failure] = []
    for (event_type, subject, bucket), group in together.items():
        meters = by_type.get(event_type)
        if not meters:
            continue
        datas: list[dict[str, Any]] = [row[3].data for row in group]
        ats = [row[2] for row in group]
        seqs = [row[1] for row in group]
        for cm in meters:
            found = cm.extract_many(subject, datas) if seqs[0] > cm.meter.startSeq else None
            if found is None:
                failures.extend(fold_each(series, cm, group, bucket, interval))
                continue
            for key, groups, indexes, numbers, dkeys in found:
                if indexes is None:
                    at_list, seq_list = ats, seqs
                else:
                    at_list = [ats[i] for i in indexes]
                    seq_list = [seqs[i] for i in indexes]
                part = series.get((key, bucket))
                if part is None:
                    part = series[(key, bucket)] = Part(
                        cm, subject, groups, Acc(), seq_list[0], bucket * interval
                    )
                fold_many(part.acc, numbers, dkeys, at_list, seq_list)
                part.last_seq = max(part.last_seq, seq_list[-1])
                part.events += len(seq_list)
    return failures


def fold_each(
    series: Series, cm: CompiledMeter, rows: list[Row], bucket: int, interval: int
) -> list[Failure]:
    """Fold one meter event by event (events at or before its start are not its)."""
    failures: list[Failure] = []
    for tag, seq, at_ms, event in rows:
        if seq <= cm.meter.startSeq:
            continue
        try:
            key, groups, number, dkey = cm.extract(event.subject, event.data)
        except ValueError_ as exc:
            failures.append((tag, seq, cm.meter.id, str(exc)))
            continue
        part = series.get((key, bucket))
        if part is None:
            part = series[(key, bucket)] = Part(
                cm, event.subject, groups, Acc(), seq, bucket * interval
            )
        fold(part.acc, number, dkey, at_ms, seq, NO_LIMIT)
        part.last_seq = seq
        part.events += 1
    return failures


def _not_invertible(cm: CompiledMeter) -> str:
    return (
        f"corrections do not apply to {cm.agg.name} meters (only count, sum and avg): "
        "the meter keeps the event as first stored"
    )


def fold_corrections(
    series: Series,
    rows: Iterable[CorrectionRow],
    by_type: Mapping[str, Sequence[CompiledMeter]],
    interval: int,
    rebuilds: list[Rebuild] | None = None,
) -> list[Failure]:
    """Fold corrections into ``series``, after the round's events: the version each takes
    out folded inversely (core.aggregate.unfold) into the series and window it was in, the
    version it puts in folded like an event, both at the correction's stream seq (a part's
    first and last seq then span it).

    For a meter, a version counts when its own seq is after the meter's start and the
    correction is too; what the taken-out version's values cannot be read from (its event
    failed for this meter) was never folded and is skipped; an amendment a meter cannot use
    fails like an event. A meter whose aggregation a correction cannot be taken out of
    (``core.corrections.invertible``) fails the correction instead; with ``rebuilds`` it
    does not: the keys and windows of both versions (their rollups' too, through ``spread``)
    are marked to be rebuilt (``rebuilt_states``) and the correction is added to
    ``rebuilds``.
    """
    failures: list[Failure] = []
    for tag, seq, removed, added in rows:
        some = removed or added
        if some is None:
            continue  # a cancel of a cancelled event: nothing to take out
        for cm in by_type.get(some[1].eventType, ()):
            if seq <= cm.meter.startSeq:
                continue
            if not invertible(cm.agg.name):
                if rebuilds is not None:
                    failures.extend(_mark_rebuild(series, cm, tag, seq, removed, added, interval))
                    rebuilds.append((tag, seq, cm, removed, added))
                    continue
                failures.append((tag, seq, cm.meter.id, _not_invertible(cm)))
                continue
            if removed is not None and removed[2] > cm.meter.startSeq:
                at_ms, event, _ = removed
                try:
                    key, groups, number, _dkey = cm.extract(event.subject, event.data)
                except ValueError_:
                    pass  # it failed for this meter when it was folded
                else:
                    part = _part(series, cm, event.subject, groups, key, at_ms, seq, interval)
                    unfold(part.acc, number)
            if added is not None:
                at_ms, event = added
                try:
                    key, groups, number, dkey = cm.extract(event.subject, event.data)
                except ValueError_ as exc:
                    failures.append((tag, seq, cm.meter.id, str(exc)))
                    continue
                part = _part(series, cm, event.subject, groups, key, at_ms, seq, interval)
                fold(part.acc, number, dkey, at_ms, seq, NO_LIMIT)
                part.events += 1
    return failures


def _mark_rebuild(
    series: Series,
    cm: CompiledMeter,
    tag: Any,
    seq: int,
    removed: Version | None,
    added: tuple[int, Event] | None,
    interval: int,
) -> list[Failure]:
    """The series and windows of both versions, marked to be rebuilt at ``seq``."""
    failures: list[Failure] = []
    versions: list[tuple[int, Event, bool]] = []
    if removed is not None and removed[2] > cm.meter.startSeq:
        versions.append((removed[0], removed[1], True))
    if added is not None:
        versions.append((added[0], added[1], False))
    for at_ms, event, taken_out in versions:
        try:
            key, groups, _, _ = cm.extract(event.subject, event.data)
        except ValueError_ as exc:
            if not taken_out:
                failures.append((tag, seq, cm.meter.id, str(exc)))
            continue
        _part(series, cm, event.subject, groups, key, at_ms, seq, interval).rebuild = True
    return failures


def rebuild_targets(
    cm: CompiledMeter, versions: Iterable[tuple[int, Event]], levels: Levels, partitions: int
) -> set[tuple[int, str, int]]:
    """(store, key, window start or 0) of the reading and each kept window of the versions,
    and of their rollup's windows (``partitions``: as in ``spread``)."""
    targets: set[tuple[int, str, int]] = set()
    for at_ms, event in versions:
        targets.update(_places(cm, at_ms, event, levels, partitions))
    return targets


def _places(
    cm: CompiledMeter, at_ms: int, event: Event, levels: Levels, partitions: int
) -> list[tuple[int, str, int]]:
    """(store, key, window start or 0) an event falls in for a meter; none if it cannot."""
    try:
        key, groups, _, _ = cm.extract(event.subject, event.data)
    except ValueError_:
        return []
    windows = kept_windows(at_ms // 1000, levels)
    places = [(0, key, 0)] + [
        (store, f"{key}.{page_token(width, start)}", start) for store, start, width in windows
    ]
    if partitions and rolled(cm):
        rkey = rollup_key(cm.meter.id, subject_partition(event.subject, partitions), groups)
        places += [
            (store, f"{rkey}.{page_token(width, start)}", start) for store, start, width in windows
        ]
    return places


def rebuilt_states(
    seq: int,
    cm: CompiledMeter,
    counted: Iterable[tuple[int, int, Event]],
    targets: set[tuple[int, str, int]],
    levels: Levels,
    partitions: int = 0,
) -> list[Rebuilt]:
    """A meter's states at correction ``seq`` for ``targets``: the events as they count
    (core.corrections.counted, up to ``seq``, in stream order) that fall in each reading,
    window or rollup window, folded anew at their versions' seqs. Versions at or before the
    meter's start are not its; values it could not read failed when they were folded."""
    found: dict[tuple[int, str, int], Acc] = {t: Acc() for t in targets}
    for version_seq, at_ms, event in sorted(counted, key=lambda c: c[0]):
        if version_seq <= cm.meter.startSeq:
            continue
        places = [p for p in _places(cm, at_ms, event, levels, partitions) if p in found]
        if not places:
            continue
        _, _, number, dkey = cm.extract(event.subject, event.data)
        for place in places:
            fold(found[place], number, dkey, at_ms, version_seq, NO_LIMIT)
    return [(seq, (store, key), start, acc) for (store, key, start), acc in sorted(found.items())]


def _part(
    series: Series,
    cm: CompiledMeter,
    subject: str,
    groups: tuple[str | None, ...],
    key: str,
    at_ms: int,
    seq: int,
    interval: int,
) -> Part:
    bucket = at_ms // (interval * 1000)
    part = series.get((key, bucket))
    if part is None:
        part = series[(key, bucket)] = Part(cm, subject, groups, Acc(), seq, bucket * interval)
    part.first_seq = min(part.first_seq, seq)
    part.last_seq = max(part.last_seq, seq)
    return part


def rolled(cm: CompiledMeter) -> bool:
    """Whether a meter keeps meter-wide rollups: every aggregation but those over distinct
    values (a rollup's window would hold the union of its subjects' values, as large as the
    property's cardinality: a unique meter's meter-wide reads read the subjects' pages)."""
    return not cm.agg.uses_distinct


def spread(
    series: Series, levels: Levels, interval: int, partitions: int = 0
) -> dict[WKey, KeyWork]:
    """The keys the parts change: each part's reading, and at each level that still keeps
    its window the page holding it (a part kept by no level is counted as late in its
    reading). With ``partitions``, also the page of the part's rollup (its meter, its
    subject's partition and its group values; core.keys.rollup_key) at each of those levels:
    a rollup is one more series of the partition, folded in the same order."""
    work: dict[WKey, KeyWork] = {}
    rollups: dict[str, str | None] = {}  # reading key -> its rollup's series key
    homes: dict[str, int] = {}  # subject -> its partition (core.keys.subject_partition)
    oldest = {store: end for store, _, end in levels}
    # per finest window: (store, key suffix, width) of each level that keeps it
    targets: dict[int, list[tuple[int, str, int]]] = {}
    for (key, bucket), part in series.items():
        pages = targets.get(bucket)
        if pages is None:
            pages = targets[bucket] = [
                (store, "." + page_token(width, start), width)
                for store, start, width in kept_windows(bucket * interval, levels)
            ]
        if not pages:
            part.late = part.events
        kw = work.get((0, key))
        if kw is None:
            work[(0, key)] = KeyWork(part)
        else:
            kw.add(part)
        if not pages:
            continue
        if partitions:
            if key in rollups:
                rkey = rollups[key]
            else:
                rkey = rollups[key] = _rollup_of(part, partitions, homes)
            series_keys = (key, rkey) if rkey else (key,)
        else:
            series_keys = (key,)
        for store, suffix, width in pages:
            for skey in series_keys:
                wkey = (store, skey + suffix)
                kw = work.get(wkey)
                if kw is None:
                    work[wkey] = KeyWork(part, width, oldest[store])
                else:
                    kw.add(part)
    return work


def _rollup_of(part: Part, partitions: int, homes: dict[str, int]) -> str | None:
    """The series key of a part's rollup (None: its meter keeps none); ``homes`` holds the
    partitions of the subjects asked for so far, filled in here."""
    if not rolled(part.meter):
        return None
    return rollup_key(part.meter.meter.id, _home(homes, part.subject, partitions), part.groups)


def _home(homes: dict[str, int], subject: str, partitions: int) -> int:
    """A subject's partition (core.keys.subject_partition), computed once a subject for as
    long as ``homes`` is kept (a call of spread or exact_items)."""
    home = homes.get(subject)
    if home is None:
        home = homes[subject] = subject_partition(subject, partitions)
    return home


def exact_items(
    rows: Iterable[tuple[int, int, Event]],
    by_type: Mapping[str, Sequence[CompiledMeter]],
    levels: Levels,
    partitions: int = 0,
    corrections: Iterable[CorrectionRow] = (),
    rebuilt: Iterable[Rebuilt] = (),
) -> dict[WKey, list[Item]]:
    """Every key's events one by one (rows of stream seq, event time ms, event), in order:
    for the keys whose stored state already holds part of the round (rollup pages too, with
    ``partitions``, as in ``spread``). Corrections (``fold_corrections``) come as items of
    their own seq; correction events among ``rows`` are left to them."""
    items: dict[WKey, list[Item]] = {}
    homes: dict[str, int] = {}  # subject -> its partition, as in spread

    def add(seq: int, at_ms: int, event: Event, cm: CompiledMeter, sign: int) -> None:
        windows = kept_windows(at_ms // 1000, levels)
        try:
            key, groups, number, dkey = cm.extract(event.subject, event.data)
        except ValueError_:
            return  # failed when the round was folded
        # A version taken out leaves the reading's count of late events as it was.
        item = (seq, at_ms, number, dkey, sign > 0 and not windows, sign)
        items.setdefault((0, key), []).append(item)
        rkey = (
            rollup_key(cm.meter.id, _home(homes, event.subject, partitions), groups)
            if partitions and windows and rolled(cm)
            else None
        )
        for store, start, width in windows:
            token = page_token(width, start)
            items.setdefault((store, f"{key}.{token}"), []).append(item)
            if rkey is not None:
                items.setdefault((store, f"{rkey}.{token}"), []).append(item)

    for seq, at_ms, event in rows:
        if event.correction is not None:
            continue
        for cm in by_type.get(event.eventType, ()):
            if seq > cm.meter.startSeq:
                add(seq, at_ms, event, cm, 1)
    corrected = False
    for _, seq, removed, added in corrections:
        some = removed or added
        if some is None:
            continue
        for cm in by_type.get(some[1].eventType, ()):
            if seq <= cm.meter.startSeq or not invertible(cm.agg.name):
                continue
            corrected = True
            if removed is not None and removed[2] > cm.meter.startSeq:
                add(seq, removed[0], removed[1], cm, -1)
            if added is not None:
                add(seq, added[0], added[1], cm, 1)
    for seq, wkey, start, acc in rebuilt:
        corrected = True
        items.setdefault(wkey, []).append((seq, start * 1000, None, acc, False, 0))
    if corrected:
        for key_items in items.values():
            key_items.sort(key=lambda item: item[0])  # stable: a correction's two in order
    return items


def apply(
    wkey: WKey,
    kw: KeyWork,
    state: KeyState,
    unique_limit: int,
    items: Callable[[], Mapping[WKey, list[Item]]],
) -> tuple[bool, list[tuple[int, str, str]]]:
    """Fold the round's work on one key into its state, in place.

    Returns whether the state changed and the events that failed ((seq, meter id, reason):
    a unique reading over its limit). The parts are merged at once unless the state already
    holds part of the round, or a unique reading would pass ``unique_limit``: then the key's
    events (``items()``, computed when first needed) are folded one by one.
    """
    if state.last_seq >= kw.last_seq:
        return False, []
    is_reading = wkey[0] == 0
    replayed = state.replayed
    exact = (
        state.last_seq >= kw.first_seq
        or kw.rebuild
        or bool(replayed and any(kw.first_seq <= r <= kw.last_seq for r in replayed))
    )
    if not exact and is_reading and kw.meter.agg.uses_distinct:
        have = state.acc.distinct or set()
        new: set[str] = set()
        for part in kw.parts:
            if part.acc.distinct:
                new |= part.acc.distinct - have
        exact = len(have) + len(new) > unique_limit
    windows = open_page(state) if state.windows is not None else None
    width = kw.width
    if not exact:
        if windows is None:
            for part in kw.parts:
                merge_into(state.acc, part.acc)
                state.late += part.late
        else:
            for part in kw.parts:
                acc = _window(windows, part.at - part.at % width)
                merge_into(acc, part.acc)
            _prune(windows, width, kw.oldest)
        state.last_seq = kw.last_seq
        return True, []
    meter_id = kw.meter.meter.id
    last_seq = state.last_seq
    changed = False
    failures: list[tuple[int, str, str]] = []
    # (.get: a meter deleted during the round has no items left to fold)
    for seq, at_ms, number, dkey, late, sign in items().get(wkey, ()):
        if seq <= state.last_seq or (replayed and seq in replayed):
            continue
        try:
            # The unique limit is the reading's: a window never holds more distinct values
            # than the reading of the same series.
            if windows is None:
                target = state.acc
            else:
                seconds = at_ms // 1000
                target = _window(windows, seconds - seconds % width)
            limit = unique_limit if windows is None else NO_LIMIT
            if isinstance(dkey, Acc):  # a state rebuilt at a correction
                _assign(target, dkey)
            elif sign < 0:
                unfold(target, number)
            else:
                fold(target, number, dkey, at_ms, seq, limit)
            changed = True
            if late and is_reading:
                state.late += 1
        except ValueError_ as exc:
            failures.append((seq, meter_id, str(exc)))
        last_seq = seq
    if not changed and last_seq == state.last_seq:
        return False, failures
    if windows is not None:
        _prune(windows, width, kw.oldest)
    state.last_seq = last_seq
    return True, failures


def _assign(target: Acc, rebuilt: Acc) -> None:
    """``target`` made equal to ``rebuilt`` in place (a copy of its distinct values)."""
    for name in Acc.__slots__:
        setattr(target, name, getattr(rebuilt, name))
    if rebuilt.distinct is not None:
        target.distinct = set(rebuilt.distinct)


def _window(windows: dict[int, Window], start: int) -> Acc:
    """A page's window at ``start`` to fold into (new, or decoded only now)."""
    window = windows.get(start)
    if window is None:
        acc = windows[start] = Acc()
        return acc
    if isinstance(window, Acc):
        return window
    acc = windows[start] = as_acc(window)
    return acc


def _prune(windows: dict[int, Window], width: int, oldest: int) -> None:
    """Drop a page's windows that are no longer kept (they end at or before ``oldest``)."""
    if windows and min(windows) + width <= oldest:
        for start in [s for s in windows if s + width <= oldest]:
            del windows[start]
