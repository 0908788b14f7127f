"""The worker: fetch a batch -> decode -> match meters -> fold in memory -> write each key once
(compare-and-set) -> checkpoint -> ack.

Exactness rests on three things:

* Each partition (events are spread by subject) is read strictly in stream order by one
  consumer, the consumer of the worker that owns it, which starts right after the lowest
  checkpoint of the partitions it reads and skips what a partition's own checkpoint already
  covers. Every reading key belongs to exactly one partition, since its subject is part of the
  key. A worker that owns every partition reads the stream unfiltered while it keeps up,
  which costs nats-server far less than a filtered consumer per partition; one that owns
  some (or all, while behind: see _split) reads each of them through a consumer of its own,
  in one runner (``store.pull.Pullers``), and keeps a checkpoint position per partition.
* Each reading stores ``lastSeq``, the highest stream sequence folded into it. Folding skips
  events at or below it, so any replay (after a crash, a redelivery, a second owner, a backfill)
  changes nothing that was already applied.
* Writes are compare-and-set on the key's revision; a lost race re-reads and folds again. The
  checkpoint is written, and the batch acked, only after every write and dead letter of the
  batch is confirmed.
"""

import asyncio
import contextlib
import time
from collections.abc import Coroutine, Iterable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError

from kloudmeter_py.core.corrections import counted, epoch_ms, event_ms
from kloudmeter_py.core.keys import encode_token, reading_series
from kloudmeter_py.core.meters import CompiledMeter, to_reading
from kloudmeter_py.core.models import Event, encoder, event_decoder
from kloudmeter_py.core.plan import (
    CLOSED,
    CorrectionRow,
    Failure,
    Item,
    KeyMarks,
    KeyState,
    KeyWork,
    Rebuild,
    Rebuilt,
    Series,
    WKey,
    apply,
    close_page,
    empty_state,
    exact_items,
    fold_corrections,
    fold_rows,
    freeze,
    mark_dirty,
    mark_dirty_page,
    rebuild_targets,
    rebuilt_states,
    rolled,
    spread,
    thaw,
    touch_subjects,
)
from kloudmeter_py.core.summaries import encode_page
from kloudmeter_py.store.events import subject_events
from kloudmeter_py.store.kv import get_with_revision
from kloudmeter_py.store.pull import Pullers, RawPuller, ack_fields, pending_after
from kloudmeter_py.store.wire import WireMsg
from kloudmeter_py.worker.checkpoint import Checkpoint, partition_of
from kloudmeter_py.worker.corrections import Pending
from kloudmeter_py.worker.keystore import CHUNK, KeyStore, Write

if TYPE_CHECKING:
    from kloudmeter_py.worker import Worker

log = structlog.get_logger(__name__)

_Dead = dict[tuple[int, str], tuple[WireMsg, str | None, str]]


class Restart(Exception):
    """Start the worker's consumer again from its partitions' checkpoints."""


class Regroup(Restart):
    """Start again from the checkpoints, everything read so far written: a runner of every
    partition turns from one consumer to one per partition or back (see _split)."""


# (message, stream seq, event time ms, event)
_Row = tuple[WireMsg, int, int, Event]
# Events of one subject gathered in a round before they are folded together.
_FOLD_AT = 64
# Events left waiting after a round that make a backlog: once it is cleared, summaries are
# written at once (a blip of a few events at a steady rate is not one).
_BACKLOG = 1000
# Events a second that make a heavy stream (see _gather_wait, _flush_due): the live bench shape's
# ~20,000 a worker is one, its lag phase's 2,500-5,000 is not.
_HEAVY = 10_000
# Multi-get requests (up to 1,000 keys each) a runner keeps open at once.
_LOADS_IN_FLIGHT = 4
# Flush chunks stored at once (each of up to CHUNK keys of one bucket): 8, the atomic batches a
# bucket has in flight (keystore.BATCHES_IN_FLIGHT). At 16, a flush of ~25,000 readings (the
# wide bench shape at 10,000 subjects) held 16,000 encoded at once, half of them waiting for a
# batch slot, and each such flush or spill raised a worker's peak RSS by 3-6 MB between two
# samples. 4 was measured and not kept, when each write waiting in a chunk still held
# ~300-400 bytes of small objects: at 10,000 subjects the peaks moved within their spread
# (87.5-92.1 MB a worker against 89.2-93.7, three runs each), and the live shape's went up
# (83.0-92.8 MB against 80.3-86.3; end to end 0.572-0.613 against 0.595-0.643). Since 29ff72f
# a chunk's writes are made as they are sent (KeyStore.store_chunk), so a chunk in flight
# holds little more than its keys (README, Performance).
_FLUSHES_IN_FLIGHT = 8
_T = TypeVar("_T")
# Events a partition's consumer has still to deliver that make it behind: while two or more
# of a runner's are, it works through one of them at a time (see _focus). 20,000 with 4
# partitions; 5,000 with 16 keeps the backlog at which a runner of every partition splits
# its consumer (see _split) at 80,000, and makes a worker of 8 of 16 turn to one at a time
# while ~80,000 wait, as 2 of 4 did: left at 20,000, its first 160,000 took every key of
# its partitions at once (wide bench shape, peak RSS 176 against 158-164 MB a worker).
_FOCUS_AT = 5_000
# Longest a runner stays on one partition while another behind waits: what the waiting
# consumer has buffered must be taken well within its ack_wait (120 s, see _config).
_FOCUS_S = 60.0
# Partial states (series x finest window) a round may hold. A round's memory grows with its
# parts and keys, not its events: 50,000 live events (1,000 subjects, one minute) make ~5,000
# parts, 50,000 wide ones (10,000 subjects over 30 days) ~150,000, each with a key of its own
# in each level. Measured on a 300,000-event wide backlog: worker peak RSS 535 MB with rounds
# of 50,000 events, 353 MB with rounds of 25,000 (KV writes per event 4.16 -> 4.64). Since
# summaries are flushed every METER_SUMMARY_FLUSH_MS whatever the rounds, 75,000 -> 40,000
# parts (rounds of ~25,000 -> ~13,000 wide events) took a 500,000-event wide backlog's worker
# from 533 to 492 MB at the same rate, with 7% more KV writes. With pages parked (see
# worker.keystore) the rounds were the larger part: on a million-event wide backlog 40,000
# parts peaked at 438 MB, 28,000 at ~425, 20,000 at 380-383 (KV writes an event 1.16 ->
# 1.26-1.27, worker CPU ~8% more: more rounds for the same events). With pages spilled
# (METER_SPILL_MB), 10,000 rather than 20,000 (wide rounds of ~3,333 events, not ~6,666):
# two workers peaked at 125-131 MB a worker against 145-153 at 10,000 subjects, at 97 MB
# against 108-124 at 1,000, for ~10% more worker CPU (docs/performance-history.md). A live round
# (~5,000 parts in 50,000 events) is not bounded by it.
_ROUND_PARTS = 10_000
# Events in a consumer's first round, before it is known how many parts its events make:
# 5,000 (_ROUND_PARTS // 4 before). The live bench shape is short (200,000 events), and
# starting it at 2,500 made ~10% more KV writes an event (0.221-0.235 against ~0.2).
_FIRST_ROUND = 5_000
# Subjects a consumer's first round's events may name: it ends at _FIRST_ROUND events or
# once they name this many subjects, whichever comes first, its messages taken _FIRST_TAKE
# at a time; and while its rounds end so, the next ones do too, until a round's fresh keys
# (see _ROUND_FRESH) have been counted. A round's keys grow with the series its events
# touch, and until then nothing bounds them: on the wide bench shape at 10,000 subjects a
# worker's first 5,000 events named ~3,200 subjects and touched ~16,000-17,500 keys (~7,500
# at 1,000 subjects, where a worker's events name at most its ~500 subjects); with the first
# round alone held to 1,000 subjects, the second and third still made 3,333 events and
# ~17,500 keys each. Python's small-object heap grew to ~50 MB in those seconds (22 at
# start), and its arenas never go back below their high-water mark. Held to 1,000 subjects,
# the first three rounds made 1,131-1,289 events and ~6,800-7,300 keys; the mark then came
# later, at a fold after a turn's flush, at the same 51-53 MB (against 45-49 at 1,000
# subjects), so the peak RSS did not move (README, Performance). 400 rather than 1,000
# (2026-12-06): at 1,000 the early rounds still touched ~6,000-7,500 keys each, all fresh,
# at 10,000 subjects (a subject makes ~7 keys, where a round of a 1,000-subject worker
# names at most its ~500), and in two runs the Python blocks in use reached 494,000-
# 510,000 in those seconds (410,000-450,000 in the others); the arenas' high-water mark
# then stayed up to ~6 MB above the other worker's to the end (peaks 85.5 and 87.2 MB
# against ~81). 400 subjects make ~2,800 keys, about _ROUND_FRESH. The live bench shape
# (1,000 subjects, ~500 a worker) reaches it after ~800 events.
_FIRST_SUBJECTS = 400
_FIRST_TAKE = 250


# Keys a round may touch that the round before it did not touch ("fresh"), see _round_limit.
# They are what a round's memory grows with where its events spread over many subjects and
# windows: each is a key state read or taken back from the cache, with the round's work for
# it, beside what the cache already holds. Rounds of 3,333 events touched, on the wide bench
# shape at 10,000 subjects, ~17,400 keys (~10,600-12,600 fresh) while a worker read its 8
# partitions together and ~11,000 (~5,000 fresh) while it took them one at a time; at 1,000
# subjects ~7,400 (~2,100-2,700) and ~3,700 (~500-800); on the live shape a round's keys
# after the first are those of the round before (none fresh). Peak RSS a worker at 10,000
# subjects, two workers, one run each: 106.3 / 109.6 MB without the limit, 100.3 / 100.9 with
# 8,000, 99.3 / 98.2 with 5,000, 98.8 / 95.3 with 3,000 (rounds of 1,000-2,000 events). Three
# runs as it is: 97.7-100.1 MB (107.1-109.6 before), KV writes an event 0.56-0.61 (0.63-0.69),
# end to end 0.235-0.255 of the raw baseline (0.247-0.256); at 1,000 subjects 88.9-92.4 MB
# and live 0.561-0.602, as before: the limit seldom binds there (README, Performance).
_ROUND_FRESH = 3_000


def _round_limit(
    batch_size: int,
    events: int,
    parts: int,
    bytes_per_event: int = 0,
    room: int = 0,
    fresh: float = 0.0,
) -> int:
    """Events in the next round: METER_BATCH_SIZE, fewer where the last round's events each
    made parts of their own (many subjects or windows), so that its parts stay near
    _ROUND_PARTS, fewer where the key states a round touches (``bytes_per_event`` in
    the last round written, estimated) would not fit in ``room`` (half of METER_CACHE_MB),
    and fewer where the last round written touched keys the round before it did not
    (``fresh`` an event), so that about _ROUND_FRESH of them are new to a round.

    The fresh keys, not all keys, since a round that touches the keys the one before did
    (the live shape) holds nothing new: a live worker's ~10,000 keys are touched by every
    round, so rounds of at most 8,000 keys shrank to a few thousand events there (0.274 of
    the raw baseline against ~0.6, docs/performance-history.md). Fresh keys grow with a
    round's events, and a live round has none after the first.

    The key states are what a worker's memory grows with on the wide bench shape: a round of
    25,000 events touched ~84,000 keys whose states grew from ~100 to ~160 MB as the month
    pages filled, and they are all held until written.
    """
    if not parts or not events:
        return batch_size
    limit = events * _ROUND_PARTS // parts
    if bytes_per_event and room:
        limit = min(limit, room // bytes_per_event)
    if fresh:
        limit = min(limit, int(_ROUND_FRESH / fresh))
    return min(batch_size, max(1000, limit))


def _gathered(events: int, subjects: int, limit: int, first_subjects: int) -> bool:
    """Whether a round of ``events`` naming ``subjects`` subjects (those not yet folded) has
    all it may take: ``limit`` events, or for a consumer's first rounds (``first_subjects``
    not 0) that many subjects (see _FIRST_SUBJECTS)."""
    return events >= limit or 0 < first_subjects <= subjects


def _heavy(events: int, since: float, linger: float) -> bool:
    """Whether a round's events came at _HEAVY a second or more: ``events`` taken ``since``
    seconds after the last round began to gather (at least ``linger``)."""
    return events >= _HEAVY * max(since, linger)


def _gather_wait(
    gathered: float,
    *,
    backlog: bool,
    heavy: bool,
    flush_s: float,
    linger: float,
    others_behind: bool = False,
) -> float:
    """How long a round that has gathered for ``gathered`` seconds waits for more events
    (0: the round is complete).

    A round gathers for up to METER_FLUSH_MS (``flush_s``) while a ``backlog`` waits in
    the consumers it takes from (not those waiting their turn, see _focus) or the stream is
    ``heavy``, else for ``linger``. A heavy stream with nothing waiting on the server is
    given ``linger`` at a time: when it pauses, the round ends. Before, the round waited
    out the rest of METER_FLUSH_MS after the last event of a burst. On the live bench shape
    (200,000 events published as fast as the bench can, two workers), the time from the
    last publish to final readings (``e2e_settle_ms``) was 1.41-1.54 s of ~3.7 s and is
    0.51-0.59 s of ~3.0 s: end to end 0.514-0.549 -> 0.644-0.698 of the raw JetStream
    baseline, at the same ~0.2 KV writes an event.

    A round of a runner working through one partition's backlog while others wait their
    turn (``others_behind``, see _focus) ends once the one in hand has delivered all it had
    (no ``backlog``), without a linger: the next partition behind is taken at once. One
    worker on the live bench shape (16 partitions, one at a time after its split) waited
    out METER_FLUSH_MS at the end of each partition, ~14 of its ~18 s (0.141 of the raw
    baseline); with only the linger left, 0.358-0.367; with neither, 0.444-0.457.
    """
    if others_behind and not backlog:
        return 0.0
    left = (flush_s if backlog or heavy else linger) - gathered
    return left if backlog else min(left, linger)


def _flush_due(
    *,
    dirty: bool,
    waited: float,
    pending: int,
    heavy: bool,
    behind: bool,
    cache_full: bool,
    flush_s: float,
    summary_flush_s: float,
) -> bool:
    """Whether a stored round's deferred keys are flushed now (then the checkpoint and the
    acknowledgement), ``waited`` seconds after the first round not yet flushed.

    Now: nothing deferred, METER_SUMMARY_FLUSH_MS (``summary_flush_s``) passed, or the cache
    full; else only when caught up (nothing left ``pending`` and not a ``heavy`` stream),
    once a backlog has just been cleared (``behind``) or METER_FLUSH_MS (``flush_s``) passed.

    A worker that keeps up with a heavy stream writes as under a backlog: on the live bench
    shape two workers each kept up with ~20,000 events a second in rounds of 4,000-20,000
    events, and writing their summaries every second (7,500 keys a worker) and their readings
    every ~0.5 s made 0.40-0.48 KV writes an event, against 0.12 for one worker, which fell
    behind and deferred them; with this rule 0.18-0.20.
    """
    if not dirty or cache_full or waited >= summary_flush_s:
        return True
    caught_up = pending == 0 and not heavy
    return caught_up and (behind or waited >= flush_s)


def _focus(
    pending: list[int],
    current: int | None,
    since: float,
    *,
    at: int,
    release: int,
    slice_s: float,
) -> tuple[int | None, frozenset[int]]:
    """The consumer a runner of several partitions works through alone (None: all of them
    together) and those that wait meanwhile, from what each has still to deliver
    (``pending``), the one it is on (``current``) and for how long (``since``, seconds).

    Once two or more are behind (``at`` events or more each), one of them is taken from and
    the others behind wait; one that keeps up is still taken from. The one in hand is kept
    until it has caught up (fewer than ``release`` left) or, while others are behind, its
    share of ``slice_s`` has passed (all of it with one other, half with two...: none waits
    longer in all); then the next behind in turn, or all together when none is.
    At each change the runner writes what it holds and empties its key cache once that has
    reached METER_SPILL_MB (see _lets_go), so that it holds one backlogged partition's keys
    at a time, not all of its partitions': every key belongs to one partition (its
    subject's), and on the wide bench shape a backlog touches every key of its partition.
    It is kept until caught up, not only until below ``at``: the last 18,000 events of a
    partition's wide backlog still touched most of its keys, which then stayed beside the
    next one's. Taking the backlogs one after the other also clears the first in about half
    the time, where together they all finished at the end.

    What it bought on the wide bench shape (a million events, two workers of two partitions
    each; three runs against two of the code before, the same hour): at 10,000 subjects peak
    RSS a worker 248-252 -> 176-184 MB, KV writes an event 0.55-0.56 -> 0.47-0.50, worker CPU
    ~79 -> 65-68 s, end to end 0.211-0.227 -> 0.24-0.245 of the raw baseline; at 1,000
    subjects 123-127 -> 109-113 MB. What a worker holds then grows with its largest
    partition's keys, not with all of its partitions'. One worker that owns every partition
    reads a consumer per partition while it is behind (see _split), and is helped the same
    way.
    """
    behind = [i for i, n in enumerate(pending) if n >= at]
    others = [i for i in behind if i != current]
    # Several waiting share the slice, so that none waits longer than slice_s in all.
    if (
        current is not None
        and pending[current] >= release
        and (not others or since < slice_s / len(others))
    ):
        focus = current
    elif others and (current is not None or len(behind) >= 2):
        later = [i for i in others if current is not None and i > current]
        focus = (later or others)[0]
    else:
        return None, frozenset()
    return focus, frozenset(i for i in behind if i != focus)


def _split(
    backlog: int, *, merged: bool, focus: int | None, partitions: int, at: int, release: int
) -> bool:
    """Whether a runner that owns every one of ``partitions`` reads them through a consumer
    per partition (and so works through their backlogs one at a time, see _focus) rather
    than through one unfiltered consumer, with ``backlog`` events still to read.

    One consumer costs nats-server least and is how such a runner reads while it keeps up.
    It splits once the backlog is ``at`` events a partition or more (then two or more
    partitions are likely behind by ``at``, where _focus takes one at a time), and reads
    through one consumer again once it works through none alone (``focus`` None) and has
    fewer than ``release`` left (or than it splits at, if that is less: joined with more, it
    would split again at once): caught up.

    Why: one worker (``up --workers 1``, or ``kloudmeter worker`` alone) reading the wide
    bench shape's million events through one consumer held every key of every partition in
    its cache. At 10,000 subjects (three runs against two of the code before, the same
    hour): peak RSS 399-403 -> 188-199 MB, KV writes an event 0.89-1.0 -> 0.45, worker CPU
    94-108 -> 67-72 s, end to end 0.123-0.125 -> 0.164-0.18 of the raw baseline; at 1,000
    subjects 158 -> 112 MB and 0.198 -> 0.259. Each change of consumers writes what the
    runner holds and starts again from the checkpoints (Regroup), so it must be rare: the
    wide backlog split once and joined once, and the live bench shape's one worker never
    had 80,000 events waiting.
    """
    if partitions < 2:
        return False
    if merged:
        return focus is not None or backlog >= min(release, at * partitions)
    return backlog >= at * partitions


def _lets_go(held: int, packed: int, spill_mb: int, *, unheld: int, keys: int) -> bool:
    """Whether a runner that turns to another partition's backlog (see _focus) first writes
    what it holds and lets its key cache go: when that holds ``held`` bytes (estimated) of
    METER_SPILL_MB or more, or its packed readings ``packed`` bytes of a quarter of it, or
    ``held`` reaches three quarters of it while most of the next round's ``keys`` are not
    held (``unheld``: a partition whose keys are not cached).

    Letting go bounds what a runner holds to about one partition's keys where they are
    many (the wide bench shape). Where they are few it only costs: each turn writes every
    key the rounds before touched, and the next pass reads them again. One worker on the
    live bench shape (1,000 subjects; every key of its 16 partitions ~11 MB estimated)
    turned 16 times in ~2 s once it fell behind, and made ~0.30 KV writes an event against
    ~0.10 in a run that kept up. Keeping them below METER_SPILL_MB: 0.224 KV writes an event
    and 0.499-0.509 of the raw baseline in the runs that split (0.444-0.473 before). The
    wide shape at 10,000 subjects is unchanged, as a partition's keys reach the threshold
    (0.247-0.256, 107-109 MB a worker); at 1,000 subjects 0.088-0.118 KV writes an event
    against 0.114-0.122.

    The readings, since a spill lets them go only where they are half of METER_SPILL_MB
    (_spills; before 2026-12-06 never): at a turn that kept the cache, the readings of
    the partitions turned away from stayed, and a wide worker at 10,000 subjects came to
    hold ~17,000 of them (~4.4 MB estimated, ~4,400 a partition) besides its pages; each a
    key string and a small value in Python's arenas, which keep their high-water mark.
    A quarter of 12 MB is ~11,000 readings: two or three such partitions. The live shape's
    worker holds ~2 MB of readings in all (~7,000), and never reaches it. On the wide shape
    at 10,000 subjects (two workers, three runs against three of b96d827): peak RSS a worker
    82.9-86.1 MB against 84.4-89.4, KV writes an event 0.598-0.619 against 0.577-0.663
    (README, Performance).

    Three quarters, where the next round's keys are mostly to be read: such a round folds
    its keys, all new to the cache, on top of what the turn kept, and pages are spilled
    only after a round; at 10,000 subjects a worker's cache went from 11.0 to 16.5 MB
    (estimated) in 0.65 s at such a turn. Three quarters at every turn (f8412a1, reverted)
    lowered those peaks, but one worker on the live shape, whose 16 partitions' keys all fit
    (7-11 MB estimated) and are cached from its pass before, then let them go at its 12-17
    turns: 0.249-0.257 KV writes an event against 0.222-0.224. Whether the next round's
    keys are held tells the two apart, as a key belongs to one partition. Wide shape, two
    workers, against the code before (95e0ac6), interleaved: a worker let go at 10-13 of
    its 12-16 turns at 10,000 subjects (2-4 of 9-11 at 1,000); peak RSS a worker at 10,000
    subjects 81.8-85.9 MB (mean ~83.8, five runs) against 83.1-86.2 (~84.3, four), at
    1,000 80.6-84.3 (~82.8, three) against 81.2-86.6 (~83.1, three): within the spread;
    KV writes an event and end to end too. One worker on the live shape let go at 0-1 of
    its 17 turns (0.202-0.235 KV writes an event against 0.202-0.224). Also measured and
    not kept, where the next keys are not held: letting go from half of METER_SPILL_MB
    (one live worker let go at 2 of 17 turns, 0.273 KV writes an event), or once packed
    readings reach an eighth of it (~83.5 MB a worker at 10,000 subjects, four runs).
    README, Performance.
    """
    spill = spill_mb << 20
    return held >= spill or packed >= spill // 4 or (2 * unheld > keys and 4 * held >= 3 * spill)


def _spills(parked: int, packed: int, spill_mb: int) -> tuple[bool, bool]:
    """Whether a runner behind a backlog, after a round, writes what the rounds since the
    last flush changed and lets go of what it holds between rounds (see Runner._spill):
    once its parked pages ``parked`` and packed readings ``packed`` (bytes, estimated) reach
    METER_SPILL_MB together; and whether its readings go as well as its pages: where they
    are half of it or more.

    Both, not the pages alone: a partition's readings are the series of its subjects,
    which every round of its backlog touches, so they grow with the subjects (on the wide
    bench shape with 16 partitions ~440 a partition at 1,000 subjects, ~4,400 at 10,000,
    ~13,000 at 30,000), and beside pages bounded alone so did what a worker held: at its
    peaks 12.5-13.8 MB (estimated) at 1,000 subjects, 13.8-16.1 at 10,000, 14.6-17.4 at
    30,000 and 19.2-19.3 at 100,000, pages 9.9-12.3 MB of it. Counted with the pages, it
    held 10.8-13.0 MB at every size, and peak RSS a worker went (means; two workers, the
    codes' runs interleaved, 2026-12-06): 1,000 subjects 83.3 -> 81.2 MB, 10,000 83.8 ->
    82.8 (medians 84.1 -> 81.7), 30,000 86.8 -> 81.0, 100,000 96.3 -> 84.1, for more KV
    writes an event (pages spilled sooner and read again): 0.109 -> 0.115, 0.630 ->
    0.745, 1.82 -> 2.17 and 3.46 -> 4.29; events a second end to end and worker CPU
    within the spread (README, Performance). Readings are written and let
    go only where they are half of it: the next round reads them again, as it does the
    pages it touches.
    """
    spill = spill_mb << 20
    if parked + packed < spill:
        return False, False
    return True, 2 * packed >= spill


def _chunks(keys: list[tuple[int, str]]) -> list[list[tuple[int, str]]]:
    """The keys in chunks of up to CHUNK of one bucket each, in order."""
    by_store: dict[int, list[tuple[int, str]]] = {}
    for wkey in keys:
        by_store.setdefault(wkey[0], []).append(wkey)
    return [
        names[i : i + CHUNK] for names in by_store.values() for i in range(0, len(names), CHUNK)
    ]


def _in_turn(by_store: dict[int, list[str]]) -> list[tuple[int, list[str]]]:
    """Each bucket's keys in chunks of up to CHUNK, the buckets taken in turn."""
    chunks = [
        (n, store, names[i : i + CHUNK])
        for store, names in by_store.items()
        for n, i in enumerate(range(0, len(names), CHUNK))
    ]
    chunks.sort(key=lambda c: c[0])  # (stable: the buckets keep their order in each turn)
    return [(store, names) for _, store, names in chunks]


async def _all(coros: Iterable[Coroutine[Any, Any, _T]]) -> list[_T]:
    """Run side by side; the first failure cancels the rest and is raised as itself."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coros]
    except BaseExceptionGroup as eg:
        raise eg.exceptions[0] from None
    return [t.result() for t in tasks]


class _Round:
    """One write round: its messages, its events folded per series and finest window, the
    work per key (store, key) and, only when needed, the events per key one by one."""

    def __init__(self, levels: list[tuple[int, int, int]], position: int) -> None:
        self.levels = levels
        self.last = position  # highest stream sequence in the round
        # The ack subjects of the last message taken from each consumer: acknowledged after
        # the round (AckAll), and the position each partition's consumer has reached.
        self.marks: list[str] = []
        # With a consumer per partition: the last sequence taken from each partition.
        self.lasts: dict[int, int] = {}
        self.rows: list[tuple[WireMsg, int, int]] = []  # (message, stream seq, stored-at ms)
        # the same rows by NATS subject (one event type and subject), until they are folded
        self.by_subject: dict[str, list[tuple[WireMsg, int, int]]] = {}
        self.series: Series = {}  # (reading key, finest window) -> part
        self.dead: _Dead = {}
        self.dropped: set[int] = set()  # sequences dropped by the long dedup
        # store 0 is the readings bucket, 1.. the summary levels
        self.work: dict[WKey, KeyWork] = {}
        self.items: dict[WKey, list[Item]] | None = None
        self._by_seq: dict[int, WireMsg] | None = None
        # Correction events, set aside until the round's other events are folded, then
        # resolved (worker.corrections) into what each takes out and puts in.
        self.corrections: list[Pending] = []
        self.correction_rows: list[CorrectionRow] = []
        self.rebuilt: list[Rebuilt] = []  # unique meters' states rebuilt at corrections
        self.held = 0  # estimated bytes of the pages the round parked (KeyStore.park)
        self.heavy = False  # its events came at _HEAVY a second or more
        # The first round after the runner turned to another partition's backlog (or back
        # to all of them, see _focus); and whether what is cached is then written and let
        # go before it (_lets_go), decided once where the round is handed to _process.
        self.switch = False
        self.let_go = False

    def release(self) -> None:
        """Drop what only the round's write needed (its messages, keys and parts)."""
        self.rows = []
        self.work = {}
        self.items = None
        self._by_seq = None
        self.corrections = []
        self.correction_rows = []
        self.rebuilt = []

    def by_seq(self) -> dict[int, WireMsg]:
        if self._by_seq is None:
            self._by_seq = {seq: msg for msg, seq, _ in self.rows}
        return self._by_seq


def _clean_header(text: str) -> str:
    return " ".join(text.split())[:500]


class Runner:
    """The in-order reader of the partitions a worker owns: one consumer for all of them."""

    def __init__(self, worker: "Worker", partitions: list[int], run: int = 1) -> None:
        self.w = worker
        self.partitions = partitions
        self.layout = worker.layout
        self.settings = worker.settings
        self.consumer = f"{self.layout.stream}-w{worker.worker_id}-{run}"
        self.log = log.bind(partitions=partitions, worker=worker.worker_id)
        self.keys = KeyStore(worker, self.log)
        self.cp = Checkpoint(worker.offsets, partitions, worker.worker_id)
        # Summaries changed in memory but not yet written, the last message not yet acked,
        # and since when: all are flushed together with the checkpoint.
        self._defer = self.settings.summary_flush_ms > 0
        # The readings to write at the next flush: the meter (generation) each was folded
        # for, by key (its subject and group values are in the key: core.keys.reading_series).
        # Held by key string only, as the pages (written as they are parked) are: per
        # reading, a (store, key) tuple and a (meter, subject, groups) one, with the subject
        # and group values they kept alive, were ~100,000 objects of a wide worker's peak at
        # 10,000 subjects (~25,000 readings waiting).
        self._dirty: dict[str, CompiledMeter] = {}
        self._dirty_pages: dict[int, set[str]] = {}  # store -> keys of pages to write
        self._unacked: list[str] | None = None  # marks of the last round stored, not acked
        self._behind = False  # the last round left a backlog (_BACKLOG events or more) waiting
        # Events arrived at _HEAVY events a second or more for the last round: a heavy
        # stream, even when the worker keeps up with it (see _process).
        self._heavy = False
        self._last_start = 0.0  # when the last round began to gather
        self._unflushed_at = 0.0
        self._pull_batch = min(self.settings.batch_size, 1000)
        self._load_slots = asyncio.Semaphore(_LOADS_IN_FLIGHT)
        self._flush_slots = asyncio.Semaphore(_FLUSHES_IN_FLIGHT)
        self._bytes_per_event = 0  # key state bytes per event of the last round written
        # Keys the last round written touched that the one before it did not, per event;
        # and (as marks) those it touched (see _round_limit).
        self._fresh_per_event = 0.0
        self._counted = 0  # rounds whose fresh keys were counted
        self._last_keys: KeyMarks | None = None
        # Meter id -> subjects of the readings the rounds since the last checkpoint touched,
        # read again or not: the alerts are made from them before the checkpoint
        # (worker.alerts; core.plan.touch_subjects).
        self._touched: dict[str, set[str]] = {}
        # A consumer per partition (some of the partitions, not all, or all of them while
        # behind: see _split), else one for all.
        self.owns_all = len(partitions) == self.settings.partitions
        self._merge(1 < len(partitions) < self.settings.partitions)
        self._lasts: dict[int, int] = {}  # per partition, the last sequence taken (merged)
        # The consumer (index) worked through alone, since when, and whether the next round
        # is the first since it changed (see _focus; merged only).
        self._focus: int | None = None
        self._focus_since = 0.0
        self._switch = False

    def _merge(self, merged: bool) -> None:
        """Read through a consumer per partition (``merged``) or one for all."""
        self.merged = merged
        self._consumers: list[str] = (
            [f"{self.consumer}-{p}" for p in self.partitions] if merged else [self.consumer]
        )

    def meter_added(self, cm: CompiledMeter) -> None:
        """A meter that should have seen events already applied: replay them. Before the
        checkpoints are read that is not known yet, so the replay is asked for anyway
        (``Checkpoint.begin`` drops it when every checkpoint is below its start)."""
        if self.cp.needs_replay(cm.meter.startSeq):
            self.cp.ask_replay(cm.meter.startSeq + 1, {cm.meter.id})
            self.log.info(
                "partition.replay_requested", meter=cm.meter.id, start=cm.meter.startSeq + 1
            )

    def inherit(self, start: int | None, meters: set[str]) -> None:
        """Replay from ``start`` for ``meters`` (asked of the runner before this one)."""
        self.cp.ask_replay(start, meters)

    async def run(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._consume()
            except asyncio.CancelledError:
                raise
            except Regroup as exc:
                self.w.stats.regroups += 1
                self.log.info("partition.regroup", reason=str(exc))
            except Restart as exc:
                self.w.stats.restarts += 1
                self.log.info("partition.restart", reason=str(exc))
                backoff = 0.1
            except Exception as exc:
                self.w.stats.restarts += 1
                self.log.warning(
                    "partition.error", error=repr(exc), retry_in=backoff, exc_info=True
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                self._let_go_keys()
                for name in self._consumers:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(2):
                            await self.w.js.delete_consumer(self.layout.stream, name)

    def _config(self, name: str, partition: int | None, start: int) -> ConsumerConfig:
        """A consumer of one partition (``partition``), or unfiltered, after ``start``.

        Unfiltered is every partition (the stream holds only events): a worker that owns
        them all reads them in one stream order. One with some but not all has a consumer
        per partition (see ``Pullers``), filtered on its literal prefix. Not one consumer
        with several filter subjects: nats-server delivers those slowly on a stream of many
        subjects (200,000 wide events, 10,000 subjects, nats-server 2.15.1, pulled 1,000 at
        a time by nats-py: ~780 a second to a consumer of two of four partitions, against
        ~13,700 to a consumer of one and ~11,000, all of them, to an unfiltered one). Nor one
        unfiltered consumer per worker that skips the others' events, as before: nats-server
        then delivered every event to every worker. On the live bench shape two workers used
        6.0-8.1 s of CPU with nats-server in eleven runs that way, 5.0-5.7 s in six with a
        consumer per partition (and the heavy-stream rounds of ``_process``); one worker
        4.5 s.
        """
        config = ConsumerConfig(
            name=name,
            ack_policy=AckPolicy.ALL,
            # Redelivery is never relied on: any out-of-order message restarts from checkpoint.
            ack_wait=120.0,
            max_deliver=-1,
            # Rounds are acknowledged when the summaries are flushed, several rounds at once.
            max_ack_pending=10 * self.settings.batch_size + 2 * self._pull_batch,
            inactive_threshold=60.0,
            num_replicas=1,
            mem_storage=True,
        )
        if partition is not None:
            config.filter_subject = self.layout.partition_filter(partition)
        if start > 0:
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = start + 1
        else:
            config.deliver_policy = DeliverPolicy.ALL
        return config

    async def _consume(self) -> None:
        lowest = await self.cp.begin()
        self._forget_unflushed()
        if self.owns_all:
            info = await self.w.js.stream_info(self.layout.stream)
            self._merge(
                _split(
                    int(info.state.last_seq or 0) - lowest,
                    merged=False,
                    focus=None,
                    partitions=len(self.partitions),
                    at=_FOCUS_AT,
                    release=_BACKLOG,
                )
            )
        for name in self._consumers:
            with contextlib.suppress(NotFoundError):
                await self.w.js.delete_consumer(self.layout.stream, name)
        wire = await self.w.wire()
        puller: RawPuller | Pullers
        if self.merged:
            # Each partition's consumer starts after its own checkpoint.
            ready = asyncio.Event()
            pullers = []
            # Each consumer pulls less at a time the more there are: what a consumer holds
            # when the runner turns to another's backlog stays buffered while it waits (see
            # _focus), up to ~2.5 pulls of it. With 1,000 a pull, two workers of 8
            # partitions each held 12,000-15,000 messages through the wide bench shape; at
            # 250 4,000-5,500, and peak RSS a worker went 111-114 -> 106 MB at 10,000
            # subjects and 91.5-94.7 -> 87-88.5 at 1,000 (live unchanged, 0.61). Not below
            # 250: one worker of 16 partitions pulling 125 at a time fell from 0.17 to 0.147
            # of the raw baseline (0.163 at 250). Nor above METER_BATCH_SIZE's pull.
            pull = self._pull_batch
            batch = max(min(250, pull), pull * 2 // len(self.partitions))
            for name, p in zip(self._consumers, self.partitions, strict=True):
                await self.w.js.add_consumer(
                    self.layout.stream, self._config(name, p, self.cp.floor[p])
                )
                pullers.append(
                    RawPuller(
                        wire,
                        self.layout.stream,
                        name,
                        batch,
                        max_buffer=self.settings.batch_size,
                        ready=ready,
                    )
                )
            puller = Pullers(pullers)
        else:
            one = self.partitions[0] if len(self.partitions) == 1 else None
            if self.settings.partitions == 1:
                one = None  # the stream holds only events: unfiltered is every partition
            await self.w.js.add_consumer(
                self.layout.stream, self._config(self.consumer, one, lowest)
            )
            puller = RawPuller(
                wire,
                self.layout.stream,
                self.consumer,
                self._pull_batch,
                max_buffer=self.settings.batch_size,
            )
        self._lasts = dict(self.cp.floor)
        self._focus, self._switch = None, False
        await puller.start()
        self.log.debug("partition.consuming", start=lowest + 1)
        # The first round is kept small until it is known how many parts events make.
        round_limit = min(self.settings.batch_size, _FIRST_ROUND)
        # (0 once a round ends short of it, or a round's fresh keys have been counted)
        first_subjects = _FIRST_SUBJECTS
        counted = self._counted
        flush_after = self.settings.flush_ms / 1000
        linger = min(0.1, flush_after)
        # The previous round's writes, still in flight while the next round is gathered and
        # folded; a round's writes start only after the previous round's are stored.
        writing: asyncio.Task[None] | None = None
        try:
            while True:
                if writing is not None and (writing.done() or not puller.buffered):
                    await writing
                    writing = None
                if self.cp.restart_from is not None:
                    raise Restart("replay for a new meter")
                wait = 1.0
                if self._unacked is not None:  # flush deferred summaries once idle
                    wait = min(1.0, max(0.0, self._unflushed_at + flush_after - time.monotonic()))
                take = min(round_limit, _FIRST_TAKE) if first_subjects else round_limit
                msgs = await puller.take(take, timeout=wait)
                if not msgs:
                    # Idle: whatever comes next is not gathered as a heavy stream's (the
                    # first round after a burst would otherwise wait up to METER_FLUSH_MS).
                    self._heavy = False
                    if writing is not None:
                        # The round before is still being written: finish it before anything
                        # here flushes. A consumer that waits its turn (see _focus) keeps
                        # messages buffered, so the loop's head does not wait for the write
                        # when the one in hand has nothing; a flush run beside the write then
                        # cleared the dirty marks the write added meanwhile, and the pages
                        # they marked were never written once the cache was emptied at the
                        # next turn (the reads bench at 16 partitions: 711 of a million
                        # events missing from subjects' day pages, readings and rollups
                        # exact).
                        await writing
                        writing = None
                    if isinstance(puller, Pullers) and puller.waiting:
                        # The partition in hand delivers nothing (say its last events were
                        # removed by the stream's limits): the others wait no longer than
                        # its slice.
                        self._turn(puller)
                    if (
                        self._unacked is not None
                        and time.monotonic() - self._unflushed_at >= flush_after
                    ):
                        await self._flush(puller)
                    if self.cp.replay_done():
                        self.cp.end_replay()
                    continue
                # A write round gathers what arrives within flush_ms (or up to batch_size
                # events): more events per round means fewer writes per event. A subject's
                # events are folded together, once _FOLD_AT of them are in or at the end.
                started = time.monotonic()
                await self.w.registry.catch_up()
                rnd = _Round(self._levels, self.cp.folded)
                self.w.registry.new_round()
                rnd.switch, self._switch = self._switch, False
                self._add(rnd, msgs, puller)
                while not _gathered(
                    len(rnd.rows), len(rnd.by_subject), round_limit, first_subjects
                ):
                    # More waiting: gather up to METER_FLUSH_MS. Caught up: linger a moment
                    # for what is arriving, so a steady stream makes rounds of useful size.
                    # Only what the consumers taken from still have counts: once the one a
                    # runner works through alone (see _focus) has delivered all it had, the
                    # round ends, though the others wait with their backlogs. Counted with
                    # them, the round waited out METER_FLUSH_MS for nothing at the end of
                    # each partition's backlog: one worker of 16 partitions spent ~14 of
                    # the live bench shape's ~18 s so (0.14 of the raw baseline).
                    waiting = puller.waiting if isinstance(puller, Pullers) else frozenset()
                    wait = _gather_wait(
                        time.monotonic() - started,
                        backlog=pending_after(rnd.marks, waiting) > 0,
                        others_behind=bool(waiting),
                        heavy=self._heavy,
                        flush_s=flush_after,
                        linger=linger,
                    )
                    if wait <= 0:
                        break
                    msgs = await puller.take(min(round_limit - len(rnd.rows), take), timeout=wait)
                    if not msgs:
                        break
                    self._add(rnd, msgs, puller)
                spread_out = 0 < first_subjects <= len(rnd.by_subject)
                # The rate the round's events came at: since the last round began, which
                # is when the worker last took what had arrived.
                since = time.monotonic() - self._last_start
                self._heavy = rnd.heavy = _heavy(len(rnd.rows), since, linger)
                self._last_start = started
                await self._fold_round(rnd)
                if not spread_out or self._counted > counted:
                    first_subjects = 0
                round_limit = _round_limit(
                    self.settings.batch_size,
                    len(rnd.rows),
                    len(rnd.series),
                    self._bytes_per_event,
                    self.keys.cache_budget // 2,
                    self._fresh_per_event,
                )
                # Pull ahead about one round (its parts bound a round of the wide shape to
                # ~3,300 events; 50,000 pulled ahead held ~18 MB more at ~13,000).
                puller.max_buffer = max(round_limit, self._pull_batch)
                if isinstance(puller, Pullers):
                    self._turn(puller)
                if writing is not None:
                    await writing
                # The keys the round changes, once the round before is written (its keys'
                # work let go): at a turn, whether they are held decides _lets_go.
                self._spread(rnd)
                if rnd.switch:
                    holds = self.keys.holds
                    rnd.let_go = _lets_go(
                        self.keys.cache_bytes,
                        self.keys.packed_bytes,
                        self.settings.spill_mb,
                        unheld=sum(1 for wkey in rnd.work if not holds(wkey)),
                        keys=len(rnd.work),
                    )
                    self.w.stats.let_goes += rnd.let_go
                if self.owns_all and self._regroup(puller, rnd):
                    # Write this round and everything before it, then start again from the
                    # checkpoints with the other kind of consumer.
                    writing = None
                    await self._process(puller, rnd, started)
                    if self._unacked is not None or self._has_dirty():  # not flushed by it
                        await self._flush(puller)
                    raise Regroup(
                        "one consumer per partition" if not self.merged else "one consumer"
                    )
                writing = asyncio.create_task(self._process(puller, rnd, started))
                if rnd.let_go:
                    # A turn that lets the cache go (see _process) writes everything the
                    # rounds before held: the next round is folded once that is done and
                    # let go, not beside it. Folded beside it, the next round's parts came on
                    # top of ~13,000 readings and ~13,000 pages and the flush's encoded
                    # writes at 10,000 subjects (wide bench shape): ~50 MB of Python objects
                    # in use, whose arenas stayed the worker's (45 at 1,000 subjects).
                    await writing
                    writing = None
        except asyncio.CancelledError:
            if writing is not None:
                writing.cancel()
            raise
        finally:
            # A round being written finishes (or, when the runner is cancelled, stops) before
            # the consumer is read again; its outcome no longer matters.
            if writing is not None:
                try:
                    await asyncio.wait({writing})
                finally:
                    if writing.done() and not writing.cancelled():
                        writing.exception()
            with contextlib.suppress(Exception):
                await puller.stop()

    def _regroup(self, puller: RawPuller | Pullers, rnd: _Round) -> bool:
        """Whether a runner of every partition turns to the other kind of consumer after
        this round (see _split)."""
        if isinstance(puller, Pullers):
            backlog = sum(puller.pending())
        else:
            backlog = pending_after(rnd.marks)
        want = _split(
            backlog,
            merged=self.merged,
            focus=self._focus,
            partitions=len(self.partitions),
            at=_FOCUS_AT,
            release=_BACKLOG,
        )
        return want != self.merged

    def _turn(self, puller: Pullers) -> None:
        """Which partition the next rounds take from (see _focus)."""
        now = time.monotonic()
        pending = puller.pending()
        focus, puller.waiting = _focus(
            pending,
            self._focus,
            now - self._focus_since,
            at=_FOCUS_AT,
            release=_BACKLOG,
            slice_s=_FOCUS_S,
        )
        if focus != self._focus:
            self._focus, self._focus_since, self._switch = focus, now, True
            self.w.stats.turns += 1
            self.log.debug(
                "partition.focus",
                partition=None if focus is None else self.partitions[focus],
                pending=dict(zip(self.partitions, pending, strict=True)),
            )

    @staticmethod
    async def _keep_alive(puller: RawPuller | Pullers, marks: list[str]) -> None:
        """A long write round tells the server it is still working on the batch."""
        while True:
            await asyncio.sleep(20)
            puller.working(marks)

    def _add(self, rnd: _Round, msgs: list[WireMsg], puller: RawPuller | Pullers) -> None:
        """Check the order of newly arrived messages and add them to the round."""
        rows = rnd.rows
        by_subject = rnd.by_subject
        last = rnd.last
        covered = self.cp.covered
        early = self.w.dedup is None  # the long dedup looks at a whole round at once
        # In stream order within a partition: across partitions only with one consumer.
        lasts = self._lasts if self.merged else None
        for msg in msgs:
            seq, delivered, stored_ns, _ = ack_fields(msg.reply)
            if lasts is None:
                if delivered != 1 or seq <= last:
                    raise Restart(f"out of order at stream seq {seq}")
                last = seq
            else:
                p = partition_of(msg.subject)
                if delivered != 1 or seq <= lasts.get(p, 0):
                    raise Restart(f"out of order at stream seq {seq} (partition {p})")
                lasts[p] = seq
                last = max(last, seq)
            if covered(msg.subject, seq):
                continue  # applied before: its partition's checkpoint covers it
            row = (msg, seq, stored_ns // 1_000_000)
            rows.append(row)
            # A round holds its messages until it is written: keep them small. The puller
            # keeps the ack subject of each consumer's last message taken (marks), and one
            # subject string serves all the messages of a subject.
            msg.reply = ""
            same = by_subject.get(msg.subject)
            if same is None:
                by_subject[msg.subject] = [row]
            else:
                msg.subject = same[0][0].subject
                same.append(row)
                if len(same) >= _FOLD_AT and early:
                    # Enough of one subject to fold together: fold them now rather than
                    # all at the end of the round.
                    self._fold_rows(rnd, same)
                    del by_subject[msg.subject]
        rnd.last = last
        rnd.marks = puller.marks()
        if lasts is not None:
            rnd.lasts = dict(lasts)
        if self.cp.restart_from is not None:
            raise Restart("replay for a new meter")

    def _fold_rows(self, rnd: _Round, rows: list[tuple[WireMsg, int, int]]) -> None:
        """Decode and fold rows of one subject (without the long dedup)."""
        decode = self._decode
        dead = rnd.dead
        decoded: list[_Row] = []
        for msg, seq, stored_ms in rows:
            event = decode(msg, seq, dead)
            if event is not None:
                if event.correction is not None:
                    rnd.corrections.append((msg, seq, event, stored_ms))
                    continue
                decoded.append((msg, seq, event_ms(event, stored_ms), event))
        if decoded:
            self._fold(rnd, decoded)
        # Folded before the round ends, and not in stream order across subjects: a meter
        # added from now on with an earlier start must replay (see meter_added).
        self.cp.folded = max(self.cp.folded, rows[-1][1])

    async def _fold_round(self, rnd: _Round) -> None:
        """Decode the round's events and fold them, the events of one subject together (one
        subject's events at a time, so that few decoded events are alive at once)."""
        decode = self._decode
        dead = rnd.dead
        if self.w.dedup is None:
            for rows in rnd.by_subject.values():
                self._fold_rows(rnd, rows)
        else:
            decoded = []
            for msg, seq, stored_ms in rnd.rows:
                event = decode(msg, seq, dead)
                if event is not None:
                    decoded.append((msg, seq, event_ms(event, stored_ms), event))
            if decoded:
                kept = await self._dedup(decoded)
                if len(kept) < len(decoded):
                    rnd.dropped.update({row[1] for row in decoded} - {row[1] for row in kept})
                rnd.corrections = [
                    (msg, seq, event, stored_ms)
                    for msg, seq, stored_ms, event in kept
                    if event.correction is not None
                ]
                self._fold(rnd, [row for row in kept if row[3].correction is None])
        if rnd.corrections:
            await self._fold_corrections(rnd)
        rnd.by_subject = {}
        self.cp.folded = rnd.last
        if self.cp.restart_from is not None:
            raise Restart("replay for a new meter")

    async def _process(self, puller: RawPuller | Pullers, rnd: _Round, started: float) -> None:
        if rnd.let_go:
            # The runner has turned to another partition's backlog: write what the rounds
            # before left in memory, then let the cache go (see _focus).
            await self._flush(puller)
            self._let_go_keys()
        if rnd.rows:
            # (marks, not the keys: keeping no key tuple alive once written; none for a round
            # that touched no key, whose next round is not counted)
            touched = KeyMarks(rnd.work) if rnd.work else None
            # Not a runner's first round, every key of which is new: counted, it cut the live
            # shape's third round to ~1,500 events, and the rounds took several more to grow
            # back (worker CPU 3.3-3.8 s against 2.8-3.1 without the limit).
            if self._last_keys is not None:
                self._fresh_per_event = self._last_keys.unmarked(rnd.work) / len(rnd.rows)
                self._counted += 1
            self._last_keys = touched
        dead = rnd.dead
        last = rnd.last
        marks = rnd.marks
        pending = pending_after(marks)
        events, keys = len(rnd.rows), len(rnd.work)
        if self.w.alerts is not None:
            # Before the write, which lets go of each key's work once it is done. A round
            # whose write fails adds pairs that are checked at the next flush all the same
            # (the check reads the stored usage; an event made twice is refused by its id),
            # or cleared by the restart (_forget_unflushed).
            touch_subjects(self._touched, rnd.work)
        keepalive = asyncio.create_task(self._keep_alive(puller, marks))
        try:
            # Under a backlog readings wait for the flush too: a series that several rounds
            # touch is then written once (the wide shape's sum meter has 50,000 series, a
            # round of 20,000 events touches ~16,000 of them). Caught up, they are written
            # with their round, so a reading trails its events by one round only.
            await self._write(rnd, dead, defer_readings=pending >= _BACKLOG)
            if rnd.rows:
                # Pages only: a round's readings are the series it touches, which the next
                # rounds touch again however large they are (and a unique reading's distinct
                # values, ~100 a subject on the wide shape, would shrink rounds to nothing).
                self._bytes_per_event = rnd.held // len(rnd.rows) + 1
            if dead:
                seqs = {seq for seq, _ in dead}
                stored = {seq: at for _, seq, at in rnd.rows if seq in seqs}
                await self._dead_letter(dead, stored)
            # The round's messages and work are stored: let them go before the flush, when
            # the cache is at its fullest and the next round is being folded beside it.
            rnd.release()
            self.cp.advance(last, rnd.lasts if self.merged else None)
            if self._unacked is None:
                self._unflushed_at = time.monotonic()
            self._unacked = marks
            # Summaries are written at once when a backlog has just been cleared, else at
            # most METER_FLUSH_MS apart while caught up (or idle, see _consume), and every
            # METER_SUMMARY_FLUSH_MS under load; after them the checkpoint, then the
            # acknowledgement (AckAll: the last message acks all before it).
            # A worker that keeps up with a heavy stream also gathers its rounds for up to
            # METER_FLUSH_MS (see _consume). See _flush_due.
            if _flush_due(
                dirty=self._has_dirty(),
                waited=time.monotonic() - self._unflushed_at,
                pending=pending,
                heavy=rnd.heavy,
                behind=self._behind,
                cache_full=self.keys.cache_bytes >= self.keys.cache_budget,
                flush_s=self.settings.flush_ms / 1000,
                summary_flush_s=self.settings.summary_flush_ms / 1000,
            ):
                await self._flush(puller)
            elif pending >= _BACKLOG:
                # Behind, what is held grows with the keys a backlog touches: write it and
                # let it go (caught up, a round's keys are the ones the next touches).
                spill, readings = _spills(
                    self.keys.parked_bytes, self.keys.packed_bytes, self.settings.spill_mb
                )
                if spill:
                    await self._spill(readings=readings)
            self._behind = pending >= _BACKLOG
        finally:
            keepalive.cancel()
        if self.cp.replay_done():
            self.cp.end_replay()
        stats = self.w.stats
        stats.batches += 1
        stats.events += events
        stats.dead_lettered += len(dead)
        seconds = time.monotonic() - started
        self.log.debug(
            "round.written",
            events=events,
            keys=keys,
            seconds=round(seconds, 3),
            pending=pending,
        )
        if self.w.metrics is not None:
            self.w.metrics.observe_round(events, seconds, pending, self.w.worker_id)

    def _let_go_keys(self) -> None:
        """Empty the key cache and the meters' reading keys, which grow with the series
        seen: at a turn to another partition's backlog (after the flush that writes what
        they hold), and when the consumer starts again, whose rounds not yet flushed are
        read again from the checkpoints."""
        self.keys.clear()
        self.w.registry.forget_keys()

    def _has_dirty(self) -> bool:
        return bool(self._dirty) or any(self._dirty_pages.values())

    def _is_dirty(self, wkey: WKey) -> bool:
        if not wkey[0]:
            return wkey[1] in self._dirty
        return wkey[1] in self._dirty_pages.get(wkey[0], ())

    def _forget_unflushed(self) -> None:
        self._dirty.clear()
        self._dirty_pages.clear()
        self._touched.clear()
        self._unacked = None

    async def _flush(self, puller: RawPuller | Pullers) -> None:
        """Write the summaries changed since the last flush, then the checkpoint, then ack."""
        if self._has_dirty():
            await self._write_dirty(readings=True)
        if self._touched and self.w.alerts is not None:
            # Every key up to here is stored and the checkpoint is not yet: a crash before
            # the alerts exist reads these rounds again, and they are made then.
            await self.w.alerts.after_round(self._touched)
            self._touched = {}
        await self.cp.commit()
        if self._unacked is not None:
            puller.acknowledge(self._unacked)
            self._unacked = None
        self.keys.trim()

    async def _spill(self, *, readings: bool) -> None:
        """Write the pages changed since the last flush, then let every parked page go; with
        ``readings``, the deferred readings too, then every packed reading. The checkpoint
        and the acknowledgement wait for the flush (see _spills).

        Safe at any point between rounds: a page's or reading's lastSeq covers every event
        folded into it, so a replay from the checkpoint skips them there exactly as after a
        flush (which also writes them before the checkpoint).

        Cost: a spill writes the pages (and readings) changed since the last spill or
        flush, at most METER_SPILL_MB of them; what a worker holds then grows with that
        setting, not with the subjects or windows a backlog touches. A page touched again
        after its spill is read and written again. On the wide bench shape (10,000
        subjects, 30 days, two workers), where a worker's pages had reached 25-44 MB
        (estimated) in a turn, spilling pages: peak RSS 144-156 MB a worker against 160-163
        MB, for 0.71-0.73 KV writes an event against 0.65 (docs/performance-history.md);
        readings too, see _spills.
        """
        await self._write_dirty(readings=readings, spill=True)
        self.keys.drop_parked(readings=readings)
        self.w.stats.reading_spills += readings
        self.w.stats.spills += 1

    async def _write_dirty(self, *, readings: bool, spill: bool = False) -> None:
        """Store the pages changed since they were last written, and the deferred readings
        too with ``readings``; then nothing of them is dirty. ``spill``: for a spill (the
        log says which), not a flush."""
        by_store = {store: list(keys) for store, keys in self._dirty_pages.items() if keys}
        if readings and self._dirty:
            by_store[0] = list(self._dirty)
        self.log.debug(
            "summaries.spill" if spill else "summaries.flush",
            readings=readings,
            keys=sum(len(keys) for keys in by_store.values()),
            cached=len(self.keys.cache),
            cache_mb=self.keys.cache_bytes >> 20,
        )
        # Buckets taken in turn, so that each has batches in flight from the start.
        await _all(self._flush_chunk(store, keys) for store, keys in _in_turn(by_store))
        if readings:
            self._dirty.clear()
        self._dirty_pages.clear()

    async def _flush_chunk(self, store: int, keys: list[str]) -> None:
        """Encode and store one chunk of deferred summaries (one bucket), at most
        _FLUSHES_IN_FLIGHT chunks at once. Each key's body is made as its turn to be sent
        comes (KeyStore.store_chunk): a reading is encoded then, a page sent from the bytes
        held, not all the flush's at once (~70,000 readings, tens of MB, on a wide
        backlog), nor a whole chunk's before its batch goes."""
        async with self._flush_slots:
            await self._flush_chunk_now(store, keys)

    async def _flush_chunk_now(self, store: int, keys: list[str]) -> None:
        dirty = self._dirty
        cache = self.keys.cache
        now = datetime.now(UTC)

        def write(n: int) -> Write:
            key = keys[n]
            cached = cache.get((store, key))
            if store:  # a page, encoded when a round folded into it: parked, or still held
                if cached is None:
                    return self.keys.parked((store, key))
                assert cached.raw is not None
                return cached.raw, cached.revision
            # A reading: packed (unpacked here for its write only), or held frozen where it
            # could not be packed (thawed for the write, then frozen again).
            state = self.keys.packed(key) if cached is None else cached
            subject, groups = reading_series(key)
            if cached is not None:
                thaw(state)
            body = encoder.encode(
                to_reading(
                    state.acc,
                    dirty[key].meter,
                    subject,
                    groups,
                    state.last_seq,
                    now,
                    state.replayed,
                    late=state.late,
                )
            )
            if cached is not None:
                freeze(state)
            return body, state.revision

        results = await self.keys.store_chunk(store, keys, write)
        for key, result in zip(keys, results, strict=True):
            if isinstance(result, int):
                self.keys.written((store, key), result)
                self.w.stats.writes += 1
            elif isinstance(result, KeyWrongLastSequenceError):
                # The events behind this state are no longer at hand: start again from
                # the checkpoint (lastSeq makes the replay exact).
                self.w.stats.conflicts += 1
                raise Restart("a summary was written by another worker")
            else:
                raise result

    def _decode(self, msg: WireMsg, seq: int, dead: _Dead) -> Event | None:
        """The event in a message, or None after recording why it is unusable."""
        replaying = self.cp.replaying(msg.subject, seq)
        if len(msg.data) > self.settings.max_body_bytes:
            if not replaying:
                limit = self.settings.max_body_bytes
                dead[(seq, "")] = (msg, None, f"invalid event: larger than {limit} bytes")
            return None
        try:
            event = event_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            if not replaying:
                dead[(seq, "")] = (msg, None, f"invalid event: {exc}")
            return None
        tokens = msg.subject.rsplit(".", 2)  # <stream>.events.<partition>.<type>.<subject>
        if len(tokens) < 3 or (
            tokens[-2] != encode_token(event.eventType) or tokens[-1] != encode_token(event.subject)
        ):
            if not replaying:
                dead[(seq, "")] = (
                    msg,
                    None,
                    "invalid event: eventType/subject do not match the NATS subject "
                    f"(publish to {self.layout.stream}.events."
                    f"{encode_token(event.eventType)}.{encode_token(event.subject)})",
                )
            return None
        return event

    async def _dedup(self, decoded: list[_Row]) -> list[_Row]:
        """Drop events whose id was first stored at another stream sequence (long dedup).

        The first sequence seen for an id is recorded with a create (compare-and-set), before
        any reading changes, so a replay finds its own record and is applied again normally.
        """
        kv = self.w.dedup
        assert kv is not None
        first: dict[str, int] = {}
        for _, seq, _, event in decoded:
            first.setdefault(event.id, seq)
        ids = list(first)
        results = await asyncio.gather(
            *(kv.create(encode_token(i), str(first[i]).encode()) for i in ids),
            return_exceptions=True,
        )
        for event_id, result in zip(ids, results, strict=True):
            if isinstance(result, KeyWrongLastSequenceError):
                value, _ = await get_with_revision(kv, encode_token(event_id))
                if value is not None:
                    first[event_id] = int(value)
            elif isinstance(result, BaseException):
                raise result
        kept = [row for row in decoded if first[row[3].id] == row[1]]
        self.w.stats.deduplicated += len(decoded) - len(kept)
        return kept

    def _fold(self, rnd: _Round, rows: list[_Row]) -> None:
        """Fold events into the round (core.plan.fold_rows); an event a meter cannot use is
        dead-lettered, unless it was read before and is only replayed for another meter."""
        self._failed(
            rnd, fold_rows(rnd.series, rows, self.w.registry.by_type, self.settings.interval)
        )

    def _failed(self, rnd: _Round, failures: list[Failure]) -> None:
        dead = rnd.dead
        for msg, seq, meter_id, reason in failures:
            if meter_id in self.cp.replay_meters or not self.cp.replaying(msg.subject, seq):
                dead[(seq, meter_id)] = (msg, meter_id, reason)

    async def _fold_corrections(self, rnd: _Round) -> None:
        """Resolve the round's corrections (worker.corrections) and fold them after its
        other events (core.plan.fold_corrections); one that names no usable original is
        dead-lettered as a whole."""
        subjects = {seq: msg.subject for msg, seq, _, _ in rnd.corrections}
        rows, unresolved = await self.w.corrector.resolve(rnd.corrections, subjects)
        for msg, seq, reason in unresolved:
            if not self.cp.replaying(msg.subject, seq):
                rnd.dead[(seq, "")] = (msg, None, reason)
        rnd.correction_rows = rows
        rebuilds: list[Rebuild] = []
        self._failed(
            rnd,
            fold_corrections(
                rnd.series, rows, self.w.registry.by_type, self.settings.interval, rebuilds
            ),
        )
        if rebuilds:
            await self._rebuild(rnd, rebuilds)

    async def _rebuild(self, rnd: _Round, rebuilds: list[Rebuild]) -> None:
        """The keys a correction changes for a min, max, latest or unique meter, rebuilt from
        the stream (core.plan.rebuilt_states): such a state cannot take one event out. The
        events read are the correction's subject's up to it, or for a meter with meter-wide
        rollups (all but unique: a rollup window holds every subject of the partition) the
        partition's events of the type. Exact only while the stream still holds every event
        of the meter: else the correction is dead-lettered for it. Costs a scan of those
        events (store.events: one subject's 4,000 in ~0.15-0.2 s; a partition's share of a
        million-event stream several seconds), for rounds with such corrections only."""
        first = int((await self.w.js.stream_info(self.layout.stream)).state.first_seq or 0)
        partitions = self.settings.partitions
        scans: dict[str, list[tuple[int, int, Event, str | None]]] = {}
        for tag, seq, cm, removed, added in rebuilds:
            if first > max(cm.meter.startSeq, 0) + 1:
                reason = (
                    f"corrections of a {cm.agg.name} meter rebuild its states from the stream, "
                    f"which no longer holds its events before stream seq {first}"
                )
                self._failed(rnd, [(tag, seq, cm.meter.id, reason)])
                continue
            stored_subject: str = tag.subject
            if rolled(cm):  # <stream>.events.<partition>.<type>.<subject>: every subject
                stored_subject = stored_subject.rsplit(".", 1)[0] + ".*"
            rows = scans.get(stored_subject)
            if rows is None:  # once a round, up to its last such correction
                through = max(s for _, s, *_ in rebuilds)
                stored = await subject_events(
                    self.w.js, self.layout.stream, stored_subject, through
                )
                rows = scans[stored_subject] = [
                    (s.seq, epoch_ms(s.time), s.event, s.cloud_id) for s in stored
                ]
            upto = [row for row in rows if row[0] <= seq]
            versions = [(v[0], v[1]) for v in (removed, added) if v is not None]
            targets = rebuild_targets(cm, versions, rnd.levels, partitions)
            rnd.rebuilt.extend(
                rebuilt_states(seq, cm, counted(upto), targets, rnd.levels, partitions)
            )

    def _spread(self, rnd: _Round) -> None:
        """The keys the round changes (core.plan.spread); the parts stay only in them."""
        rnd.work = spread(rnd.series, rnd.levels, self.settings.interval, self.settings.partitions)
        rnd.series = {}

    def _exact_items(self, rnd: _Round) -> dict[WKey, list[Item]]:
        """Every key's events one by one (core.plan.exact_items), decoded again from the
        round's messages when a key first needs them."""
        if rnd.items is None:
            scratch: _Dead = {}

            def decoded() -> Iterator[tuple[int, int, Event]]:
                for msg, seq, stored_ms in rnd.rows:
                    if seq in rnd.dropped:
                        continue
                    event = self._decode(msg, seq, scratch)
                    if event is not None:
                        yield seq, event_ms(event, stored_ms), event

            rnd.items = exact_items(
                decoded(),
                self.w.registry.by_type,
                rnd.levels,
                self.settings.partitions,
                rnd.correction_rows,
                rnd.rebuilt,
            )
        return rnd.items

    @property
    def _levels(self) -> list[tuple[int, int, int]]:
        """(store, width, oldest window end still kept) per summary level."""
        now = int(time.time())
        return [
            (store, width, now - self.settings.summary_retention(level))
            for store, (level, width) in enumerate(self.w.level_widths.items(), start=1)
        ]

    def _apply(self, rnd: _Round, wkey: WKey, cached: KeyState, dead: _Dead) -> bool:
        """Fold the round into one key's cached state (core.plan.apply); False when nothing
        in it is new. Events over a unique reading's limit are dead-lettered."""
        changed, failures = apply(
            wkey,
            rnd.work[wkey],
            cached,
            self.settings.unique_limit,
            lambda: self._exact_items(rnd),
        )
        for seq, meter_id, reason in failures:
            dead[(seq, meter_id)] = (rnd.by_seq()[seq], meter_id, reason)
        return changed

    async def _write(self, rnd: _Round, dead: _Dead, *, defer_readings: bool = False) -> None:
        """Fold the round into every key it changes and store them: readings now, summaries
        now or (deferred) with the next flush.

        The keys go in chunks of up to 1,000 of one bucket, each a small pipeline of its
        own: read the keys that are not cached (one direct multi-get), fold the round into
        them, encode them and send them as one atomic batch. Chunks run side by side (at most
        _LOADS_IN_FLIGHT reads and, per bucket, _BATCHES_IN_FLIGHT batches at once), so the
        worker folds and encodes one chunk while nats-server reads or stores another. Done
        one step after the other for the whole round, a 50,000-event round of the wide shape
        (203,000 keys) spent 0.4 s reading, 0.75 s folding and encoding and 0.6 s writing,
        with one of the two processes idle at every moment.

        A key whose compare-and-set lost is read again from the stream leader and folded
        again, in a further pass.
        """
        todo = list(rnd.work)
        for attempt in range(20):
            failed = await _all(
                self._write_chunk(rnd, c, dead, leader=attempt > 0, defer_readings=defer_readings)
                for c in _chunks(todo)
            )
            todo = [wkey for keys in failed for wkey in keys]
            if not todo:
                return
            self.log.info("batch.cas_conflict", keys=len(todo), attempt=attempt)
        raise Restart("compare-and-set kept failing")

    async def _write_chunk(
        self,
        rnd: _Round,
        chunk: list[tuple[int, str]],
        dead: _Dead,
        *,
        leader: bool,
        defer_readings: bool = False,
    ) -> list[tuple[int, str]]:
        """Load, fold and store one chunk of keys (one bucket); the keys whose write lost.

        The keys the runner holds are folded first, one at a time, each taken back from its
        parked or packed form (KeyStore.take) and parked or packed again at once; only then
        are the others read, and folded once they come. Before, every key of a chunk was
        taken back as a state before the chunk's read, and the round's chunks all start at
        once, so a round's keys were held as states together while the reads were under
        way: on the wide bench shape at 10,000 subjects (~8,500 keys a round), up to ~7,200
        states a worker against ~450 at 1,000 subjects (~1,900 keys a round); now none
        between reads in the memory traces (the peak RSS did not move measurably: README,
        Performance).

        A key deferred to the flush (or left unchanged) is done with once folded: its work
        is let go then (``del work[wkey]``), and a part goes once every key it falls in is
        done, rather than when the round is stored (``_Round.release``). The next round is
        folded while this one is written, and each had up to ~10,000 parts (_ROUND_PARTS):
        both rounds' were in memory at a wide worker's highs (~20,000 parts, with their
        ``Acc`` and ints, 1,000 and 10,000 subjects alike). A key written with its round keeps
        its work until stored, since a lost compare-and-set folds it again.
        """
        work = rnd.work
        now = datetime.now(UTC)
        writes: list[tuple[WKey, bytes | memoryview, int]] = []

        def fold_key(wkey: WKey, cached: KeyState) -> None:
            kw = work[wkey]
            meter = kw.meter.meter
            if cached.meter_start_seq != meter.startSeq:
                # Written for an earlier meter of this id (or new): start from zero.
                cached = empty_state(wkey[0], cached.revision, meter.startSeq)
                self.keys.replace(wkey, cached)
            if not wkey[0]:
                thaw(cached)
            if not self._apply(rnd, wkey, cached, dead):
                if wkey[0]:
                    rnd.held += self._close(wkey, cached)  # (opened by a replay, or as read)
                else:
                    self.keys.pack(wkey, cached)
                del work[wkey]  # done with: its parts go once no other key needs them
                return
            if wkey[0]:
                # A page is encoded at once and held as its bytes (windows closed).
                assert cached.windows is not None
                close_page(
                    cached,
                    encode_page(cached.windows, cached.last_seq, meter.startSeq, cached.replayed),
                )
            if self._defer and (wkey[0] or defer_readings):
                # Written by _flush, with the checkpoint; its size counts towards the flush.
                if wkey[0]:
                    pages = self._dirty_pages.get(wkey[0])
                    if pages is None:
                        pages = self._dirty_pages[wkey[0]] = set()
                    mark_dirty_page(pages, wkey[1])
                    rnd.held += self.keys.park(wkey, cached)
                else:
                    mark_dirty(self._dirty, wkey[1], kw.meter)
                    self.keys.pack(wkey, cached)
                    self.w.stats.applied += kw.events
                del work[wkey]
                return
            # Encoded: held parked or packed while its batch is in flight, not as a state
            # (a page sent from its parked bytes), and given its new revision once stored.
            # A round's keys written at once wait together for their batches: as states, up
            # to ~5,000 at once in a wide worker's first rounds (~650 bytes a reading).
            revision = cached.revision
            body: bytes | memoryview
            if wkey[0]:
                rnd.held += self.keys.park(wkey, cached)
                body = self.keys.parked(wkey)[0]
            else:
                body = encoder.encode(
                    to_reading(
                        cached.acc,
                        meter,
                        kw.subject,
                        kw.groups,
                        cached.last_seq,
                        now,
                        cached.replayed,
                        late=cached.late,
                    )
                )
                # (kept as a state, its distinct values frozen, where it cannot be packed)
                self.keys.pack(wkey, cached)
            writes.append((wkey, body, revision))

        missing: list[WKey] = []
        for wkey in chunk:
            cached = self.keys.take(wkey)
            if cached is None:
                missing.append(wkey)
            else:
                fold_key(wkey, cached)
        if missing:
            async with self._load_slots:
                await self.keys.load(missing, leader=leader)
            for wkey in missing:
                fold_key(wkey, self.keys.cache[wkey])
        if not writes:
            return []
        results = await self.keys.store_chunk(
            chunk[0][0], [w[0][1] for w in writes], lambda n: (writes[n][1], writes[n][2])
        )
        failed = []
        for (wkey, _, _), result in zip(writes, results, strict=True):
            if isinstance(result, int):
                self.keys.written(wkey, result)
                if not wkey[0]:
                    self.w.stats.applied += work[wkey].events
                self.w.stats.writes += 1
                # Deferred by an earlier round (a reading under a backlog): written now.
                if wkey[0]:
                    self._dirty_pages.get(wkey[0], set()).discard(wkey[1])
                else:
                    self._dirty.pop(wkey[1], None)
            elif isinstance(result, KeyWrongLastSequenceError):
                self.w.stats.conflicts += 1
                if self._is_dirty(wkey):
                    # It held earlier rounds' events, no longer at hand to fold again:
                    # start again from the checkpoint (lastSeq makes the replay exact).
                    raise Restart("a deferred key was written by another worker")
                # Someone else wrote this key: read it again and fold what is still new.
                self.keys.forget(wkey)
                failed.append(wkey)
            else:
                self.keys.forget(wkey)
                assert isinstance(result, BaseException)
                raise result
        return failed

    def _close(self, wkey: WKey, cached: KeyState) -> int:
        """Encode a page whose windows are open and park it (KeyStore.park); its bytes."""
        assert cached.windows is not None
        if cached.raw is None and cached.windows is not CLOSED:
            close_page(
                cached,
                encode_page(
                    cached.windows, cached.last_seq, cached.meter_start_seq, cached.replayed
                ),
            )
        return self.keys.park(wkey, cached) if cached.raw is not None else 0

    async def _dead_letter(self, dead: _Dead, stored_ms: dict[int, int]) -> None:
        js = self.w.js
        publishes = []
        for (seq, meter_key), (msg, meter_id, reason) in sorted(dead.items()):
            cm = self.w.registry.by_id.get(meter_id) if meter_id else None
            generation = cm.meter.startSeq if cm else 0
            headers = {
                "Nats-Msg-Id": f"{self.layout.stream}:{seq}:{meter_key}:{generation}",
                "Kloudmeter-Error": _clean_header(reason),
                "Kloudmeter-Meter": meter_id or "",
                "Kloudmeter-Stream-Seq": str(seq),
                "Kloudmeter-Subject": msg.subject,
                "Kloudmeter-Stored-At": datetime.fromtimestamp(
                    stored_ms[seq] / 1000, UTC
                ).isoformat(),
            }
            subject = self.layout.error_subject(encode_token(meter_id) if meter_id else "_event")
            publishes.append(js.publish(subject, msg.data, headers=headers))
            self.log.info("event.dead_lettered", seq=seq, meter=meter_id, reason=reason)
        await asyncio.gather(*publishes)
