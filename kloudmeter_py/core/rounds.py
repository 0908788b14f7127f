"""How a runner sizes its rounds, when it writes what it holds, and which partitions it
reads: the pure decisions of the worker's take step (worker.runner), tested from tables
(tests/test_plan.py) without a server.

A round is gathered from the consumers (``gathered``, ``gather_wait``, ``is_heavy``), sized
from what the round before it made (``round_limit``), written, and then flushed with the
checkpoint or left for a later flush (``flush_due``); behind a backlog a runner writes and
lets go of what it holds (``spills``), works through one partition at a time (``focus``,
``lets_go`` at each turn), and a runner of every partition reads through a consumer per
partition while it is behind (``split``). The figures in the docstrings are the wide and live
bench shapes' (README, Performance).
"""

from collections.abc import Callable, Collection

from kloudmeter_py.core.plan import KeyMarks, WKey

# Events left waiting after a round that make a backlog: once it is cleared, summaries are
# written at once (a blip of a few events at a steady rate is not one).
BACKLOG = 1000
# Events a second that make a heavy stream (see gather_wait, flush_due): the live bench shape's
# ~20,000 a worker is one, its lag phase's 2,500-5,000 is not.
HEAVY = 10_000
# Events a partition's consumer has still to deliver that make it behind: while two or more
# of a runner's are, it works through one of them at a time (see focus). 20,000 with 4
# partitions; 5,000 with 16 keeps the backlog at which a runner of every partition splits
# its consumer (see split) at 80,000, and makes a worker of 8 of 16 turn to one at a time
# while ~80,000 wait, as 2 of 4 did: left at 20,000, its first 160,000 took every key of
# its partitions at once (wide bench shape, peak RSS 176 against 158-164 MB a worker).
FOCUS_AT = 5_000
# Longest a runner stays on one partition while another behind waits: what the waiting
# consumer has buffered must be taken well within its ack_wait (120 s, see
# worker.runner.Runner._config).
FOCUS_S = 60.0
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
ROUND_PARTS = 10_000
# Events in a consumer's first round, before it is known how many parts its events make:
# 5,000 (ROUND_PARTS // 4 before). The live bench shape is short (200,000 events), and
# starting it at 2,500 made ~10% more KV writes an event (0.221-0.235 against ~0.2).
FIRST_ROUND = 5_000
# Subjects a consumer's first round's events may name: it ends at FIRST_ROUND events or
# once they name this many subjects, whichever comes first, its messages taken FIRST_TAKE
# at a time; and while its rounds end so, the next ones do too, until a round's fresh keys
# (see ROUND_FRESH) have been counted. A round's keys grow with the series its events
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
# against ~81). 400 subjects make ~2,800 keys, about ROUND_FRESH. The live bench shape
# (1,000 subjects, ~500 a worker) reaches it after ~800 events.
FIRST_SUBJECTS = 400
FIRST_TAKE = 250


# Keys a round may touch that the round before it did not touch ("fresh"), see round_limit.
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
ROUND_FRESH = 3_000


def round_limit(
    batch_size: int,
    events: int,
    parts: int,
    bytes_per_event: int = 0,
    room: int = 0,
    fresh: float = 0.0,
) -> int:
    """Events in the next round: METER_BATCH_SIZE, fewer where the last round's events each
    made parts of their own (many subjects or windows), so that its parts stay near
    ROUND_PARTS, fewer where the key states a round touches (``bytes_per_event`` in
    the last round written, estimated) would not fit in ``room`` (half of METER_CACHE_MB),
    and fewer where the last round written touched keys the round before it did not
    (``fresh`` an event), so that about ROUND_FRESH of them are new to a round.

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
    limit = events * ROUND_PARTS // parts
    if bytes_per_event and room:
        limit = min(limit, room // bytes_per_event)
    if fresh:
        limit = min(limit, int(ROUND_FRESH / fresh))
    return min(batch_size, max(1000, limit))


class Sizer:
    """What a runner's rounds so far tell of the next one: how many events it may take
    (round_limit) and whether they come as a heavy stream's (is_heavy). One a runner, kept
    across its consumer's restarts.

    1. ``begun``: a round has gathered its events; whether they came at HEAVY a second or
       more since the round before began (``heavy`` then, until the runner is idle).
    2. ``touching``: before a round's write, the keys it changes. From a runner's second
       round on, the keys the round before did not touch are counted, per event (fresh;
       ``counted`` rounds so far): a runner's first round, every key of which is new,
       would cut the live shape's third round to ~1,500 events, and the rounds took several
       more to grow back (worker CPU 3.3-3.8 s against 2.8-3.1 without the limit). Until
       the runner has outgrown its key store (``outgrow``: a spill, or its cache let go at
       a turn), a key it holds is not fresh either: every key it has touched is then still
       held, within METER_SPILL_MB, so a round's keys are bounded by what it holds plus
       its new ones. On the live shape (~10,000 keys a worker, never spilled) a worker's
       first rounds took ~1,000-2,000 events each and touched ~6,000-8,000 keys while the
       keys of its ~500 subjects were still being met (1.7-2.6 fresh an event against the
       round before, 0.05-1.0 not held either); its first round of 10,000 events or more
       came at its 7th round, 2.3-2.5 s in, against the 10th-14th, 3.3-5.1 s in, and the
       time from the last publish to final readings went 1.27-2.23 s -> 0.68-1.00 s (end
       to end 0.511-0.55 -> 0.525-0.596 of the raw baseline; README, Performance). Wide
       rounds grow too until the first spill: peak RSS a worker ~1-1.5 MB higher at 1,000
       and 10,000 subjects alike (means 78.1 -> 79.5 and 78.8 -> 79.7 MB). Once outgrown,
       a key not in the round before counts, held or not: on the wide shape at 10,000
       subjects ~89% of a round's keys are held (median), and not counting them all run
       long made its peaks 81.7 MB a worker against 78.8 (means of four and eight).
    3. ``stored``: after its write, the bytes of the pages it parked, per event. Pages only:
       a round's readings are the series it touches, which the next rounds touch again
       however large they are (and a unique reading's distinct values, ~100 a subject on
       the wide shape, would shrink rounds to nothing).
    4. ``limit``: the next round's events, from the last round's parts and those figures.

    The round before is held as marks (core.plan.KeyMarks), one bit a key, not as its keys.
    """

    __slots__ = (
        "_bytes_per_event",
        "_fresh",
        "_last_keys",
        "_last_start",
        "counted",
        "heavy",
        "outgrown",
    )

    def __init__(self) -> None:
        self.heavy = False
        self.counted = 0
        self.outgrown = False
        self._last_start = 0.0  # when the last round began to gather (seconds, monotonic)
        self._bytes_per_event = 0
        self._fresh = 0.0
        self._last_keys: KeyMarks | None = None

    def begun(self, events: int, started: float, now: float, linger: float) -> bool:
        """A round of ``events`` that began to gather at ``started`` is gathered at ``now``:
        whether its events came at HEAVY a second or more (since the round before began,
        which is when the runner last took what had arrived)."""
        self.heavy = is_heavy(events, now - self._last_start, linger)
        self._last_start = started
        return self.heavy

    def touching(
        self, work: Collection[WKey], events: int, held: Callable[[WKey], bool] | None = None
    ) -> None:
        """A round of ``events`` (not 0) is about to write ``work``, the keys it changes, of
        which the runner holds those ``held`` says; a round that touches no key is not
        counted, nor is the one after it."""
        if self._last_keys is not None:
            held = None if self.outgrown else held
            self._fresh = self._last_keys.unmarked(work, held) / events
            self.counted += 1
        self._last_keys = KeyMarks(work) if work else None

    def outgrow(self) -> None:
        """The runner no longer holds every key it has touched (a spill, or its cache let go):
        from now on every key the round before did not touch is fresh."""
        self.outgrown = True

    def stored(self, held: int, events: int) -> None:
        """A round of ``events`` (not 0) is stored, its pages parked at ``held`` bytes."""
        self._bytes_per_event = held // events + 1

    def limit(self, batch_size: int, events: int, parts: int, room: int) -> int:
        """The next round's events after one of ``events`` that made ``parts`` (round_limit),
        ``room`` bytes the cache has for a round's pages."""
        return round_limit(batch_size, events, parts, self._bytes_per_event, room, self._fresh)


def gathered(events: int, subjects: int, limit: int, first_subjects: int) -> bool:
    """Whether a round of ``events`` naming ``subjects`` subjects (those not yet folded) has
    all it may take: ``limit`` events, or for a consumer's first rounds (``first_subjects``
    not 0) that many subjects (see FIRST_SUBJECTS)."""
    return events >= limit or 0 < first_subjects <= subjects


def is_heavy(events: int, since: float, linger: float) -> bool:
    """Whether a round's events came at HEAVY a second or more: ``events`` taken ``since``
    seconds after the last round began to gather (at least ``linger``)."""
    return events >= HEAVY * max(since, linger)


def gather_wait(
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
    the consumers it takes from (not those waiting their turn, see focus) or the stream is
    ``heavy``, else for ``linger``. A heavy stream with nothing waiting on the server is
    given ``linger`` at a time: when it pauses, the round ends. Before, the round waited
    out the rest of METER_FLUSH_MS after the last event of a burst. On the live bench shape
    (200,000 events published as fast as the bench can, two workers), the time from the
    last publish to final readings (``e2e_settle_ms``) was 1.41-1.54 s of ~3.7 s and is
    0.51-0.59 s of ~3.0 s: end to end 0.514-0.549 -> 0.644-0.698 of the raw JetStream
    baseline, at the same ~0.2 KV writes an event.

    A round of a runner working through one partition's backlog while others wait their
    turn (``others_behind``, see focus) ends once the one in hand has delivered all it had
    (no ``backlog``), without a linger: the next partition behind is taken at once. One
    worker on the live bench shape (16 partitions, one at a time after its split) waited
    out METER_FLUSH_MS at the end of each partition, ~14 of its ~18 s (0.141 of the raw
    baseline); with only the linger left, 0.358-0.367; with neither, 0.444-0.457.
    """
    if others_behind and not backlog:
        return 0.0
    left = (flush_s if backlog or heavy else linger) - gathered
    return left if backlog else min(left, linger)


def flush_due(
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


def focus(
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
    reached METER_SPILL_MB (see lets_go), so that it holds one backlogged partition's keys
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
    reads a consumer per partition while it is behind (see split), and is helped the same
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


def split(
    backlog: int, *, merged: bool, focus: int | None, partitions: int, at: int, release: int
) -> bool:
    """Whether a runner that owns every one of ``partitions`` reads them through a consumer
    per partition (and so works through their backlogs one at a time, see focus) rather
    than through one unfiltered consumer, with ``backlog`` events still to read.

    One consumer costs nats-server least and is how such a runner reads while it keeps up.
    It splits once the backlog is ``at`` events a partition or more (then two or more
    partitions are likely behind by ``at``, where focus takes one at a time), and reads
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


def lets_go(held: int, packed: int, spill_mb: int, *, unheld: int, keys: int) -> bool:
    """Whether a runner that turns to another partition's backlog (see focus) first writes
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
    (spills; before 2026-12-06 never): at a turn that kept the cache, the readings of
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


def spills(parked: int, packed: int, spill_mb: int) -> tuple[bool, bool]:
    """Whether a runner behind a backlog, after a round, writes what the rounds since the
    last flush changed and lets go of what it holds between rounds (see
    worker.runner.Runner._spill): once its parked pages ``parked`` and packed readings
    ``packed`` (bytes, estimated) reach METER_SPILL_MB together; and whether its readings go
    as well as its pages: where they are half of it or more.

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
