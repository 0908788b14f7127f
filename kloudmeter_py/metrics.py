"""Prometheus metrics of the gateway and the worker, served at ``GET /metrics``.

Each :class:`Metrics` holds its own ``CollectorRegistry`` (never the global one), so tests and
several apps in one process do not clash. What it measures:

* HTTP: request latency by method, canonical route (``/api/meters/{meter}/query``) and status
  (a histogram; its ``_count`` is the request count), and events ingested over HTTP by route,
  with the ones JetStream dropped as duplicates counted apart. Both come from one aiohttp
  middleware, which must be the outermost so that it sees the statuses the errors middleware
  makes of exceptions; the ingest routes' handlers are not touched (see ``_ingested``). A
  streaming route (``/api/stream/readings``) is timed over the stream's whole life.
* Worker: events read, applied, deduplicated and dead-lettered, write rounds, KV writes,
  compare-and-set conflicts and restarts, read from each watched worker's ``WorkerStats`` when
  scraped (one source of truth, nothing counted twice); per write round, the number of events
  (batch size) and its duration (flush latency); and the consumer lag of each owned partition:
  the ``num_pending`` of the last message of the partition's last write round.

A gateway and a worker in one process (``kloudmeter up``) share one ``Metrics``; the worker
processes ``kloudmeter up`` starts besides (one per CPU by default) report to it through a pipe
(``Reporter`` in the child, ``follow`` in ``up``), so its ``/metrics`` shows every
worker it runs. A gateway on its own shows the HTTP side only (a worker process would need a
port of its own to be scraped).
"""

import asyncio
import os
import select
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Protocol

import msgspec
import structlog
from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client import Counter as PromCounter
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from kloudmeter_py.worker import WorkerStats

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

METRICS_PATH = "/metrics"
UNMATCHED = "unmatched"  # route label of requests no route matched (404, 405)

# Events per write round: 1 .. METER_BATCH_SIZE (at most 100000).
ROUND_EVENT_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 100000)
ROUND_SECONDS_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

# WorkerStats field -> (metric name without _total, help)
_WORKER_COUNTERS = {
    "events": ("kloudmeter_worker_events", "Events read from the stream in write rounds."),
    "applied": (
        "kloudmeter_events_applied",
        "Events folded into running readings (one per event and matching meter).",
    ),
    "deduplicated": (
        "kloudmeter_events_deduplicated",
        "Events dropped by the worker as repeated ids (METER_DEDUP_HORIZON).",
    ),
    "dead_lettered": (
        "kloudmeter_events_dead_lettered",
        "Dead letters published (one per event, and per meter it failed for).",
    ),
    "batches": ("kloudmeter_worker_write_rounds", "Write rounds completed."),
    "writes": ("kloudmeter_worker_kv_writes", "Reading and summary writes stored."),
    "conflicts": ("kloudmeter_worker_cas_conflicts", "Compare-and-set writes lost to a race."),
    "restarts": ("kloudmeter_worker_restarts", "Partition consumers restarted."),
}


class RoundObserver(Protocol):
    """What a worker tells of each write round it completes (``Metrics``, ``Reporter``)."""

    def observe_round(self, events: int, seconds: float, pending: int, worker: str) -> None: ...


class WatchedWorker(Protocol):
    """What :meth:`Metrics.watch_worker` needs of a worker (``kloudmeter_py.worker.Worker``)."""

    worker_id: str
    stats: "WorkerStats"
    metrics: RoundObserver | None

    @property
    def owned(self) -> list[int]: ...


class _WorkerCollector:
    """Reads the watched workers' stats and lags at scrape time."""

    def __init__(self, metrics: "Metrics") -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        workers = self.metrics.workers
        for attr, (name, doc) in _WORKER_COUNTERS.items():
            family = CounterMetricFamily(name, doc, labels=["worker"])
            for w in workers:
                family.add_metric([w.worker_id], getattr(w.stats, attr))
            yield family
        lag = GaugeMetricFamily(
            "kloudmeter_consumer_lag",
            "Events not yet delivered to the worker's consumer (of the partitions it owns), as "
            "of the last message of its last write round (num_pending).",
            labels=["worker"],
        )
        for w in workers:
            pending = self.metrics.lag.get(w.worker_id)
            if pending is not None and w.owned:
                lag.add_metric([w.worker_id], pending)
        yield lag


class Metrics:
    """The metrics of one process (or one test): a registry and what feeds it."""

    def __init__(self, *, process_collectors: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        if process_collectors:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        self.http_latency = Histogram(
            "kloudmeter_http_request_duration_seconds",
            "HTTP request latency, by method, canonical route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.ingested = PromCounter(
            "kloudmeter_http_events_ingested",
            "Events accepted over HTTP and stored by JetStream, by route (duplicates included).",
            ["route"],
            registry=self.registry,
        )
        self.ingested_duplicates = PromCounter(
            "kloudmeter_http_events_duplicate",
            "Events accepted over HTTP that JetStream dropped as duplicates, by route.",
            ["route"],
            registry=self.registry,
        )
        self.round_events = Histogram(
            "kloudmeter_write_round_events",
            "Events per worker write round (batch size).",
            buckets=ROUND_EVENT_BUCKETS,
            registry=self.registry,
        )
        self.round_seconds = Histogram(
            "kloudmeter_write_round_seconds",
            "Duration of a worker write round: decode, fold, write, checkpoint, ack.",
            buckets=ROUND_SECONDS_BUCKETS,
            registry=self.registry,
        )
        # (method, canonical path) of the routes that ingest events: the gateway sets them
        # from its route declarations (gateway/routes.py, ingests=True).
        self.ingest_routes: frozenset[tuple[str, str]] = frozenset()
        self.workers: list[WatchedWorker] = []
        self.lag: dict[str, int] = {}
        self.registry.register(_WorkerCollector(self))
        self.handler = make_aiohttp_handler(self.registry)

    # -- worker side ---------------------------------------------------------------------------

    def watch_worker(self, worker: WatchedWorker) -> None:
        """Report this worker's counters and lags, and let it call :meth:`observe_round`.

        Sets ``worker.metrics`` to this object (the worker checks it after each round).
        """
        if worker not in self.workers:
            self.workers.append(worker)
        worker.metrics = self

    def observe_round(self, events: int, seconds: float, pending: int, worker: str) -> None:
        """One write round: its size, duration, and the worker's remaining backlog."""
        self.round_events.observe(events)
        self.round_seconds.observe(seconds)
        self.lag[worker] = pending

    # -- gateway side --------------------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Latency by route and status, and events ingested; register it outermost."""
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's code for it)
            raise
        finally:
            route = route_label(request)
            self.http_latency.labels(request.method, route, str(status)).observe(
                time.perf_counter() - started
            )
        if 200 <= status < 300 and (request.method, route) in self.ingest_routes:
            try:
                count, duplicates = await _ingested(request, response)
            except Exception:  # counting must never fail a request that succeeded
                log.warning("metrics.ingest_count_failed", route=route, exc_info=True)
                return response
            if count:
                self.ingested.labels(route).inc(count)
            if duplicates:
                self.ingested_duplicates.labels(route).inc(duplicates)
        return response


class WorkerReport(msgspec.Struct, array_like=True):
    """One line a child worker process writes to ``kloudmeter up``: its counters so far
    (``WorkerStats`` fields), the partitions it owns, its consumer lag as of its last round,
    and the (events, seconds) of the rounds since its previous report."""

    worker: str
    stats: dict[str, int]
    owned: list[int]
    lag: int | None
    rounds: list[tuple[int, float]]


_report_decoder = msgspec.json.Decoder(WorkerReport)


class RemoteWorker:
    """A worker in a child process, as its reports show it (``Metrics.follow``)."""

    def __init__(self, worker_id: str) -> None:
        from kloudmeter_py.worker import WorkerStats

        self.worker_id = worker_id
        self.stats = WorkerStats()
        self.metrics: RoundObserver | None = None
        self.owned: list[int] = []


async def follow(metrics: Metrics, reader: asyncio.StreamReader) -> None:
    """Take a child worker's reports (``Reporter``) into ``metrics`` until its pipe closes:
    its counters and lag under its own ``worker`` label, its rounds into the histograms."""
    remote: RemoteWorker | None = None
    while line := await reader.readline():
        try:
            report = _report_decoder.decode(line)
        except msgspec.DecodeError:
            log.warning("metrics.bad_worker_report", line=line[:200])
            continue
        if remote is None:
            remote = RemoteWorker(report.worker)
            metrics.workers.append(remote)
        for attr, value in report.stats.items():
            if attr in _WORKER_COUNTERS:
                setattr(remote.stats, attr, value)
        remote.owned = report.owned
        for events, seconds in report.rounds:
            metrics.round_events.observe(events)
            metrics.round_seconds.observe(seconds)
        if report.lag is not None:
            metrics.lag[report.worker] = report.lag
    if remote is not None:
        remote.owned = []  # gone: its counters stay, it has no lag any more


class Reporter:
    """A child worker process's side of ``follow``: a report a second (and a last one when it
    stops) written to a pipe that ``kloudmeter up`` reads.

    The pipe is not blocking: a report the pipe has no room for is dropped (its counters come
    again in the next one; only the dropped rounds are missing from the histograms), so a
    parent that stopped reading never holds the worker up. A report is one write of at most
    ``select.PIPE_BUF`` bytes, which a pipe takes whole or not at all: one with more rounds
    than fit goes without them, so that no line ever arrives cut.
    """

    def __init__(self, fd: int, worker: WatchedWorker, period: float = 1.0) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self.worker = worker
        self.period = period
        self.rounds: list[tuple[int, float]] = []
        self.lag: int | None = None
        worker.metrics = self

    def observe_round(self, events: int, seconds: float, pending: int, worker: str) -> None:
        self.rounds.append((events, round(seconds, 6)))
        self.lag = pending

    def report(self) -> None:
        w = self.worker
        stats = {attr: getattr(w.stats, attr) for attr in _WORKER_COUNTERS}
        report = WorkerReport(w.worker_id, stats, w.owned, self.lag, self.rounds)
        line = msgspec.json.encode(report) + b"\n"
        if len(line) > select.PIPE_BUF:
            report.rounds = []
            line = msgspec.json.encode(report) + b"\n"
        self.rounds = []
        try:
            os.write(self.fd, line)
        except BlockingIOError:
            log.debug("metrics.report_dropped")
        except OSError:  # the parent is gone
            pass

    async def run(self) -> None:
        """Report every ``period`` seconds until cancelled, then once more."""
        try:
            while True:
                await asyncio.sleep(self.period)
                self.report()
        finally:
            self.report()
            os.close(self.fd)


METRICS = web.AppKey("metrics", Metrics)


def route_label(request: web.Request) -> str:
    """The route's canonical path (``/api/perf/{host}/{label}``), never the raw path."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED


class _IngestAnswer(msgspec.Struct):
    duplicate: bool = False  # /api/register-event
    events: int = 1  # /api/perf/{host}/{epoch}
    duplicates: int = 0


_answer_decoder = msgspec.json.Decoder(_IngestAnswer)
_batch_decoder = msgspec.json.Decoder(list[msgspec.Raw])


async def _ingested(request: web.Request, response: web.StreamResponse) -> tuple[int, int]:
    """(events stored, of which duplicates) of a successful ingest request.

    ``/api/register-event`` and ``/api/perf`` say so in their answers; ``/api/v1/events``
    answers 204, so its events are counted in the request body the handler has already read
    (aiohttp keeps it), as raw JSON items without decoding them.
    """
    if request.path.startswith("/api/v1/"):
        raw = await request.read()
        if raw.lstrip()[:1] == b"[":
            return len(_batch_decoder.decode(raw)), 0
        return 1, 0
    body = response.body if isinstance(response, web.Response) else None
    if not isinstance(body, bytes):
        return 0, 0
    answer = _answer_decoder.decode(body)
    return answer.events, answer.duplicates + int(answer.duplicate)
