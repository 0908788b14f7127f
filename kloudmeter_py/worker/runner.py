"""A worker's runner: the in-order reader of the partitions it owns, and the loop
(``Runner._consume``) that takes each round through its steps.

1. Take (``Runner._open``, ``Runner._gather``, ``Runner._add``): messages from the consumers,
   checked to be in stream order, gathered into a round (worker.round.Round) sized and timed
   by the pure decisions of core.rounds; a partition's checkpoint skips what it already covers.
2. Fold (``Runner._fold``, worker.fold.Folder): decode, the long dedup, fold into parts per
   series and finest window, corrections, and spread into the keys the round changes
   (core.plan).
3. Load / apply / store (``Runner._write``, ``Runner._process``, worker.write.Writer): the
   keys read or taken from the key cache (worker.keystore), the round applied, written
   compare-and-set in atomic batches, or deferred to the flush. The next round is taken and
   folded while one is stored.
4. Checkpoint (``Runner._flush``, worker.checkpoint.Checkpoint): once what was deferred is
   stored and the alerts made, each partition's position.
5. Ack (AckAll on each consumer's last message), only after the checkpoint.

Exactness rests on three things:

* Each partition (events are spread by subject) is read strictly in stream order by one
  consumer, the consumer of the worker that owns it, which starts right after the lowest
  checkpoint of the partitions it reads and skips what a partition's own checkpoint already
  covers. Every reading key belongs to exactly one partition, since its subject is part of the
  key. A worker that owns every partition reads the stream unfiltered while it keeps up,
  which costs nats-server far less than a filtered consumer per partition; one that owns
  some (or all, while behind: see core.rounds.split) reads each of them through a consumer
  of its own, in one runner (``store.pull.Pullers``), and keeps a checkpoint position per
  partition.
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
from typing import TYPE_CHECKING

import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from kloudmeter_py.config import Settings
from kloudmeter_py.core import rounds
from kloudmeter_py.core.meters import CompiledMeter
from kloudmeter_py.core.plan import touch_subjects
from kloudmeter_py.store.pull import Pullers, RawPuller, ack_fields, pending_after
from kloudmeter_py.store.wire import WireMsg
from kloudmeter_py.worker.checkpoint import Checkpoint, partition_of
from kloudmeter_py.worker.fold import Folder
from kloudmeter_py.worker.keystore import KeyStore
from kloudmeter_py.worker.round import Regroup, Restart, Round
from kloudmeter_py.worker.write import Writer

__all__ = ["Regroup", "Restart", "Round", "Runner"]

if TYPE_CHECKING:
    from kloudmeter_py.worker import Worker

log = structlog.get_logger(__name__)

# Events of one subject gathered in a round before they are folded together.
_FOLD_AT = 64


class _LoopState:
    """What ``Runner._consume`` carries from one round to the next: the next round's size,
    how long rounds gather, and the round being written."""

    __slots__ = ("counted", "first_subjects", "flush_after", "linger", "round_limit", "writing")

    def __init__(self, settings: Settings, counted: int) -> None:
        # The first round is kept small until it is known how many parts events make.
        self.round_limit = min(settings.batch_size, rounds.FIRST_ROUND)
        # (0 once a round ends short of it, or a round's fresh keys have been counted)
        self.first_subjects = rounds.FIRST_SUBJECTS
        self.counted = counted  # rounds.Sizer.counted when the consumer began
        self.flush_after = settings.flush_ms / 1000
        self.linger = min(0.1, self.flush_after)
        # The previous round's writes, still in flight while the next round is gathered and
        # folded; a round's writes start only after the previous round's are stored.
        self.writing: asyncio.Task[None] | None = None


class Runner:
    """Reads the partitions a worker owns, in order, and takes each round through the steps
    of this module's docstring: one consumer for all of them, or one per partition."""

    def __init__(self, worker: "Worker", partitions: list[int], run: int = 1) -> None:
        self.w = worker
        self.partitions = partitions
        self.layout = worker.layout
        self.settings = worker.settings
        self.consumer = f"{self.layout.stream}-w{worker.worker_id}-{run}"
        self.log = log.bind(partitions=partitions, worker=worker.worker_id)
        self.keys = KeyStore(worker, self.log)
        self.cp = Checkpoint(worker.offsets, partitions, worker.worker_id)
        # The steps: fold (decode, dedup, fold, spread) and store (load, apply, store, and
        # what is deferred to the flush); take, checkpoint and ack are the runner's own.
        self.folder = Folder(worker, self.cp)
        self.writer = Writer(worker, self.keys, self.folder, self.log)
        # The last message of the rounds stored but not yet flushed (acked with the
        # checkpoint), and since when.
        self._unacked: list[str] | None = None  # marks of the last round stored, not acked
        self._unflushed_at = 0.0
        # The last round left a backlog (rounds.BACKLOG events or more) waiting.
        self._behind = False
        self._pull_batch = min(self.settings.batch_size, 1000)
        # The next round's size, and whether the stream is heavy (events at rounds.HEAVY a
        # second or more, even when the worker keeps up with it): from the rounds so far.
        self.sizes = rounds.Sizer()
        # Meter id -> subjects of the readings the rounds since the last checkpoint touched,
        # read again or not: the alerts are made from them before the checkpoint
        # (worker.alerts; core.plan.touch_subjects).
        self._touched: dict[str, set[str]] = {}
        # A consumer per partition (some of the partitions, not all, or all of them while
        # behind: see rounds.split), else one for all.
        self.owns_all = len(partitions) == self.settings.partitions
        self._merge(1 < len(partitions) < self.settings.partitions)
        self._lasts: dict[int, int] = {}  # per partition, the last sequence taken (merged)
        # The consumer (index) worked through alone, since when, and whether the next round
        # is the first since it changed (see rounds.focus; merged only).
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
        """Read the partitions from their checkpoints a round at a time, through the steps of
        this module's docstring, until a Restart or an error (see run)."""
        lowest = await self.cp.begin()
        self._forget_unflushed()
        puller = await self._open(lowest)
        state = _LoopState(self.settings, self.sizes.counted)
        try:
            while True:
                if state.writing is not None and (state.writing.done() or not puller.buffered):
                    await state.writing
                    state.writing = None
                if self.cp.restart_from is not None:
                    raise Restart("replay for a new meter")
                wait = 1.0
                if self._unacked is not None:  # flush deferred summaries once idle
                    wait = min(
                        1.0, max(0.0, self._unflushed_at + state.flush_after - time.monotonic())
                    )
                take = (
                    min(state.round_limit, rounds.FIRST_TAKE)
                    if state.first_subjects
                    else state.round_limit
                )
                msgs = await puller.take(take, timeout=wait)
                if not msgs:
                    await self._idle(puller, state)
                    continue
                rnd, started = await self._gather(puller, msgs, take, state)
                await self._fold(puller, rnd, started, state)
                await self._write(puller, rnd, started, state)
        except asyncio.CancelledError:
            if state.writing is not None:
                state.writing.cancel()
            raise
        finally:
            # A round being written finishes (or, when the runner is cancelled, stops) before
            # the consumer is read again; its outcome no longer matters.
            if state.writing is not None:
                try:
                    await asyncio.wait({state.writing})
                finally:
                    if state.writing.done() and not state.writing.cancelled():
                        state.writing.exception()
            with contextlib.suppress(Exception):
                await puller.stop()

    async def _open(self, lowest: int) -> RawPuller | Pullers:
        """Make the consumers, one for all the partitions or one per partition (see
        rounds.split), each starting after its checkpoint (``lowest`` the lowest of them),
        and start pulling from them."""
        if self.owns_all:
            info = await self.w.js.stream_info(self.layout.stream)
            self._merge(
                rounds.split(
                    int(info.state.last_seq or 0) - lowest,
                    merged=False,
                    focus=None,
                    partitions=len(self.partitions),
                    at=rounds.FOCUS_AT,
                    release=rounds.BACKLOG,
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
            # rounds.focus), up to ~2.5 pulls of it. With 1,000 a pull, two workers of 8
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
        return puller

    async def _idle(self, puller: RawPuller | Pullers, state: _LoopState) -> None:
        """Nothing arrived: finish the round being written, and flush the rounds stored once
        METER_FLUSH_MS has passed since the first of them."""
        # Idle: whatever comes next is not gathered as a heavy stream's (the first round after a
        # burst would otherwise wait up to METER_FLUSH_MS).
        self.sizes.heavy = False
        if state.writing is not None:
            # The round before is still being written: finish it before anything here flushes. A
            # consumer that waits its turn (see rounds.focus) keeps messages buffered, so the
            # loop's head does not wait for the write when the one in hand has nothing; a flush
            # run beside the write then cleared the dirty marks the write added meanwhile, and
            # the pages they marked were never written once the cache was emptied at the next
            # turn (the reads bench at 16 partitions: 711 of a million events missing from
            # subjects' day pages, readings and rollups exact).
            await state.writing
            state.writing = None
        if isinstance(puller, Pullers) and puller.waiting:
            # The partition in hand delivers nothing (say its last events were removed by the
            # stream's limits): the others wait no longer than its slice.
            self._turn(puller)
        if self._unacked is not None and time.monotonic() - self._unflushed_at >= state.flush_after:
            await self._flush(puller)
        if self.cp.replay_done():
            self.cp.end_replay()

    async def _gather(
        self, puller: RawPuller | Pullers, msgs: list[WireMsg], take: int, state: _LoopState
    ) -> tuple[Round, float]:
        """A round of ``msgs`` and what else arrives in time (taken ``take`` at most at a
        time), and when it began to gather."""
        # A write round gathers what arrives within flush_ms (or up to batch_size events): more
        # events per round means fewer writes per event. A subject's events are folded together,
        # once _FOLD_AT of them are in or at the end.
        started = time.monotonic()
        await self.w.registry.catch_up()
        rnd = Round(self._levels, self.cp.folded)
        self.w.registry.new_round()
        rnd.switch, self._switch = self._switch, False
        self._add(rnd, msgs, puller)
        while not rounds.gathered(
            len(rnd.rows), len(rnd.by_subject), state.round_limit, state.first_subjects
        ):
            # More waiting: gather up to METER_FLUSH_MS. Caught up: linger a moment for what is
            # arriving, so a steady stream makes rounds of useful size. Only what the consumers
            # taken from still have counts: once the one a runner works through alone (see
            # rounds.focus) has delivered all it had, the round ends, though the others wait
            # with their backlogs. Counted with them, the round waited out METER_FLUSH_MS for
            # nothing at the end of each partition's backlog: one worker of 16 partitions spent
            # ~14 of the live bench shape's ~18 s so (0.14 of the raw baseline).
            waiting = puller.waiting if isinstance(puller, Pullers) else frozenset()
            wait = rounds.gather_wait(
                time.monotonic() - started,
                backlog=pending_after(rnd.marks, waiting) > 0,
                others_behind=bool(waiting),
                heavy=self.sizes.heavy,
                flush_s=state.flush_after,
                linger=state.linger,
            )
            if wait <= 0:
                break
            msgs = await puller.take(min(state.round_limit - len(rnd.rows), take), timeout=wait)
            if not msgs:
                break
            self._add(rnd, msgs, puller)
        return rnd, started

    async def _fold(
        self, puller: RawPuller | Pullers, rnd: Round, started: float, state: _LoopState
    ) -> None:
        """Fold the round, size the next one from it, and with a consumer per partition,
        turn to the one the next rounds take from (see rounds.focus)."""
        spread_out = 0 < state.first_subjects <= len(rnd.by_subject)
        rnd.heavy = self.sizes.begun(len(rnd.rows), started, time.monotonic(), state.linger)
        await self.folder.fold_round(rnd)
        if not spread_out or self.sizes.counted > state.counted:
            state.first_subjects = 0
        state.round_limit = self.sizes.limit(
            self.settings.batch_size,
            len(rnd.rows),
            len(rnd.series),
            self.keys.cache_budget // 2,
        )
        # Pull ahead about one round (its parts bound a round of the wide shape to ~3,300
        # events; 50,000 pulled ahead held ~18 MB more at ~13,000).
        puller.max_buffer = max(state.round_limit, self._pull_batch)
        if isinstance(puller, Pullers):
            self._turn(puller)

    async def _write(
        self, puller: RawPuller | Pullers, rnd: Round, started: float, state: _LoopState
    ) -> None:
        """Once the round before is written, spread the round into the keys it changes and
        start its write (_process), beside which the next round is taken and folded unless it
        lets the cache go; or, where a runner of every partition regroups, write it and start
        again (Regroup)."""
        if state.writing is not None:
            await state.writing
        # The keys the round changes, once the round before is written (its keys' work let go):
        # at a turn, whether they are held decides rounds.lets_go.
        self.folder.spread_round(rnd)
        if rnd.switch:
            holds = self.keys.holds
            rnd.let_go = rounds.lets_go(
                self.keys.cache_bytes,
                self.keys.packed_bytes,
                self.settings.spill_mb,
                unheld=sum(1 for wkey in rnd.work if not holds(wkey)),
                keys=len(rnd.work),
            )
            self.w.stats.let_goes += rnd.let_go
        if self.owns_all and self._regroup(puller, rnd):
            # Write this round and everything before it, then start again from the checkpoints
            # with the other kind of consumer.
            state.writing = None
            await self._process(puller, rnd, started)
            if self._unacked is not None or self.writer.has_dirty():  # not flushed by it
                await self._flush(puller)
            raise Regroup("one consumer per partition" if not self.merged else "one consumer")
        state.writing = asyncio.create_task(self._process(puller, rnd, started))
        if rnd.let_go:
            # A turn that lets the cache go (see _process) writes everything the rounds before
            # held: the next round is folded once that is done and let go, not beside it. Folded
            # beside it, the next round's parts came on top of ~13,000 readings and ~13,000
            # pages and the flush's encoded writes at 10,000 subjects (wide bench shape): ~50 MB
            # of Python objects in use, whose arenas stayed the worker's (45 at 1,000 subjects).
            await state.writing
            state.writing = None

    def _regroup(self, puller: RawPuller | Pullers, rnd: Round) -> bool:
        """Whether a runner of every partition turns to the other kind of consumer after
        this round (see rounds.split)."""
        if isinstance(puller, Pullers):
            backlog = sum(puller.pending())
        else:
            backlog = pending_after(rnd.marks)
        want = rounds.split(
            backlog,
            merged=self.merged,
            focus=self._focus,
            partitions=len(self.partitions),
            at=rounds.FOCUS_AT,
            release=rounds.BACKLOG,
        )
        return want != self.merged

    def _turn(self, puller: Pullers) -> None:
        """Which partition the next rounds take from (see rounds.focus)."""
        now = time.monotonic()
        pending = puller.pending()
        focus, puller.waiting = rounds.focus(
            pending,
            self._focus,
            now - self._focus_since,
            at=rounds.FOCUS_AT,
            release=rounds.BACKLOG,
            slice_s=rounds.FOCUS_S,
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

    def _add(self, rnd: Round, msgs: list[WireMsg], puller: RawPuller | Pullers) -> None:
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
                    self.folder.fold_subject(rnd, same)
                    del by_subject[msg.subject]
        rnd.last = last
        rnd.marks = puller.marks()
        if lasts is not None:
            rnd.lasts = dict(lasts)
        if self.cp.restart_from is not None:
            raise Restart("replay for a new meter")

    async def _process(self, puller: RawPuller | Pullers, rnd: Round, started: float) -> None:
        if rnd.let_go:
            # The runner has turned to another partition's backlog: write what the rounds
            # before left in memory, then let the cache go (see rounds.focus).
            await self._flush(puller)
            self._let_go_keys()
            self.sizes.outgrow()
        if rnd.rows:
            self.sizes.touching(rnd.work, len(rnd.rows), self.keys.holds)
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
            await self.writer.write(rnd, dead, defer_readings=pending >= rounds.BACKLOG)
            if rnd.rows:
                self.sizes.stored(rnd.held, len(rnd.rows))
            if dead:
                seqs = {seq for seq, _ in dead}
                stored = {seq: at for _, seq, at in rnd.rows if seq in seqs}
                await self.writer.dead_letter(dead, stored)
            # The round's messages and work are stored: let them go before the flush, when
            # the cache is at its fullest and the next round is being folded beside it.
            rnd.release()
            self.cp.advance(last, rnd.lasts if self.merged else None)
            if self._unacked is None:
                self._unflushed_at = time.monotonic()
            self._unacked = marks
            # Summaries are written at once when a backlog has just been cleared, else at
            # most METER_FLUSH_MS apart while caught up (or idle, see _idle), and every
            # METER_SUMMARY_FLUSH_MS under load; after them the checkpoint, then the
            # acknowledgement (AckAll: the last message acks all before it).
            # A worker that keeps up with a heavy stream also gathers its rounds for up to
            # METER_FLUSH_MS (see _gather). See rounds.flush_due.
            if rounds.flush_due(
                dirty=self.writer.has_dirty(),
                waited=time.monotonic() - self._unflushed_at,
                pending=pending,
                heavy=rnd.heavy,
                behind=self._behind,
                cache_full=self.keys.cache_bytes >= self.keys.cache_budget,
                flush_s=self.settings.flush_ms / 1000,
                summary_flush_s=self.settings.summary_flush_ms / 1000,
            ):
                await self._flush(puller)
            elif pending >= rounds.BACKLOG:
                # Behind, what is held grows with the keys a backlog touches: write it and
                # let it go (caught up, a round's keys are the ones the next touches).
                spill, readings = rounds.spills(
                    self.keys.parked_bytes, self.keys.packed_bytes, self.settings.spill_mb
                )
                if spill:
                    await self._spill(readings=readings)
            self._behind = pending >= rounds.BACKLOG
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

    def _forget_unflushed(self) -> None:
        self.writer.forget()
        self._touched.clear()
        self._unacked = None

    async def _flush(self, puller: RawPuller | Pullers) -> None:
        """Write the summaries changed since the last flush, then the checkpoint, then ack."""
        if self.writer.has_dirty():
            await self.writer.write_dirty(readings=True)
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
        and the acknowledgement wait for the flush (see rounds.spills).

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
        readings too, see rounds.spills.
        """
        await self.writer.write_dirty(readings=readings, spill=True)
        self.keys.drop_parked(readings=readings)
        self.sizes.outgrow()
        self.w.stats.reading_spills += readings
        self.w.stats.spills += 1

    @property
    def _levels(self) -> list[tuple[int, int, int]]:
        """(store, width, oldest window end still kept) per summary level."""
        now = int(time.time())
        return [
            (store, width, now - self.settings.summary_retention(level))
            for store, (level, width) in enumerate(self.w.level_widths.items(), start=1)
        ]
