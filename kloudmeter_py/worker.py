"""The worker: fetch a batch -> decode -> match meters -> fold in memory -> write each key once
(compare-and-set) -> checkpoint -> ack.

Exactness rests on three things:

* Each partition (events are spread by subject) is read strictly in stream order by one
  consumer, the consumer of the worker that owns it, which starts right after the lowest
  checkpoint of the partitions it reads and skips what a partition's own checkpoint already
  covers. Every reading key belongs to exactly one partition, since its subject is part of the
  key. A worker that owns every partition reads the stream unfiltered, which costs nats-server
  far less than a filtered consumer per partition.
* Each reading stores ``lastSeq``, the highest stream sequence folded into it. Folding skips
  events at or below it, so any replay (after a crash, a redelivery, a second owner, a backfill)
  changes nothing that was already applied.
* Writes are compare-and-set on the key's revision; a lost race re-reads and folds again. The
  checkpoint is written, and the batch acked, only after every write and dead letter of the
  batch is confirmed.
"""

import asyncio
import contextlib
import gc
import time
import uuid
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from kloudmeter_py.config import Settings
from kloudmeter_py.core.aggregate import Acc, Number, ValueError_, fold, fold_many, merge_into
from kloudmeter_py.core.keys import encode_token
from kloudmeter_py.core.meters import CompiledMeter, from_reading, to_reading
from kloudmeter_py.core.models import Event, encoder, event_decoder, reading_decoder
from kloudmeter_py.core.summaries import decode_window, encode_window
from kloudmeter_py.core.windows import widths, window_start, window_token
from kloudmeter_py.store.kv import get_with_revision, scan
from kloudmeter_py.store.layout import Layout
from kloudmeter_py.store.meters import MeterRegistry
from kloudmeter_py.store.pull import RawPuller, ack_fields
from kloudmeter_py.store.wire import Wire, WireError, WireMsg

if TYPE_CHECKING:
    from kloudmeter_py.metrics import Metrics

log = structlog.get_logger(__name__)

_offset_decoder = msgspec.json.Decoder(dict[str, Any])


_Dead = dict[tuple[int, str], tuple[WireMsg, str | None, str]]


class _BatchAck(msgspec.Struct):
    seq: int = 0
    error: dict[str, Any] | None = None


_ack_decoder = msgspec.json.Decoder(_BatchAck)


def tune_gc() -> None:
    """For a worker process: collect cyclic garbage less often.

    A round allocates hundreds of thousands of short-lived objects (messages, events, tuples)
    that reference counting frees, while the key cache keeps tens of thousands alive; with the
    default thresholds the collector walks that cache again and again. Measured in-process on a
    200,000-event backlog: worker CPU 4.3-4.5 s with the defaults, 3.0-3.2 s with these.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 50)


def _event_ms(event: Event, stored_ms: int) -> int:
    """The event's own time in epoch ms, or the time the stream stored it."""
    return int(event.time.timestamp() * 1000) if event.time is not None else stored_ms


def _partition_of(stored_subject: str) -> int:
    """The partition in a stored subject, ``<stream>.events.<partition>.<type>.<subject>``."""
    return int(stored_subject.split(".", 3)[2])


class Restart(Exception):
    """Start the worker's consumer again from its partitions' checkpoints."""


@dataclass(slots=True)
class _Cached:
    acc: Acc
    last_seq: int
    revision: int
    meter_start_seq: int
    replayed: list[int] | None = None
    late: int = 0


# (stream seq, event time ms, number, distinct key, too old for every summary level)
_Item = tuple[int, int, Number | None, str | None, bool]
# (meter, subject, group values, window) of a key
_Series = tuple[CompiledMeter, str, tuple[str | None, ...], tuple[int, int] | None]
# (message, stream seq, event time ms, event)
_Row = tuple[WireMsg, int, int, Event]
_NO_LIMIT = 1 << 60
# Events of one subject gathered in a round before they are folded together.
_FOLD_AT = 64
# Events left waiting after a round that make a backlog: once it is cleared, summaries are
# written at once (a blip of a few events at a steady rate is not one).
_BACKLOG = 1000
# Atomic batches a runner keeps open at once per bucket. nats-server allows 50 in flight per
# stream (1,000 per server) and answers any batch beyond that with 10176 "atomic publish batch
# is incomplete": a flush of 2,000 summary batches started all at once drew 31 of those at
# 10,000 subjects, each a restart from the checkpoint. Eight per runner leave room for six
# workers on one bucket and still keep the server busy (a batch is a round trip of ~1,000 writes).
_BATCHES_IN_FLIGHT = 8


@dataclass(slots=True)
class _Part:
    """The events of one round for one series within one finest window, folded together."""

    meter: CompiledMeter
    subject: str
    groups: tuple[str | None, ...]
    acc: Acc
    first_seq: int
    last_seq: int = 0
    events: int = 0
    late: int = 0  # events too old for every summary level


class _KeyWork:
    """What one round changes in one KV key: the parts that fall in it."""

    __slots__ = ("first_seq", "groups", "last_seq", "meter", "parts", "subject", "window")

    def __init__(self, part: _Part, window: tuple[int, int] | None) -> None:
        self.meter = part.meter
        self.subject = part.subject
        self.groups = part.groups
        self.window = window  # (start epoch seconds, width) for summaries
        self.parts = [part]
        self.first_seq = part.first_seq
        self.last_seq = part.last_seq

    def add(self, part: _Part) -> None:
        self.parts.append(part)
        self.first_seq = min(self.first_seq, part.first_seq)
        self.last_seq = max(self.last_seq, part.last_seq)

    @property
    def events(self) -> int:
        return sum(p.events for p in self.parts)


class _Round:
    """One write round: its messages, its events folded per series and finest window, the
    work per key (store, key) and, only when needed, the events per key one by one."""

    def __init__(self, levels: list[tuple[int, int, int]], position: int) -> None:
        self.levels = levels
        self.last = position  # highest stream sequence in the round
        self.last_msg: WireMsg | None = None  # its message, acknowledged after the round
        self.rows: list[tuple[WireMsg, int, int]] = []  # (message, stream seq, stored-at ms)
        # the same rows by NATS subject (one event type and subject), until they are folded
        self.by_subject: dict[str, list[tuple[WireMsg, int, int]]] = {}
        self.series: dict[tuple[str, int], _Part] = {}  # (reading key, finest window)
        self.dead: _Dead = {}
        self.dropped: set[int] = set()  # sequences dropped by the long dedup
        # store 0 is the readings bucket, 1.. the summary levels
        self.work: dict[tuple[int, str], _KeyWork] = {}
        self.items: dict[tuple[int, str], list[_Item]] | None = None
        self._by_seq: dict[int, WireMsg] | None = None

    def by_seq(self) -> dict[int, WireMsg]:
        if self._by_seq is None:
            self._by_seq = {seq: msg for msg, seq, _ in self.rows}
        return self._by_seq


@dataclass
class WorkerStats:
    batches: int = 0
    events: int = 0
    applied: int = 0
    dead_lettered: int = 0
    deduplicated: int = 0
    writes: int = 0
    conflicts: int = 0
    restarts: int = 0


def _clean_header(text: str) -> str:
    return " ".join(text.split())[:500]


class Worker:
    """Owns some partitions of the event stream and keeps their readings.

    With ``partitions`` given, it owns exactly those. Otherwise it takes its share of the
    partitions through leases in the ``leases`` bucket (keys expire after METER_LEASE_TTL), and
    a partition whose owner died moves to a live worker once the lease expires.
    """

    def __init__(
        self,
        nc: Client,
        settings: Settings,
        *,
        partitions: list[int] | None = None,
        worker_id: str | None = None,
    ) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=10)
        self.settings = settings
        self.layout = Layout(settings)
        self.worker_id = worker_id or uuid.uuid4().hex[:8]
        self.static_partitions = partitions
        self.registry = MeterRegistry(self.js, self.layout)
        self.stats = WorkerStats()
        self.metrics: Metrics | None = None  # set by Metrics.watch_worker
        self._owned: set[int] = set()
        self.runner: Runner | None = None
        self._task: asyncio.Task[None] | None = None
        self._runs = 0  # runners started: each one's consumer has its own name
        # Meters added while no runner was reading, and replays a stopped runner had not yet
        # started: handed to the next runner.
        self._unseen: list[CompiledMeter] = []
        self._carried: tuple[int | None, set[str]] = (None, set())
        self._leases: dict[int, int] = {}  # partition -> lease revision
        self._lease_task: asyncio.Task[None] | None = None
        self._wire: Wire | None = None
        self._wire_lock = asyncio.Lock()

    async def wire(self) -> Wire:
        """The hot-path connection (pulls and KV write batches), opened again after a failure."""
        from kloudmeter_py.store.credentials import load as load_credentials

        async with self._wire_lock:
            if self._wire is None or self._wire.error is not None:
                self._wire = await Wire.connect(
                    self.settings.nats_url,
                    name=f"kloudmeter-worker-{self.worker_id}",
                    credentials=load_credentials(self.settings),
                )
            return self._wire

    @property
    def owned(self) -> list[int]:
        return sorted(self._owned)

    async def start(self) -> None:
        self.readings = await self.js.key_value(self.layout.readings_bucket)
        self.level_widths = widths(self.settings.interval)
        self.store_buckets = [self.layout.readings_bucket] + [
            self.layout.summary_buckets[level] for level in self.level_widths
        ]
        self.stores = [self.readings] + [
            await self.js.key_value(bucket) for bucket in self.store_buckets[1:]
        ]
        info = await self.js.stream_info(f"KV_{self.layout.readings_bucket}")
        self.atomic = bool(getattr(info.config, "allow_atomic", False))
        self.offsets = await self.js.key_value(self.layout.offsets_bucket)
        self.dedup: KeyValue | None = None
        if self.settings.dedup_horizon:
            self.dedup = await self.js.key_value(self.layout.dedup_bucket)
        await self.registry.start()
        self.registry.on_meter_added.append(self._meter_added)
        if self.static_partitions is not None:
            self._owned = set(self.static_partitions)
            self._start_runner()
        else:
            self.leases = await self.js.key_value(self.layout.leases_bucket)
            await self._lease_round()
            self._lease_task = asyncio.create_task(self._lease_loop(), name="leases")
        log.info("worker.started", worker=self.worker_id, partitions=self.owned)

    def _start_runner(self) -> None:
        if not self._owned:
            return
        self._runs += 1
        runner = Runner(self, sorted(self._owned), self._runs)
        restart_from, meters = self._carried
        runner.inherit(restart_from, meters)
        for cm in self._unseen:
            runner.meter_added(cm)
        self._carried = (None, set())
        self._unseen = []
        self.runner = runner
        self._task = asyncio.create_task(runner.run(), name="runner")

    async def _stop_runner(self) -> None:
        runner, self.runner = self.runner, None
        if runner is not None:
            self._carried = (runner._restart_from, set(runner._replay_meters))
        task, self._task = self._task, None
        if task is None:
            return
        # Cancel until it is done: a cancellation can be lost in a library's wait.
        for _ in range(50):
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=0.2)
            if done:
                break
        else:
            log.error("runner.stop_timeout", worker=self.worker_id)
            return
        with contextlib.suppress(asyncio.CancelledError, Exception):
            task.result()

    def _meter_added(self, cm: CompiledMeter) -> None:
        if self.runner is not None:
            self.runner.meter_added(cm)
        else:
            self._unseen.append(cm)

    async def _lease_loop(self) -> None:
        interval = self.settings.lease_ttl / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self._lease_round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("lease.round_failed", worker=self.worker_id, error=repr(exc))

    async def _lease_round(self) -> None:
        """Heartbeat, renew owned leases, give back extras, take free partitions up to a share."""
        kv = self.leases
        me = self.worker_id.encode()
        await kv.put(f"worker.{self.worker_id}", me)
        live = len(await scan(self.js, self.layout.leases_bucket, "worker.*")) or 1
        total = self.settings.partitions
        share = -(-total // live)
        for p, revision in sorted(self._leases.items()):
            try:
                self._leases[p] = await kv.update(f"partition.{p}", me, last=revision)
            except KeyWrongLastSequenceError:
                log.warning("lease.lost", worker=self.worker_id, partition=p)
                del self._leases[p]
        extra = sorted(self._leases)[share:]
        released = {p: self._leases.pop(p) for p in extra}
        # Stop reading lost and released partitions (one restart for all of them) before
        # giving the released ones back.
        await self._set_owned()
        for p, revision in released.items():
            with contextlib.suppress(Exception):
                await kv.delete(f"partition.{p}", last=revision)
            log.info("lease.released", worker=self.worker_id, partition=p)
        offset = zlib.crc32(self.worker_id.encode()) % total
        for i in range(total):
            if len(self._leases) >= share:
                break
            p = (offset + i) % total
            if p in self._leases:
                continue
            try:
                self._leases[p] = await kv.create(f"partition.{p}", me)
            except KeyWrongLastSequenceError:
                continue
            log.info("lease.acquired", worker=self.worker_id, partition=p)
        await self._set_owned()

    async def _set_owned(self) -> None:
        """Read exactly the leased partitions: a changed set restarts the consumer (from the
        checkpoints, so what the old one had not yet stored is read again)."""
        if set(self._leases) == self._owned and (self.runner is not None or not self._owned):
            return
        await self._stop_runner()
        self._owned = set(self._leases)
        self._start_runner()

    async def stop(self) -> None:
        if self._lease_task is not None:
            for _ in range(50):
                self._lease_task.cancel()
                done, _ = await asyncio.wait({self._lease_task}, timeout=0.2)
                if done:
                    break
        await self._stop_runner()
        if self._leases:
            # Give the partitions back at once, so another worker need not wait for expiry.
            for p, revision in self._leases.items():
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2):
                        await self.leases.delete(f"partition.{p}", last=revision)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self.leases.delete(f"worker.{self.worker_id}")
            self._leases.clear()
        await self.registry.stop()
        if self._wire is not None:
            await self._wire.close()
        log.info("worker.stopped", worker=self.worker_id, **vars(self.stats))


class Runner:
    """The in-order reader of the partitions a worker owns: one consumer for all of them."""

    def __init__(self, worker: Worker, partitions: list[int], run: int = 1) -> None:
        self.w = worker
        self.partitions = partitions
        self.layout = worker.layout
        self.settings = worker.settings
        self.cache: dict[tuple[int, str], _Cached] = {}
        self.position = 0  # last stream seq whose readings and dead letters are stored
        self._folded = 0  # highest stream seq folded (into the round in progress or before)
        # Summaries changed in memory but not yet written, the last message not yet acked,
        # and since when: all are flushed together with the checkpoint.
        self._defer = self.settings.summary_flush_ms > 0
        self._dirty: dict[tuple[int, str], _Series] = {}
        self._unacked: WireMsg | None = None
        self._behind = False  # the last round left a backlog (_BACKLOG events or more) waiting
        self._unflushed_at = 0.0
        # Per partition, the checkpoint read at the start: its messages at or below it are
        # already applied and are skipped (the consumer starts at the lowest checkpoint).
        self._skip: dict[int, int] = {}
        self._skip_below = 0
        # Per partition, the checkpoint it started from: never written lower (a partition
        # ahead of the others is not moved back while they catch up).
        self._floor: dict[int, int] = {}
        self._started = False  # checkpoints read: position and the floors are known
        self.consumer = f"{self.layout.stream}-w{worker.worker_id}-{run}"
        self._restart_from: int | None = None
        # While replaying seqs at or below its partition's horizon (what was read before),
        # only meters that caused the replay get dead letters; _replay_horizon is the highest.
        self._horizons: dict[int, int] = {}
        self._replay_horizon = 0
        self._replay_meters: set[str] = set()
        self._pull_batch = min(self.settings.batch_size, 1000)
        self._batch_counter = 0
        # Atomic batches open at once, per bucket (see _BATCHES_IN_FLIGHT).
        self._batch_slots: dict[int, asyncio.Semaphore] = {}
        self.log = log.bind(partitions=partitions, worker=worker.worker_id)

    def meter_added(self, cm: CompiledMeter) -> None:
        """A meter that should have seen events already applied: replay them. Before the
        checkpoints are read that is not known yet, so the replay is asked for anyway
        (``_consume`` drops it when every checkpoint is below its start)."""
        applied = max(self.position, self._folded, self._skip_below)
        if not self._started or cm.meter.startSeq < applied:
            self.inherit(cm.meter.startSeq + 1, {cm.meter.id})
            self.log.info(
                "partition.replay_requested", meter=cm.meter.id, start=cm.meter.startSeq + 1
            )

    def inherit(self, start: int | None, meters: set[str]) -> None:
        """Replay from ``start`` for ``meters`` (asked of this runner or of the one before)."""
        if start is None:
            return
        if self._restart_from is None or start < self._restart_from:
            self._restart_from = start
        self._replay_meters |= meters

    def _replaying(self, msg: WireMsg, seq: int) -> bool:
        """Whether this event was read before, and now only replayed (see _horizons)."""
        if seq > self._replay_horizon:
            return False
        return seq <= self._horizons.get(_partition_of(msg.subject), 0)

    async def run(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._consume()
            except asyncio.CancelledError:
                raise
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
                self.cache.clear()
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2):
                        await self.w.js.delete_consumer(self.layout.stream, self.consumer)

    async def _read_checkpoints(self) -> dict[int, int]:
        async def one(p: int) -> int:
            value, _ = await get_with_revision(self.w.offsets, f"partition.{p}")
            return 0 if value is None else int(_offset_decoder.decode(value).get("seq", 0))

        seqs = await asyncio.gather(*(one(p) for p in self.partitions))
        return dict(zip(self.partitions, seqs, strict=True))

    async def _write_checkpoints(self, seqs: dict[int, int]) -> None:
        now = datetime.now(UTC)
        worker = self.w.worker_id
        await asyncio.gather(
            *(
                self.w.offsets.put(
                    f"partition.{p}", encoder.encode({"seq": seq, "worker": worker, "at": now})
                )
                for p, seq in seqs.items()
            )
        )

    async def _write_checkpoint(self, seq: int) -> None:
        """Every partition read is applied up to ``seq`` (or its higher starting point)."""
        floor = self._floor
        await self._write_checkpoints({p: max(seq, floor.get(p, 0)) for p in self.partitions})

    def _filter(self) -> dict[str, Any]:
        if len(self.partitions) == self.settings.partitions:
            return {}  # the stream holds only events: unfiltered is every partition
        filters = [self.layout.partition_filter(p) for p in self.partitions]
        if len(filters) == 1:
            return {"filter_subject": filters[0]}
        return {"filter_subjects": filters}

    async def _consume(self) -> None:
        checkpoints = await self._read_checkpoints()
        if self._restart_from is not None and self._restart_from <= max(checkpoints.values()):
            for p, c in checkpoints.items():
                # Read before, up to here: the runner's position covers every partition
                # it reads, the checkpoint this one.
                self._horizons[p] = max(self._horizons.get(p, 0), self.position, c)
            self._replay_horizon = max(self._horizons.values())
            checkpoints = {p: min(c, self._restart_from - 1) for p, c in checkpoints.items()}
            # Lower the checkpoints first, so a crash during the replay resumes it.
            await self._write_checkpoints(checkpoints)
        elif not self._replay_horizon:
            self._replay_meters.clear()  # nothing to replay after all
        self._restart_from = None
        checkpoint = min(checkpoints.values())
        self._floor = checkpoints
        self._skip = {p: c for p, c in checkpoints.items() if c > checkpoint}
        self._skip_below = max(checkpoints.values())
        self.position = self._folded = checkpoint
        self._started = True
        self._forget_unflushed()
        with contextlib.suppress(NotFoundError):
            await self.w.js.delete_consumer(self.layout.stream, self.consumer)
        config = ConsumerConfig(
            name=self.consumer,
            **self._filter(),
            ack_policy=AckPolicy.ALL,
            # Redelivery is never relied on: any out-of-order message restarts from checkpoint.
            ack_wait=60.0,
            max_deliver=-1,
            # Rounds are acknowledged when the summaries are flushed, several rounds at once.
            max_ack_pending=10 * self.settings.batch_size + 2 * self._pull_batch,
            inactive_threshold=60.0,
            num_replicas=1,
            mem_storage=True,
        )
        if checkpoint > 0:
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = checkpoint + 1
        else:
            config.deliver_policy = DeliverPolicy.ALL
        await self.w.js.add_consumer(self.layout.stream, config)
        wire = await self.w.wire()
        puller = RawPuller(wire, self.layout.stream, self.consumer, self._pull_batch)
        await puller.start()
        self.log.debug("partition.consuming", start=checkpoint + 1)
        round_limit = self.settings.batch_size
        flush_after = self.settings.flush_ms / 1000
        linger = min(0.1, flush_after)
        # The previous round's writes, still in flight while the next round is gathered and
        # folded; a round's writes start only after the previous round's are stored.
        writing: asyncio.Task[None] | None = None
        try:
            while True:
                if writing is not None and (writing.done() or not puller.buffer):
                    await writing
                    writing = None
                if self._restart_from is not None:
                    raise Restart("replay for a new meter")
                wait = 1.0
                if self._unacked is not None:  # flush deferred summaries once idle
                    wait = min(1.0, max(0.0, self._unflushed_at + flush_after - time.monotonic()))
                msgs = await puller.take(round_limit, timeout=wait)
                if not msgs:
                    if (
                        self._unacked is not None
                        and time.monotonic() - self._unflushed_at >= flush_after
                    ):
                        await self._flush(puller)
                    if self._replay_done():
                        self._end_replay()
                    continue
                # A write round gathers what arrives within flush_ms (or up to batch_size
                # events): more events per round means fewer writes per event. A subject's
                # events are folded together, once _FOLD_AT of them are in or at the end.
                started = time.monotonic()
                await self.w.registry.catch_up()
                rnd = _Round(self._levels, self._folded)
                self._add(rnd, msgs)
                while len(rnd.rows) < round_limit:
                    # More waiting: gather up to METER_FLUSH_MS. Caught up: linger a moment
                    # for what is arriving, so a steady stream makes rounds of useful size.
                    busy = ack_fields(msgs[-1].reply)[3] > 0
                    left = (flush_after if busy else linger) - (time.monotonic() - started)
                    if left <= 0:
                        break
                    msgs = await puller.take(round_limit - len(rnd.rows), timeout=left)
                    if not msgs:
                        break
                    self._add(rnd, msgs)
                await self._fold_round(rnd)
                if writing is not None:
                    await writing
                writing = asyncio.create_task(self._process(puller, rnd, started))
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

    @staticmethod
    async def _keep_alive(puller: RawPuller, msg: WireMsg) -> None:
        """A long write round tells the server it is still working on the batch."""
        while True:
            await asyncio.sleep(20)
            puller.in_progress(msg)

    def _replay_done(self) -> bool:
        # (not while a replay for another meter is asked for: its meter must stay listed)
        return (
            bool(self._replay_horizon)
            and self.position >= self._replay_horizon
            and self._restart_from is None
        )

    def _end_replay(self) -> None:
        self._replay_horizon = 0
        self._horizons.clear()
        self._replay_meters.clear()

    def _add(self, rnd: _Round, msgs: list[WireMsg]) -> None:
        """Check the order of newly arrived messages and add them to the round."""
        rows = rnd.rows
        by_subject = rnd.by_subject
        last = rnd.last
        skip = self._skip
        early = self.w.dedup is None  # the long dedup looks at a whole round at once
        final = msgs[-1]
        for msg in msgs:
            seq, delivered, stored_ns, _ = ack_fields(msg.reply)
            if delivered != 1 or seq <= last:
                raise Restart(f"out of order at stream seq {seq}")
            last = seq
            if skip:
                if seq > self._skip_below:
                    skip.clear()
                elif seq <= skip.get(_partition_of(msg.subject), 0):
                    continue  # applied before: its partition's checkpoint covers it
            row = (msg, seq, stored_ns // 1_000_000)
            rows.append(row)
            # A round holds its messages until it is written: keep them small. The ack
            # subject is needed only on a take's last message (the one acknowledged), and one
            # subject string serves all the messages of a subject.
            if msg is not final:
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
        rnd.last_msg = msgs[-1]
        if self._restart_from is not None:
            raise Restart("replay for a new meter")

    def _fold_rows(self, rnd: _Round, rows: list[tuple[WireMsg, int, int]]) -> None:
        """Decode and fold rows of one subject (without the long dedup)."""
        decode = self._decode
        dead = rnd.dead
        decoded: list[_Row] = []
        for msg, seq, stored_ms in rows:
            event = decode(msg, seq, dead)
            if event is not None:
                decoded.append((msg, seq, _event_ms(event, stored_ms), event))
        if decoded:
            self._fold(rnd, decoded)
        # Folded before the round ends, and not in stream order across subjects: a meter
        # added from now on with an earlier start must replay (see meter_added).
        self._folded = max(self._folded, rows[-1][1])

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
                    decoded.append((msg, seq, _event_ms(event, stored_ms), event))
            if decoded:
                kept = await self._dedup(decoded)
                if len(kept) < len(decoded):
                    rnd.dropped.update({row[1] for row in decoded} - {row[1] for row in kept})
                self._fold(rnd, kept)
        rnd.by_subject = {}
        self._folded = rnd.last
        if self._restart_from is not None:
            raise Restart("replay for a new meter")

    async def _process(self, puller: RawPuller, rnd: _Round, started: float) -> None:
        self._spread(rnd)
        dead = rnd.dead
        last = rnd.last
        last_msg = rnd.last_msg
        assert last_msg is not None
        pending = ack_fields(last_msg.reply)[3]
        keepalive = asyncio.create_task(self._keep_alive(puller, last_msg))
        try:
            await self._write(rnd, dead)
            if dead:
                seqs = {seq for seq, _ in dead}
                stored = {seq: at for _, seq, at in rnd.rows if seq in seqs}
                await self._dead_letter(dead, stored)
            self.position = last
            if self._unacked is None:
                self._unflushed_at = time.monotonic()
            self._unacked = last_msg
            # Summaries are written at once when a backlog has just been cleared, else at
            # most METER_FLUSH_MS apart while caught up (or idle, see _consume), and every
            # METER_SUMMARY_FLUSH_MS under load; after them the checkpoint, then the
            # acknowledgement (AckAll: the last message acks all before it).
            waited = time.monotonic() - self._unflushed_at
            caught_up = pending == 0
            if (
                not self._dirty
                or waited >= self.settings.summary_flush_ms / 1000
                or (caught_up and (self._behind or waited >= self.settings.flush_ms / 1000))
                or len(self._dirty) >= 100_000
            ):
                await self._flush(puller)
            self._behind = pending >= _BACKLOG
        finally:
            keepalive.cancel()
        if self._replay_done():
            self._end_replay()
        stats = self.w.stats
        stats.batches += 1
        stats.events += len(rnd.rows)
        stats.dead_lettered += len(dead)
        seconds = time.monotonic() - started
        self.log.debug(
            "round.written",
            events=len(rnd.rows),
            keys=len(rnd.work),
            seconds=round(seconds, 3),
            pending=pending,
        )
        if self.w.metrics is not None:
            self.w.metrics.observe_round(len(rnd.rows), seconds, pending, self.w.worker_id)

    def _forget_unflushed(self) -> None:
        self._dirty.clear()
        self._unacked = None

    async def _flush(self, puller: RawPuller) -> None:
        """Write the summaries changed since the last flush, then the checkpoint, then ack."""
        if self._dirty:
            self.log.debug("summaries.flush", keys=len(self._dirty))
            writes = []
            for wkey, (cm, _, _, _) in self._dirty.items():
                cached = self.cache[wkey]
                body = encode_window(
                    cached.acc, cached.last_seq, cm.meter.startSeq, cached.replayed
                )
                writes.append((wkey, body, cached.revision))
            results = await self._store_many(writes)
            for (wkey, _, _), result in zip(writes, results, strict=True):
                if isinstance(result, int):
                    self.cache[wkey].revision = result
                    self.w.stats.writes += 1
                elif isinstance(result, KeyWrongLastSequenceError):
                    # The events behind this state are no longer at hand: start again from
                    # the checkpoint (lastSeq makes the replay exact).
                    self.w.stats.conflicts += 1
                    raise Restart("a summary was written by another worker")
                else:
                    raise result
            self._dirty.clear()
        await self._write_checkpoint(self.position)
        if self._unacked is not None:
            puller.ack(self._unacked)
            self._unacked = None
        if len(self.cache) > 200_000:
            self.cache.clear()

    def _decode(self, msg: WireMsg, seq: int, dead: _Dead) -> Event | None:
        """The event in a message, or None after recording why it is unusable."""
        replaying = self._replaying(msg, seq)
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
        """Fold events into the round per series and finest window: the events of one type,
        subject and window together, each meter over all of them at once; event by event
        for a meter that some of them do not fit (to dead-letter exactly those)."""
        bucket_ms = self.settings.interval * 1000
        by_type = self.w.registry.by_type
        series = rnd.series
        together: dict[tuple[str, str, int], list[_Row]] = {}
        for row in rows:
            event = row[3]
            gkey = (event.eventType, event.subject, row[2] // bucket_ms)
            group = together.get(gkey)
            if group is None:
                together[gkey] = [row]
            else:
                group.append(row)
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
                    self._fold_each(rnd, cm, group, bucket)
                    continue
                for key, groups, indexes, numbers, dkeys in found:
                    if indexes is None:
                        at_list, seq_list = ats, seqs
                    else:
                        at_list = [ats[i] for i in indexes]
                        seq_list = [seqs[i] for i in indexes]
                    part = series.get((key, bucket))
                    if part is None:
                        part = series[(key, bucket)] = _Part(
                            cm, subject, groups, Acc(), seq_list[0]
                        )
                    fold_many(part.acc, numbers, dkeys, at_list, seq_list)
                    part.last_seq = seq_list[-1]
                    part.events += len(seq_list)

    def _fold_each(self, rnd: _Round, cm: CompiledMeter, rows: list[_Row], bucket: int) -> None:
        series = rnd.series
        dead = rnd.dead
        for msg, seq, at_ms, event in rows:
            if seq <= cm.meter.startSeq:
                continue
            try:
                key, groups, number, dkey = cm.extract(event.subject, event.data)
            except ValueError_ as exc:
                if cm.meter.id in self._replay_meters or not self._replaying(msg, seq):
                    dead[(seq, cm.meter.id)] = (msg, cm.meter.id, str(exc))
                continue
            part = series.get((key, bucket))
            if part is None:
                part = series[(key, bucket)] = _Part(cm, event.subject, groups, Acc(), seq)
            fold(part.acc, number, dkey, at_ms, seq, _NO_LIMIT)
            part.last_seq = seq
            part.events += 1

    def _spread(self, rnd: _Round) -> None:
        """Spread the round's partial states over the keys they change: the reading and each
        summary level whose retention still covers the window."""
        interval = self.settings.interval
        work = rnd.work
        # per finest window: (store, key suffix, window) of each summary level that keeps it
        targets: dict[int, list[tuple[int, str, tuple[int, int]]]] = {}
        for (key, bucket), part in rnd.series.items():
            levels = targets.get(bucket)
            if levels is None:
                start0 = bucket * interval
                levels = targets[bucket] = []
                for store, width, oldest in rnd.levels:
                    start = start0 - start0 % width
                    if start + width > oldest:
                        levels.append((store, "." + window_token(start), (start, width)))
            if not levels:
                part.late = part.events
            kw = work.get((0, key))
            if kw is None:
                work[(0, key)] = _KeyWork(part, None)
            else:
                kw.add(part)
            for store, suffix, window in levels:
                wkey = (store, key + suffix)
                kw = work.get(wkey)
                if kw is None:
                    work[wkey] = _KeyWork(part, window)
                else:
                    kw.add(part)

    def _exact_items(self, rnd: _Round) -> dict[tuple[int, str], list[_Item]]:
        """Every key's events one by one, for keys whose stored state already holds part of
        this round (a replay after a crash, a lost compare-and-set, a replayed dead letter)."""
        if rnd.items is not None:
            return rnd.items
        items: dict[tuple[int, str], list[_Item]] = {}
        scratch: _Dead = {}
        for msg, seq, stored_ms in rnd.rows:
            if seq in rnd.dropped:
                continue
            event = self._decode(msg, seq, scratch)
            if event is None:
                continue
            at_ms = _event_ms(event, stored_ms)
            levels = []
            for store, width, oldest in rnd.levels:
                start = window_start(at_ms, width)
                if start + width > oldest:
                    levels.append((store, start))
            late = not levels
            for cm in self.w.registry.by_type.get(event.eventType, ()):
                if seq <= cm.meter.startSeq:
                    continue
                try:
                    key, _, number, dkey = cm.extract(event.subject, event.data)
                except ValueError_:
                    continue  # dead-lettered by _fold
                item = (seq, at_ms, number, dkey, late)
                items.setdefault((0, key), []).append(item)
                for store, start in levels:
                    items.setdefault((store, f"{key}.{window_token(start)}"), []).append(item)
        rnd.items = items
        return items

    @property
    def _levels(self) -> list[tuple[int, int, int]]:
        """(store, width, oldest window end still kept) per summary level."""
        now = int(time.time())
        return [
            (store, width, now - self.settings.summary_retention(level))
            for store, (level, width) in enumerate(self.w.level_widths.items(), start=1)
        ]

    async def _load(self, keys: list[tuple[int, str]], *, leader: bool = False) -> None:
        """Read keys into the cache: many per direct-get request, or one by one from the
        stream leader (after a lost compare-and-set, where a replica might lag)."""
        results: dict[tuple[int, str], tuple[bytes | None, int]] = {}
        by_store: dict[int, list[str]] = {}
        for store, key in keys:
            by_store.setdefault(store, []).append(key)
        one_by_one: list[tuple[int, str]] = []

        async def direct(store: int, chunk: list[str]) -> None:
            bucket = self.w.store_buckets[store]
            prefix = f"$KV.{bucket}."
            try:
                wire = await self.w.wire()
                found = await wire.last_values(f"KV_{bucket}", [prefix + k for k in chunk])
            except WireError as exc:
                self.log.debug("load.direct_failed", error=str(exc))
                one_by_one.extend((store, k) for k in chunk)
                return
            for k in chunk:
                results[(store, k)] = found.get(prefix + k, (None, 0))

        if not leader:
            # nats-server answers at most 1,024 subjects per multi_last request (413 above)
            await asyncio.gather(
                *(
                    direct(store, names[i : i + 1000])
                    for store, names in by_store.items()
                    for i in range(0, len(names), 1000)
                )
            )
        else:
            one_by_one = keys
        if one_by_one:
            kvs = self.w.stores
            limit = asyncio.Semaphore(64)

            async def get(wkey: tuple[int, str]) -> None:
                async with limit:
                    results[wkey] = await get_with_revision(kvs[wkey[0]], wkey[1])

            await asyncio.gather(*(get(wkey) for wkey in one_by_one))
        for wkey in keys:
            value, revision = results[wkey]
            if value is None:
                self.cache[wkey] = _Cached(Acc(), 0, revision, -1)
            elif wkey[0]:
                w = decode_window(value)
                self.cache[wkey] = _Cached(
                    w.acc, w.last_seq, revision, w.meter_start_seq, w.replayed
                )
            else:
                r = reading_decoder.decode(value)
                self.cache[wkey] = _Cached(
                    from_reading(r), r.lastSeq, revision, r.meterStartSeq, r.replayed, r.late
                )

    def _apply(self, rnd: _Round, wkey: tuple[int, str], cached: _Cached, dead: _Dead) -> bool:
        """Fold the round into one key's cached state; False when nothing in it is new."""
        kw = rnd.work[wkey]
        if cached.last_seq >= kw.last_seq:
            return False
        is_reading = wkey[0] == 0
        limit = self.settings.unique_limit
        replayed = cached.replayed
        exact = cached.last_seq >= kw.first_seq or bool(
            replayed and any(kw.first_seq <= r <= kw.last_seq for r in replayed)
        )
        if not exact and is_reading and kw.meter.agg.uses_distinct:
            have = cached.acc.distinct or set()
            new: set[str] = set()
            for part in kw.parts:
                if part.acc.distinct:
                    new |= part.acc.distinct - have
            exact = len(have) + len(new) > limit
        if not exact:
            for part in kw.parts:
                merge_into(cached.acc, part.acc)
                if is_reading:
                    cached.late += part.late
            cached.last_seq = kw.last_seq
            return True
        meter = kw.meter.meter
        last_seq = cached.last_seq
        changed = False
        # (.get: a meter deleted during the round has no items left to fold)
        for seq, at_ms, number, dkey, late in self._exact_items(rnd).get(wkey, ()):
            if seq <= cached.last_seq or (replayed and seq in replayed):
                continue
            try:
                # The unique limit is the reading's: a window never holds more distinct
                # values than the reading of the same series.
                fold(cached.acc, number, dkey, at_ms, seq, limit if is_reading else _NO_LIMIT)
                changed = True
                if late and is_reading:
                    cached.late += 1
            except ValueError_ as exc:
                dead[(seq, meter.id)] = (rnd.by_seq()[seq], meter.id, str(exc))
            last_seq = seq
        if not changed and last_seq == cached.last_seq:
            return False
        cached.last_seq = last_seq
        return True

    async def _write(self, rnd: _Round, dead: _Dead) -> None:
        work = rnd.work
        todo = list(work)
        now = datetime.now(UTC)
        for attempt in range(20):
            missing = [k for k in todo if k not in self.cache]
            if missing:
                await self._load(missing, leader=attempt > 0)
            writes: list[tuple[tuple[int, str], bytes, int, _Cached]] = []
            for wkey in todo:
                kw = work[wkey]
                meter = kw.meter.meter
                cached = self.cache[wkey]
                if cached.meter_start_seq != meter.startSeq:
                    # Written for an earlier meter of this id (or new): start from zero.
                    cached = _Cached(Acc(), 0, cached.revision, meter.startSeq)
                    self.cache[wkey] = cached
                if not self._apply(rnd, wkey, cached, dead):
                    continue
                if wkey[0]:
                    if self._defer:
                        # A summary: written by _flush, with the checkpoint.
                        self._dirty[wkey] = (kw.meter, kw.subject, kw.groups, kw.window)
                        continue
                    body = encode_window(
                        cached.acc, cached.last_seq, meter.startSeq, cached.replayed
                    )
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
                writes.append((wkey, body, cached.revision, cached))
            if not writes:
                return
            results = await self._store_many([(wkey, body, rev) for wkey, body, rev, _ in writes])
            todo = []
            for (wkey, _, _, cached), result in zip(writes, results, strict=True):
                if isinstance(result, int):
                    cached.revision = result
                    self.w.stats.writes += 1
                    if wkey[0] == 0:
                        self.w.stats.applied += work[wkey].events
                elif isinstance(result, KeyWrongLastSequenceError):
                    # Someone else wrote this key: read it again and fold what is still new.
                    self.w.stats.conflicts += 1
                    del self.cache[wkey]
                    todo.append(wkey)
                else:
                    self.cache.pop(wkey, None)
                    assert isinstance(result, BaseException)
                    raise result
            if not todo:
                return
            self.log.info("batch.cas_conflict", keys=len(todo), attempt=attempt)
        raise Restart("compare-and-set kept failing")

    async def _cas(self, wkey: tuple[int, str], body: bytes, revision: int) -> int:
        kv: KeyValue = self.w.stores[wkey[0]]
        rev: int = await kv.update(wkey[1], body, last=revision)
        return rev

    async def _store_many(
        self, writes: list[tuple[tuple[int, str], bytes, int]]
    ) -> list[int | BaseException]:
        """Compare-and-set every write; per write its new revision or the error.

        With atomic batches (nats-server 2.12+, streams with allow_atomic) each bucket gets
        batches of up to 1000 conditional writes, one acknowledgement each; a stale revision
        rejects the whole batch, which is then retried key by key after a re-read. Otherwise
        the writes are sent as concurrent conditional updates.
        """
        if not self.w.atomic:
            return list(
                await asyncio.gather(
                    *(self._cas(wkey, body, rev) for wkey, body, rev in writes),
                    return_exceptions=True,
                )
            )
        results: list[int | BaseException] = [0] * len(writes)
        chunks: list[list[int]] = []
        by_store: dict[int, list[int]] = {}
        for i, (wkey, _, _) in enumerate(writes):
            by_store.setdefault(wkey[0], []).append(i)
        for indexes in by_store.values():
            chunk: list[int] = []
            size = 0
            for i in indexes:
                if chunk and (len(chunk) >= 1000 or size + len(writes[i][1]) > 4 << 20):
                    chunks.append(chunk)
                    chunk, size = [], 0
                chunk.append(i)
                size += len(writes[i][1])
            if chunk:
                chunks.append(chunk)
        await asyncio.gather(*(self._atomic(writes, c, results) for c in chunks))
        return results

    async def _atomic(
        self,
        writes: list[tuple[tuple[int, str], bytes, int]],
        chunk: list[int],
        results: list[int | BaseException],
    ) -> None:
        store = writes[chunk[0]][0][0]
        slots = self._batch_slots.get(store)
        if slots is None:
            slots = self._batch_slots[store] = asyncio.Semaphore(_BATCHES_IN_FLIGHT)
        async with slots:
            await self._atomic_one(writes, chunk, results, store)

    async def _atomic_one(
        self,
        writes: list[tuple[tuple[int, str], bytes, int]],
        chunk: list[int],
        results: list[int | BaseException],
        store: int,
    ) -> None:
        self._batch_counter += 1
        batch_id = f"{self.consumer}-{self._batch_counter}"[-64:]
        bucket = self.w.store_buckets[store]
        last = len(chunk) - 1
        head = b"NATS/1.0\r\nNats-Batch-Id: %s\r\nNats-Batch-Sequence: " % batch_id.encode()
        try:
            wire = await self.w.wire()
            reply, answer = wire.new_reply()
            try:
                for n, i in enumerate(chunk):
                    (_, key), body, revision = writes[i]
                    headers = b"%s%d\r\nNats-Expected-Last-Subject-Sequence: %d\r\n%s\r\n" % (
                        head,
                        n + 1,
                        revision,
                        b"Nats-Batch-Commit: 1\r\n" if n == last else b"",
                    )
                    wire.hpublish(f"$KV.{bucket}.{key}", headers, body, reply if n == last else "")
                    if n % 256 == 255:
                        await wire.drain()
                async with asyncio.timeout(10):
                    data = await answer
            finally:
                wire.forget_reply(reply)
            ack = _ack_decoder.decode(data)
        except Exception as exc:
            for i in chunk:
                results[i] = exc
            return
        if ack.error is not None:
            err: BaseException
            if ack.error.get("err_code") == 10071:
                err = KeyWrongLastSequenceError(description=ack.error.get("description"))
            else:
                err = RuntimeError(f"atomic batch refused: {ack.error}")
            for i in chunk:
                results[i] = err
            return
        # An atomic batch is stored contiguously, its commit last.
        for n, i in enumerate(chunk):
            results[i] = ack.seq - (last - n)

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
