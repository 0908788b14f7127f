"""The worker: fetch a batch -> decode -> match meters -> fold in memory -> write each key once
(compare-and-set) -> checkpoint -> ack.

Its steps live in modules named for them:

* ``leases`` - which partitions this worker reads (``Leases``);
* ``runner`` - the in-order reader of those partitions: take a round of events, plan it
  (pure, ``core.plan``), write it, flush summaries, checkpoint, acknowledge (``Runner``);
* ``keystore`` - the key states a round folds into: a cache bounded by bytes, multi-key reads
  and atomic batches of conditional writes (``KeyStore``);
* ``checkpoint`` - where the runner stands, and what it skips or replays (``Checkpoint``).
"""

import asyncio
import contextlib
import gc
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import ServiceUnavailableError
from nats.js.kv import KeyValue

from kloudmeter_py.config import Settings
from kloudmeter_py.core.meters import CompiledMeter
from kloudmeter_py.core.windows import widths
from kloudmeter_py.store.kv import LeanLink
from kloudmeter_py.store.layout import Layout
from kloudmeter_py.store.meters import MeterRegistry
from kloudmeter_py.store.provision import check_partitions, ensure_corrections_bucket
from kloudmeter_py.store.wire import Wire
from kloudmeter_py.worker.corrections import Corrector
from kloudmeter_py.worker.leases import Leases

if TYPE_CHECKING:
    from kloudmeter_py.metrics import RoundObserver
    from kloudmeter_py.worker.alerts import Alerter
    from kloudmeter_py.worker.lifecycle import LifecycleFolder
    from kloudmeter_py.worker.runner import Runner

log = structlog.get_logger(__name__)

__all__ = ["Worker", "WorkerStats", "tune_gc"]


def tune_gc() -> None:
    """For a worker process: collect cyclic garbage less often.

    A round allocates hundreds of thousands of short-lived objects (messages, events, tuples)
    that reference counting frees, while the key cache keeps tens of thousands alive; with the
    default thresholds the collector walks that cache again and again. Measured in-process on a
    200,000-event backlog: worker CPU 4.3-4.5 s with the defaults, 3.0-3.2 s with a first
    generation of 50,000. On a million-event wide backlog a collection of the first generation
    then came every ~0.4 s and took ~25 ms (a round's parts and keys, alive until the round
    is written, were walked again and again): 552 of them, 13.7 s, and 4.8 s in the second
    generation. With 500,000: 107-110 collections, 1.4-3.1 s in all.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(500_000, 20, 50)


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
    turns: int = 0  # times a runner turned to another partition's backlog (core.rounds.focus)
    # times a runner of every partition turned to a consumer per partition or back
    # (core.rounds.split)
    regroups: int = 0
    # times a runner wrote its changed pages and let its parked pages go between flushes
    # (runner._spill)
    spills: int = 0
    # the spills that wrote the deferred readings and let the packed readings go too
    reading_spills: int = 0
    # turns at which a runner wrote what it held and let its key cache go (core.rounds.lets_go)
    let_goes: int = 0


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
        # set by Metrics.watch_worker (in this process) or a metrics.Reporter (to kloudmeter up)
        self.metrics: RoundObserver | None = None
        self._owned: set[int] = set()
        self.runner: Runner | None = None
        self.lifecycle: LifecycleFolder | None = None
        # Usage alerts made after each stored round (worker.alerts); None: none are made.
        self.alerts: Alerter | None = None
        self._task: asyncio.Task[None] | None = None
        self._runs = 0  # runners started: each one's consumer has its own name
        # Meters added while no runner was reading, and replays a stopped runner had not yet
        # started: handed to the next runner.
        self._unseen: list[CompiledMeter] = []
        self._carried: tuple[int | None, set[str]] = (None, set())
        self.leases: Leases | None = None
        self._lease_task: asyncio.Task[None] | None = None
        self._lean = LeanLink(settings, name=f"kloudmeter-worker-{self.worker_id}")
        self._trace_task: asyncio.Task[None] | None = None  # METER_MEMORY_TRACE

    async def wire(self) -> Wire:
        """The hot-path connection (pulls and KV write batches), opened again after a failure."""
        return await self._lean.wire()

    @property
    def owned(self) -> list[int]:
        return sorted(self._owned)

    async def start(self) -> None:
        if self.settings.memory_trace:
            from kloudmeter_py.worker import memtrace

            # Opened first, so that a directory that cannot be written stops the start.
            trace_out = memtrace.open_trace(self.settings.memory_trace, self.worker_id)
        await check_partitions(self.js, self.settings)
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
        self.corrector = Corrector(
            self.js, self.layout.stream, await ensure_corrections_bucket(self.js, self.settings)
        )
        await self.registry.start()
        self.registry.on_meter_added.append(self._meter_added)
        from kloudmeter_py.store.alerts import AlertStore
        from kloudmeter_py.worker.alerts import Alerter, Entitled

        alert_store = AlertStore(self.js, self.settings)
        await alert_store.buckets()
        self.alerts = Alerter(alert_store, self.registry, Entitled(self.js, self.settings))
        from kloudmeter_py.worker.lifecycle import LifecycleFolder

        self.lifecycle = LifecycleFolder(self.js, self.settings, self.layout, self.registry)
        self.lifecycle.corrector = self.corrector
        await self.lifecycle.start()
        if self.static_partitions is not None:
            self._owned = set(self.static_partitions)
            self._start_runner()
        else:
            self.leases = Leases(
                self.js,
                await self.js.key_value(self.layout.leases_bucket),
                self.layout.leases_bucket,
                self.worker_id,
                self.settings.partitions,
                self._set_owned,
            )
            await self._first_lease_round()
            self._lease_task = asyncio.create_task(self._lease_loop(), name="leases")
        if self.settings.memory_trace:
            self._trace_task = asyncio.create_task(memtrace.trace(self, trace_out), name="memtrace")
        log.info("worker.started", worker=self.worker_id, partitions=self.owned)

    def _start_runner(self) -> None:
        if not self._owned:
            return
        self._runs += 1
        from kloudmeter_py.worker.runner import Runner

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
            self._carried = (runner.cp.restart_from, set(runner.cp.replay_meters))
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

    async def _first_lease_round(self) -> None:
        """The first lease round, tried again for ~10 s while the leases bucket answers "no
        responders" (a replicated bucket just created, its leader not yet elected: seen once
        in the 3-node cluster test); after that the error stops the start."""
        assert self.leases is not None
        for attempt in range(20):
            try:
                await self.leases.round()
                return
            except ServiceUnavailableError as exc:
                if attempt == 19:
                    raise
                log.warning("lease.round_failed", worker=self.worker_id, error=repr(exc))
                await asyncio.sleep(0.5)

    async def _lease_loop(self) -> None:
        assert self.leases is not None
        interval = self.settings.lease_ttl / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self.leases.round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("lease.round_failed", worker=self.worker_id, error=repr(exc))

    async def _set_owned(self, leased: set[int]) -> None:
        """Read exactly the leased partitions: a changed set restarts the consumer (from the
        checkpoints, so what the old one had not yet stored is read again)."""
        if leased == self._owned and (self.runner is not None or not self._owned):
            return
        await self._stop_runner()
        self._owned = leased
        self._start_runner()

    async def stop(self) -> None:
        if self._lease_task is not None:
            for _ in range(50):
                self._lease_task.cancel()
                done, _ = await asyncio.wait({self._lease_task}, timeout=0.2)
                if done:
                    break
        await self._stop_runner()
        if self.lifecycle is not None:
            await self.lifecycle.stop()
        if self.leases is not None and self.leases.held:
            # Give the partitions back at once, so another worker need not wait for expiry.
            await self.leases.give_back()
        await self.registry.stop()
        await self._lean.close()
        if self._trace_task is not None:
            self._trace_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._trace_task
        log.info("worker.stopped", worker=self.worker_id, **vars(self.stats))
