"""``kloudmeter bench``: end-to-end throughput, HTTP ingest, lag and memory, measured against
the raw JetStream baseline in the same run (absolute numbers drift on shared machines; the
ratio is the figure to compare)."""

import asyncio
import contextlib
import os
import random
import socket
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from aiohttp import web
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy, StreamConfig

from kloudmeter_py.config import NATS_AUTH, Settings
from kloudmeter_py.core.keys import ROLLUP, decode_token, event_subject
from kloudmeter_py.core.models import (
    encoder,
    meter_in_decoder,
    reading_decoder,
    validate_meter,
)
from kloudmeter_py.core.summaries import decode_cells, page_start, summary_readings
from kloudmeter_py.core.windows import widths, window_start
from kloudmeter_py.store.credentials import load as load_credentials
from kloudmeter_py.store.kv import connect as kv_connect
from kloudmeter_py.store.kv import scan
from kloudmeter_py.store.layout import Layout
from kloudmeter_py.store.provision import provision
from kloudmeter_py.store.pull import RawPuller
from kloudmeter_py.store.server import NatsServer, python_child
from kloudmeter_py.store.wire import Wire

REGIONS = ("eu", "us", "ap")
LAG_METER = {"id": "lag", "eventType": "lag", "aggregation": "latest", "valueProperty": "$.sent"}
METERS = (
    {"id": "calls", "eventType": "req", "aggregation": "count"},
    {
        "id": "bytes",
        "eventType": "req",
        "aggregation": "sum",
        "valueProperty": "$.bytes",
        "groupBy": {"region": "$.region"},
    },
    {"id": "users", "eventType": "req", "aggregation": "unique", "valueProperty": "$.user"},
    LAG_METER,
)


@dataclass(frozen=True)
class Shape:
    """A workload: how many subjects, how spread the event times, how many distinct values.

    ``live``: every event in the current minute (each lands in a reading and in one minute,
    hour and day window per series), 1,000 subjects. ``wide``: 10,000 subjects and event times
    uniform over the last 30 days, so mostly day windows (the last two hours also minute and
    hour windows): the number of distinct keys grows with subjects x days, as a user with many
    customers, or one backfilling a month, has it.
    """

    name: str
    events: int
    subjects: int
    spread_ms: int
    regions: tuple[str, ...]
    users: int


SHAPES = {
    "live": Shape("live", 200_000, 1000, 60_000, REGIONS, 200),
    "wide": Shape("wide", 1_000_000, 10_000, 30 * 86_400_000, ("eu", "us", "ap", "sa", "af"), 1000),
}


class Progress:
    """One status line on stderr, redrawn at most a few times a second."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet or not sys.stderr.isatty()
        self._last = 0.0

    def phase(self, text: str) -> None:
        now = time.monotonic()
        if not self.quiet and now - self._last > 0.2:
            self._last = now
            print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)

    def done(self, text: str) -> None:
        if self.quiet:
            print(text, file=sys.stderr, flush=True)
        else:
            print(f"\r\033[K{text}", file=sys.stderr, flush=True)


def make_events(
    n: int, subjects: int, seed: int = 1, shape: Shape = SHAPES["live"], now_ms: int | None = None
) -> list[tuple[str, bytes, str]]:
    """(subject, body, id) for n events of about 200 bytes, their times spread over the
    shape's span before ``now_ms``."""
    rng = random.Random(seed)
    out = []
    run = uuid.uuid4().hex[:8]
    if now_ms is None:
        now_ms = int(time.time() * 1000)
    regions = shape.regions
    for i in range(n):
        event_id = f"{run}-{i}"
        subject = f"customer-{rng.randrange(subjects)}"
        at = datetime.fromtimestamp((now_ms - rng.randrange(shape.spread_ms)) / 1000, UTC)
        body = {
            "id": event_id,
            "time": at.isoformat().replace("+00:00", "Z"),
            "eventType": "req",
            "subject": subject,
            "data": {
                "bytes": rng.randint(1, 10_000),
                "region": regions[i % len(regions)],
                "user": f"user-{rng.randrange(shape.users)}",
                "path": "/api/v1/things/" + "x" * 20,
            },
        }
        out.append((subject, msgspec.json.encode(body), event_id))
    return out


# (meter, subject, group value or "") of a reading; with a level and window start, a summary's
_RKey = tuple[str, str, str]
_WKey = tuple[str, str, str, str, int]


# The subject under which the bench files meter-wide rollups (summed over partitions).
ALL = "*"


class Expected:
    """Totals computed by the bench from the events it published, independently of the
    worker: every reading's value, and every summary window's that is surely kept.

    A window whose retention ends while the bench runs may or may not have been written, so
    windows within a minute of that edge (between generating the events and checking) are
    left out of the comparison on both sides.
    """

    def __init__(self, settings: Settings) -> None:
        self.readings: dict[_RKey, Any] = {}
        self.windows: dict[_WKey, Any] = {}
        self.levels = [
            (level, width, settings.summary_retention(level))
            for level, width in widths(settings.interval).items()
        ]
        self.made_at = time.time()

    def add(self, events: list[tuple[str, bytes, str]]) -> None:
        readings = self.readings
        windows = self.windows
        edges = [(level, width, self.made_at - kept - 60) for level, width, kept in self.levels]
        for subject, body, _ in events:
            event = msgspec.json.decode(body)
            data = event["data"]
            at_ms = int(datetime.fromisoformat(event["time"]).timestamp() * 1000)
            for meter, group, value in (
                ("calls", "", 1),
                ("bytes", data["region"], data["bytes"]),
                ("users", "", data["user"]),
            ):
                key = (meter, subject, group)
                targets: list[tuple[dict[Any, Any], Any]] = [(readings, key)]
                for level, width, edge in edges:
                    start = window_start(at_ms, width)
                    if start + width > edge:
                        targets.append((windows, (level, meter, subject, group, start)))
                        if meter != "users":  # meter-wide rollups (not for unique meters)
                            targets.append((windows, (level, meter, ALL, group, start)))
                for store, target in targets:
                    if meter == "users":
                        store.setdefault(target, set()).add(value)
                    else:
                        store[target] = store.get(target, 0) + value

    def _settled(self, wkey: _WKey, checked_at: float) -> bool:
        """Surely kept: its window ends more than a minute inside retention all run long."""
        for level, width, kept in self.levels:
            if level == wkey[0]:
                return wkey[4] + width > checked_at - kept + 60
        return False

    @property
    def distinct_keys(self) -> int:
        """KV keys the events make: readings, and the pages holding their windows."""
        level_widths = {level: width for level, width, _ in self.levels}
        pages = {
            (level, meter, subject, group, page_start(level_widths[level], start))
            for level, meter, subject, group, start in self.windows
            if subject != ALL
        }
        return len(self.readings) + len(pages)

    @property
    def distinct_windows(self) -> int:
        return len(self.readings) + sum(1 for w in self.windows if w[2] != ALL)

    def compare(
        self, readings: dict[_RKey, Any], windows: dict[_WKey, Any]
    ) -> tuple[bool, list[str]]:
        """Whether the stored values equal these totals, and the first few differences."""
        wrong: list[str] = []

        def value(v: Any) -> Any:
            return len(v) if isinstance(v, set) else v

        for key in readings.keys() | self.readings.keys():
            want = self.readings.get(key)
            if readings.get(key) != (None if want is None else value(want)):
                wrong.append(f"reading {key}: {readings.get(key)} != {want}")
        now = time.time()
        for wkey in windows.keys() | self.windows.keys():
            if not self._settled(wkey, now):
                continue
            want = self.windows.get(wkey)
            if windows.get(wkey) != (None if want is None else value(want)):
                wrong.append(f"window {wkey}: {windows.get(wkey)} != {want}")
        return not wrong, wrong[:5]


class Publisher:
    """Pipelined JetStream publishes: one reply subscription counts the acknowledgements."""

    def __init__(self, nc: Client, window: int = 2000) -> None:
        self.nc = nc
        self.window = window
        self.acked = 0
        self.errors = 0
        self.seqs: dict[str, int] = {}
        self._space = asyncio.Semaphore(window)
        self._done = asyncio.Event()
        self._target = 0
        self.inbox = ""

    async def start(self) -> None:
        self.inbox = self.nc.new_inbox()
        await self.nc.subscribe(self.inbox + ".*", cb=self._on_ack, pending_msgs_limit=-1)

    async def _on_ack(self, msg: Msg) -> None:
        if b'"error"' in msg.data:
            self.errors += 1
        self.acked += 1
        self._space.release()
        if self.acked >= self._target:
            self._done.set()

    async def publish_all(self, items: list[tuple[str, bytes, str]]) -> None:
        self._done.clear()
        self._target = self.acked + len(items)
        for n, (subject, body, event_id) in enumerate(items):
            await self._space.acquire()
            await self.nc.publish(
                subject, body, reply=f"{self.inbox}.{n}", headers={"Nats-Msg-Id": event_id}
            )
        await self._done.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def peak_rss_mb(pid: int) -> float:
    """A process's peak resident memory in MB (VmHWM), 0 when unknown."""
    from kloudmeter_py.worker.memtrace import proc_memory_mb

    return proc_memory_mb(pid)[1]


def _process(args: list[str], env: dict[str, str]) -> contextlib.AbstractAsyncContextManager[Any]:
    """``kloudmeter <args>`` as a child process."""
    return python_child(["-m", "kloudmeter_py", "--log-level", "warning", *args], env)


async def baseline(nc: Client, events: list[tuple[str, bytes, str]], p: Progress) -> float:
    """Raw JetStream: publish the events and consume them with a push consumer callback."""
    name = f"benchraw{uuid.uuid4().hex[:6]}"
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"]))
    received = 0
    done = asyncio.Event()
    total = len(events)

    async def on_msg(msg: Msg) -> None:
        nonlocal received
        received += 1
        if received >= total:
            done.set()

    sub = await js.subscribe(
        f"{name}.>",
        cb=on_msg,
        manual_ack=True,
        config=ConsumerConfig(
            ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, max_ack_pending=-1
        ),
        pending_msgs_limit=-1,
    )
    publisher = Publisher(nc)
    await publisher.start()
    items = [(f"{name}.e.{s}", body, i) for s, body, i in events]
    p.phase(f"baseline: publishing and consuming {total} events through raw JetStream")
    start = time.perf_counter()
    await publisher.publish_all(items)
    await done.wait()
    elapsed = time.perf_counter() - start
    await sub.unsubscribe()
    await js.delete_stream(name)
    return total / elapsed


async def _unapplied(nc: Client, stream: str) -> int:
    """Events the workers have not yet applied: their consumers' undelivered and
    unacknowledged messages, added up (-1: no consumer yet). A worker acknowledges a round
    only after its readings and its checkpoint are stored, and every partition is read by a
    consumer (the bench waits for the leases before it publishes), so 0 means final."""
    infos = await nc.jetstream().consumers_info(stream)
    ours = [c for c in infos if c.name and c.name.startswith(f"{stream}-w")]
    if not ours:
        return -1
    return sum((c.num_pending or 0) + (c.num_ack_pending or 0) for c in ours)


async def bench_nats(
    stack: contextlib.AsyncExitStack, nats_url: str | None, secured: Settings | None
) -> tuple[NatsServer | None, Settings, Client, Layout]:
    """The bench's NATS: an embedded server in a temporary directory unless ``nats_url`` is
    given (with ``secured``'s credentials), a stream of its own (``secured``'s
    METER_PARTITIONS), set up with the bench's meters; closed with ``stack``."""
    server: NatsServer | None = None
    taken: dict[str, Any] = {}  # settings taken from ``secured``
    if nats_url is None:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="kloudmeter-bench-"))
        server = await stack.enter_async_context(NatsServer(Path(tmp) / "nats"))
        nats_url = server.url
    elif secured:
        taken = _auth_settings(secured)
    if secured is not None:
        taken["partitions"] = secured.partitions
    settings = Settings(nats_url=nats_url, stream=f"bench{uuid.uuid4().hex[:6]}", **taken)
    nc = await kv_connect(nats_url, name="kloudmeter-bench", settings=settings)
    stack.push_async_callback(nc.close)
    layout = await provision(nc.jetstream(), settings)
    kv = await nc.jetstream().key_value(layout.meters_bucket)
    for body in METERS:
        meter = validate_meter(meter_in_decoder.decode(msgspec.json.encode(body)))
        await kv.put(meter.id, encoder.encode(meter))
    return server, settings, nc, layout


async def last_values_consumer(nc: Client, bucket: str) -> ConsumerInfo:
    """An ephemeral consumer of the latest value of every key of a bucket (no acks)."""
    return await nc.jetstream(timeout=30).add_consumer(
        f"KV_{bucket}",
        ConsumerConfig(
            name=f"benchread{uuid.uuid4().hex[:8]}",
            filter_subject=f"$KV.{bucket}.>",
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            inactive_threshold=30.0,
            mem_storage=True,
            num_replicas=1,
        ),
    )


async def latest_values(
    nc: Client,
    bucket: str,
    on_value: Callable[[str, bytes], None],
    settings: Settings | None = None,
) -> int:
    """Feed the latest value of every key of a bucket to ``on_value``; the number of values.

    Pulled on a lean connection in batches of 1,000 (a push consumer without flow control
    loses messages to a slow client at a million keys; nats-py's fetch is 3x slower)."""
    info = await last_values_consumer(nc, bucket)
    name = info.name
    left = info.num_pending or 0
    seen = 0
    prefix = f"$KV.{bucket}."
    url = nc.connected_url.geturl() if nc.connected_url else ""
    creds = load_credentials(settings) if settings is not None else None
    wire = await Wire.connect(url, name="kloudmeter-bench", credentials=creds)
    try:
        puller = RawPuller(wire, f"KV_{bucket}", name, 1000)
        await puller.start()
        while left > 0:
            msgs = await puller.take(left, timeout=30)
            if not msgs:
                raise TimeoutError(f"{bucket}: {left} values not delivered")
            for msg in msgs:
                if msg.data:  # (a delete marker has none)
                    on_value(msg.subject[len(prefix) :], msg.data)
                    seen += 1
            left -= len(msgs)
        await puller.stop()
    finally:
        await wire.close()
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_consumer(f"KV_{bucket}", name)
    return seen


async def stored(
    nc: Client, layout: Layout, layout_interval: int = 60, settings: Settings | None = None
) -> tuple[dict[_RKey, Any], dict[_WKey, Any]]:
    """Every reading's and every summary window's value (the bench's meters only)."""
    readings: dict[_RKey, Any] = {}
    windows: dict[_WKey, Any] = {}

    meters = {
        m.id: m
        for m in (validate_meter(meter_in_decoder.decode(msgspec.json.encode(b))) for b in METERS)
    }

    def reading(key: str, data: bytes) -> None:
        r = reading_decoder.decode(data)
        if r.meterId != "lag":
            readings[(r.meterId, r.subject, next(iter(r.groupBy.values()), None) or "")] = r.value

    await latest_values(nc, layout.readings_bucket, reading, settings)
    level_widths = widths(layout_interval)
    for level, bucket in layout.summary_buckets.items():

        def window(key: str, data: bytes, level: str = level) -> None:
            head = key.split(".", 1)[0]
            if head.endswith(ROLLUP):
                # A partition's rollup: summed over the partitions, as a meter-wide read does.
                meter = meters[head.removesuffix(ROLLUP)]
                if meter.id == "lag":
                    return
                _, _, cells = decode_cells(data)
                group = (key.split(".")[2:-1] or [""])[0]
                for start, cell in cells.items():
                    wkey = (level, meter.id, ALL, decode_token(group) or "" if group else "", start)
                    value = cell.count if meter.aggregation == "count" else cell.sum
                    windows[wkey] = windows.get(wkey, 0) + value
                return
            meter = meters[head]
            if meter.id == "lag":
                return
            for r in summary_readings(key, data, meter, level_widths[level]):
                assert r.windowStart is not None
                group = next(iter(r.groupBy.values()), None) or ""
                start = int(r.windowStart.timestamp())
                windows[(level, r.meterId, r.subject, group, start)] = r.value

        await latest_values(nc, bucket, window, settings)
    return readings, windows


def _auth_settings(settings: Settings) -> dict[str, Any]:
    return {field: getattr(settings, field) for _, field in NATS_AUTH}


def _auth_env(settings: Settings) -> dict[str, str | None]:
    return {var: getattr(settings, field) for var, field in NATS_AUTH}


def process_env(settings: Settings) -> dict[str, str]:
    """The environment of the workers and gateway a bench starts: its server, stream and
    partition count (a worker refuses a count other than its stream's), and credentials."""
    env = {
        "NATS_URL": settings.nats_url,
        "METER_NATS_STREAM": settings.stream,
        "METER_PARTITIONS": str(settings.partitions),
    }
    env.update({var: value for var, value in _auth_env(settings).items() if value})
    return env


def traced_peaks(trace_dir: str) -> list[dict[str, Any]]:
    """Each worker's memory trace line at its highest resident memory (worker.memtrace),
    highest first; a worker that wrote none is left out."""
    from kloudmeter_py.worker.memtrace import peak_line

    lines = [peak_line(path) for path in sorted(Path(trace_dir).glob("memory-*.jsonl"))]
    return sorted(
        (line for line in lines if line is not None), key=lambda line: -line.get("rss_mb", 0)
    )


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU of a process so far (Linux /proc), 0 when unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dir_bytes(path: Path | None) -> int:
    """Bytes on disk under a directory (what ``du`` counts), 0 when unknown."""
    if path is None:
        return 0
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_blocks * 512
    return total


async def kv_writes(nc: Client, layout: Layout) -> int:
    """Messages ever stored in the readings and summary buckets: one per KV write."""
    js = nc.jetstream()
    total = 0
    for bucket in (layout.readings_bucket, *layout.summary_buckets.values()):
        total += (await js.stream_info(f"KV_{bucket}")).state.last_seq
    return total


async def run(
    *,
    nats_url: str | None,
    events_n: int | None = None,
    subjects: int | None = None,
    http_seconds: float,
    lag_rate: int,
    lag_seconds: float,
    quiet: bool,
    shape: str = "live",
    secured: Settings | None = None,
    workers: int = 1,
    memory_trace: str | None = None,
) -> dict[str, Any]:
    """One bench run of a shape (``SHAPES``); ``events_n`` and ``subjects`` shrink it.
    ``workers``: worker processes sharing the partitions (each with a cache of its own).
    ``memory_trace``: a directory; the workers trace their memory into a subdirectory of it
    named after the run's stream (METER_MEMORY_TRACE, worker.memtrace), and the results
    give each worker's line at its peak (``workers_peak_at``, highest first).

    ``secured``: the NATS credentials and client certificate (``NATS_CREDS`` ...) to use with
    ``nats_url``; the worker and gateway it starts get the same settings."""
    p = Progress(quiet)
    form = SHAPES[shape]
    events_n = events_n or form.events
    subjects = subjects or form.subjects
    async with contextlib.AsyncExitStack() as stack:
        server, settings, nc, layout = await bench_nats(stack, nats_url, secured)
        data_dir = server.store_dir if server is not None else None
        nats_url = settings.nats_url
        stream = settings.stream
        p.phase("generating events")
        expected = Expected(settings)
        events = make_events(events_n, subjects, shape=form)
        expected.add(events)
        results: dict[str, Any] = {
            "shape": shape,
            "events": events_n,
            "subjects": subjects,
            "workers": workers,
        }
        results["load_avg_1m"] = round(os.getloadavg()[0], 2)
        results["baseline_events_per_s"] = round(await baseline(nc, events, p))
        p.done(f"baseline: {results['baseline_events_per_s']:,} events/s")

        env = process_env(settings)
        trace_dir = None
        if memory_trace:
            trace_dir = os.path.join(memory_trace, stream)
            env["METER_MEMORY_TRACE"] = trace_dir
            results["memory_trace_dir"] = trace_dir
        procs = [await stack.enter_async_context(_process(["worker"], env)) for _ in range(workers)]
        p.phase("end to end: waiting for the workers to share out every partition")
        share = -(-settings.partitions // workers)
        owners = min(workers, settings.partitions)
        ready_by = time.monotonic() + 60
        while time.monotonic() < ready_by:
            owned = await scan(nc.jetstream(), layout.leases_bucket, "partition.*")
            held = Counter(value for _, value in owned)
            if len(owned) == settings.partitions and len(held) == owners:
                if max(held.values()) <= share:
                    break
            await asyncio.sleep(0.1)
        server_pid = server.pid if server is not None else None
        cpu_before = [cpu_seconds(w.pid) for w in procs], cpu_seconds(server_pid)
        publisher = Publisher(nc)
        await publisher.start()
        items = [(event_subject(stream, "req", s), body, i) for s, body, i in events]
        start = time.perf_counter()
        publishing = asyncio.create_task(publisher.publish_all(items))
        # Nothing can be final before the last publish is acknowledged: no polling until then,
        # so that the bench's own requests do not slow its publisher.
        while not publishing.done():
            p.phase(f"end to end: published {publisher.acked:,}/{events_n:,}")
            await asyncio.wait({publishing}, timeout=0.25)
        published = time.perf_counter()
        while time.perf_counter() - start < 3600:
            left = await _unapplied(nc, stream)
            p.phase(f"end to end: published {events_n:,}, {left:,} to apply")
            if left == 0:
                break
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - start
        await publishing
        results["worker_cpu_s"] = round(
            sum(cpu_seconds(w.pid) - c for w, c in zip(procs, cpu_before[0], strict=True)), 2
        )
        results["nats_server_cpu_s"] = (
            round(cpu_seconds(server_pid) - cpu_before[1], 2) if server_pid else None
        )
        results["e2e_events_per_s"] = round(events_n / elapsed)
        results["e2e_settle_ms"] = round((start + elapsed - published) * 1000, 1)
        results["e2e_ratio"] = round(
            results["e2e_events_per_s"] / results["baseline_events_per_s"], 3
        )
        writes = await kv_writes(nc, layout)
        results["distinct_keys"] = expected.distinct_keys
        results["distinct_windows"] = expected.distinct_windows
        results["kv_writes_per_event"] = round(writes / events_n, 3)
        raw = (await nc.jetstream().stream_info(stream)).state.bytes
        disk = dir_bytes(data_dir)
        results["disk_bytes_per_event"] = round(disk / events_n, 1) if disk else None
        results["raw_stream_bytes_per_event"] = round(raw / events_n, 1)
        results["disk_over_raw"] = round(disk / raw, 2) if disk and raw else None
        p.phase("end to end: checking every reading and summary window")
        readings, windows = await stored(nc, layout, settings.interval, settings)
        correct, wrong = expected.compare(readings, windows)
        results["correct"] = correct and publisher.errors == 0
        if wrong:
            results["wrong"] = wrong
        p.done(
            f"end to end: {results['e2e_events_per_s']:,} events/s "
            f"(ratio {results['e2e_ratio']}), {expected.distinct_keys:,} keys, "
            f"readings and windows correct: {results['correct']}"
        )
        del events, items, expected, readings, windows

        lags = await measure_lag(nc, layout, stream, lag_rate, lag_seconds, p)
        results["lag_p50_ms"], results["lag_p99_ms"] = lags
        p.done(f"lag at {lag_rate:,} events/s: p50 {lags[0]} ms, p99 {lags[1]} ms")
        peaks = [round(peak_rss_mb(w.pid), 1) for w in procs]
        results["worker_peak_rss_mb"] = max(peaks)
        if trace_dir is not None:
            results["workers_peak_at"] = traced_peaks(trace_dir)
        if workers > 1:
            results["workers_peak_rss_mb"] = peaks

        port = _free_port()
        gateway_env = {**env, "HTTP_SERVER_PORT": str(port)}
        async with _process(["gateway"], gateway_env):
            single, batch = await measure_http(port, http_seconds, p)
        null_port = _free_port()
        async with _null_http(null_port):
            null_single, null_batch = await measure_http(null_port, http_seconds, p)
        results["http_single_events_per_s"] = single
        results["http_batch_events_per_s"] = batch
        results["http_null_single_per_s"] = null_single
        results["http_null_batch_per_s"] = null_batch
        results["http_single_ratio"] = round(single / null_single, 3) if null_single else None
        results["http_batch_ratio"] = round(batch / null_batch, 3) if null_batch else None
        p.done(
            f"HTTP ingest: single {single:,} events/s ({results['http_single_ratio']} of a "
            f"handler that only decodes), batch {batch:,} ({results['http_batch_ratio']})"
        )
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(stream)
    return results


async def null_http(port: int) -> None:
    """An aiohttp server whose ingest routes only decode the body and answer: the HTTP
    baseline the gateway's ingest is compared with."""
    decode = msgspec.json.decode

    async def single(request: web.Request) -> web.Response:
        decode(await request.read())
        return web.json_response({"duplicate": False}, status=202)

    async def batch(request: web.Request) -> web.Response:
        decode(await request.read())
        return web.Response(status=204)

    async def healthy(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application(client_max_size=8 << 20)
    app.router.add_post("/api/register-event", single)
    app.router.add_post("/api/v1/events", batch)
    app.router.add_get("/healthy", healthy)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


def _null_http(port: int) -> contextlib.AbstractAsyncContextManager[Any]:
    code = "import asyncio, sys; from kloudmeter_py.bench import null_http; "
    code += "asyncio.run(null_http(int(sys.argv[1])))"
    return python_child(["-c", code, str(port)])


async def measure_lag(
    nc: Client, layout: Layout, stream: str, rate: int, seconds: float, p: Progress
) -> tuple[float, float]:
    """Event-to-reading visibility: for each event, from its publish until a reading write
    whose lastSeq covers its stream sequence is seen on a KV watch."""
    js = nc.jetstream()
    pending: dict[str, deque[tuple[int, float]]] = {}
    lags: list[float] = []

    async def on_update(msg: Msg) -> None:
        now = time.perf_counter()
        try:
            r = reading_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        queue = pending.get(r.subject)
        while queue and queue[0][0] <= r.lastSeq:
            _, sent = queue.popleft()
            lags.append((now - sent) * 1000)

    sub = await js.subscribe(
        f"$KV.{layout.readings_bucket}.lag.>",
        cb=on_update,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.NEW,
    )
    total = int(rate * seconds)
    tick = 0.02
    per_tick = max(1, int(rate * tick))
    start = time.perf_counter()
    sent_n = 0
    while sent_n < total:
        batch = []
        for _ in range(min(per_tick, total - sent_n)):
            subject = f"host-{sent_n % 100}"
            body = msgspec.json.encode(
                {
                    "id": f"lag-{uuid.uuid4().hex}",
                    "eventType": "lag",
                    "subject": subject,
                    "data": {"sent": sent_n},
                }
            )
            batch.append((subject, body))
            sent_n += 1
        t_send = time.perf_counter()
        acks = await asyncio.gather(
            *(js.publish(event_subject(stream, "lag", s), b) for s, b in batch)
        )
        for (subject, _), ack in zip(batch, acks, strict=True):
            pending.setdefault(subject, deque()).append((ack.seq, t_send))
        p.phase(f"lag: offered {sent_n:,}/{total:,} events at {rate:,}/s")
        next_tick = start + (sent_n / rate)
        delay = next_tick - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
    deadline = time.perf_counter() + 30
    # The watch callback drains `pending`; poll it until empty or the deadline.
    while any(pending.values()) and time.perf_counter() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    await sub.unsubscribe()
    if not lags:
        return (0.0, 0.0)
    lags.sort()
    return (round(lags[len(lags) // 2], 1), round(lags[int(len(lags) * 0.99) - 1], 1))


async def measure_http(port: int, seconds: float, p: Progress) -> tuple[int, int]:
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                async with http.get(f"{base}/healthy") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        run = uuid.uuid4().hex[:8]

        async def single_client(c: int, stop: float, counter: list[int]) -> None:
            n = 0
            while time.monotonic() < stop:
                body = {
                    "id": f"h-{run}-{c}-{n}",
                    "eventType": "http",
                    "subject": f"s{c}",
                    "data": {"v": 1},
                }
                async with http.post(f"{base}/api/register-event", json=body) as r:
                    if r.status == 202:
                        counter[0] += 1
                n += 1

        async def batch_client(c: int, stop: float, counter: list[int]) -> None:
            n = 0
            while time.monotonic() < stop:
                events = [
                    {
                        "id": f"b-{run}-{c}-{n}-{i}",
                        "source": "bench",
                        "specversion": "1.0",
                        "type": "http",
                        "subject": f"s{i % 50}",
                        "data": {"v": 1},
                    }
                    for i in range(500)
                ]
                async with http.post(
                    f"{base}/api/v1/events",
                    data=msgspec.json.encode(events),
                    headers={"Content-Type": "application/cloudevents-batch+json"},
                ) as r:
                    if r.status == 204:
                        counter[0] += len(events)
                n += 1

        results = []
        for name, client, concurrency in (
            ("single-event requests", single_client, 32),
            ("batch requests", batch_client, 4),
        ):
            p.phase(f"HTTP ingest: {name} for {seconds:.0f}s")
            counter = [0]
            start = time.monotonic()
            stop = start + seconds
            await asyncio.gather(*(client(c, stop, counter) for c in range(concurrency)))
            results.append(round(counter[0] / (time.monotonic() - start)))
    return results[0], results[1]


def table(r: dict[str, Any]) -> str:
    def ratio(key: str) -> str:
        return f" ({r[key]} of the baseline)" if r.get(key) is not None else ""

    rows = [
        (
            "shape",
            f"{r['shape']}: {r['events']:,} events, {r['subjects']:,} subjects"
            + (f", {r['workers']} workers" if r.get("workers", 1) > 1 else ""),
        ),
        ("baseline (raw JetStream publish + consume)", f"{r['baseline_events_per_s']:,} events/s"),
        ("end to end (publish -> readings final)", f"{r['e2e_events_per_s']:,} events/s"),
        ("end to end / baseline", f"{r['e2e_ratio']}"),
        ("of it, last publish -> readings final", f"{r['e2e_settle_ms']} ms"),
        ("readings and summary windows correct", str(r["correct"])),
        (
            "distinct keys / KV writes per event",
            f"{r['distinct_keys']:,} / {r['kv_writes_per_event']}",
        ),
        ("CPU: worker / nats-server", f"{r['worker_cpu_s']} s / {r['nats_server_cpu_s']} s"),
        (
            "data dir per event (raw stream)",
            f"{r['disk_bytes_per_event']} B ({r['raw_stream_bytes_per_event']} B)",
        ),
        (
            "HTTP single-event requests",
            f"{r['http_single_events_per_s']:,} events/s" + ratio("http_single_ratio"),
        ),
        (
            "HTTP batch requests (500 per request)",
            f"{r['http_batch_events_per_s']:,} events/s" + ratio("http_batch_ratio"),
        ),
        ("lag p50 / p99", f"{r['lag_p50_ms']} ms / {r['lag_p99_ms']} ms"),
        ("worker peak RSS", f"{r['worker_peak_rss_mb']} MB"),
        *(
            [("peak RSS of each worker", " / ".join(f"{m} MB" for m in r["workers_peak_rss_mb"]))]
            if r.get("workers_peak_rss_mb")
            else []
        ),
        *(
            (
                "a worker at its peak (trace)",
                f"{at['t_s']} s: RSS {at['rss_mb']} MB, key cache {at['cache_mb']} MB estimated "
                f"(parked pages {at['parked_mb']}), {at['states']:,} states, "
                f"{at['pages']:,} pages, {at['readings']:,} readings",
            )
            for at in r.get("workers_peak_at", [])
        ),
    ]
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)
