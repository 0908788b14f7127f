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
from collections import deque
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig

from kloudmeter_py.config import Settings
from kloudmeter_py.core.keys import event_subject
from kloudmeter_py.core.models import encoder, meter_in_decoder, reading_decoder, validate_meter
from kloudmeter_py.store.kv import scan
from kloudmeter_py.store.layout import Layout
from kloudmeter_py.store.provision import provision
from kloudmeter_py.store.server import NatsServer, die_with_parent, stop_process

REGIONS = ("eu", "us", "ap")
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
    {"id": "lag", "eventType": "lag", "aggregation": "latest", "valueProperty": "$.sent"},
)


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


def make_events(n: int, subjects: int, seed: int = 1) -> list[tuple[str, bytes, str]]:
    """(subject, body, id) for n events of about 200 bytes, timed within the last minute, so
    that each lands in a reading and in a minute, an hour and a day summary, as live usage
    does."""
    rng = random.Random(seed)
    out = []
    run = uuid.uuid4().hex[:8]
    now_ms = int(time.time() * 1000)
    for i in range(n):
        event_id = f"{run}-{i}"
        subject = f"customer-{rng.randrange(subjects)}"
        at = datetime.fromtimestamp((now_ms - rng.randrange(60_000)) / 1000, UTC)
        body = {
            "id": event_id,
            "time": at.isoformat().replace("+00:00", "Z"),
            "eventType": "req",
            "subject": subject,
            "data": {
                "bytes": rng.randint(1, 10_000),
                "region": REGIONS[i % 3],
                "user": f"user-{rng.randrange(200)}",
                "path": "/api/v1/things/" + "x" * 20,
            },
        }
        out.append((subject, msgspec.json.encode(body), event_id))
    return out


def expected_readings(events: list[tuple[str, bytes, str]]) -> dict[tuple[str, str, str], Any]:
    counts: dict[str, int] = {}
    sums: dict[tuple[str, str], int] = {}
    users: dict[str, set[str]] = {}
    for subject, body, _ in events:
        data = msgspec.json.decode(body)["data"]
        counts[subject] = counts.get(subject, 0) + 1
        sums[(subject, data["region"])] = sums.get((subject, data["region"]), 0) + data["bytes"]
        users.setdefault(subject, set()).add(data["user"])
    out: dict[tuple[str, str, str], Any] = {}
    for s, c in counts.items():
        out[("calls", s, "")] = c
        out[("users", s, "")] = len(users[s])
    for (s, r), v in sums.items():
        out[("bytes", s, r)] = v
    return out


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
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@contextlib.asynccontextmanager
async def _process(args: list[str], env: dict[str, str]) -> AsyncIterator[Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kloudmeter_py",
        "--log-level",
        "warning",
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    try:
        yield proc
    finally:
        await stop_process(proc)


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
    """Events the worker has not yet applied: its consumer's undelivered and unacknowledged
    messages. The worker acknowledges a round only after its readings and its checkpoint are
    stored, so 0 (from its one consumer, unfiltered: it owns every partition) means final."""
    infos = await nc.jetstream().consumers_info(stream)
    ours = [c for c in infos if c.name and c.name.startswith(f"{stream}-w")]
    if len(ours) != 1 or ours[0].config.filter_subject or ours[0].config.filter_subjects:
        return -1
    return (ours[0].num_pending or 0) + (ours[0].num_ack_pending or 0)


async def _readings(nc: Client, layout: Layout) -> dict[tuple[str, str, str], Any]:
    out: dict[tuple[str, str, str], Any] = {}
    for _, value in await scan(nc.jetstream(timeout=30), layout.readings_bucket, ">"):
        r = reading_decoder.decode(value)
        if r.meterId == "lag":
            continue
        group = next(iter(r.groupBy.values()), None) or ""
        out[(r.meterId, r.subject, group)] = r.value
    return out


async def run(
    *,
    nats_url: str | None,
    events_n: int,
    subjects: int,
    http_seconds: float,
    lag_rate: int,
    lag_seconds: float,
    quiet: bool,
) -> dict[str, Any]:
    p = Progress(quiet)
    async with contextlib.AsyncExitStack() as stack:
        if nats_url is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="kloudmeter-bench-"))
            server = await stack.enter_async_context(NatsServer(Path(tmp) / "nats"))
            nats_url = server.url
        nc = await nats.connect(nats_url)
        stack.push_async_callback(nc.close)
        stream = f"bench{uuid.uuid4().hex[:6]}"
        settings = Settings(nats_url=nats_url, stream=stream)
        layout = await provision(nc.jetstream(), settings)
        kv = await nc.jetstream().key_value(layout.meters_bucket)
        for body in METERS:
            meter = validate_meter(meter_in_decoder.decode(msgspec.json.encode(body)))
            await kv.put(meter.id, encoder.encode(meter))
        p.phase("generating events")
        events = make_events(events_n, subjects)
        results: dict[str, Any] = {"events": events_n, "subjects": subjects}
        results["baseline_events_per_s"] = round(await baseline(nc, events, p))
        p.done(f"baseline: {results['baseline_events_per_s']:,} events/s")

        env = {"NATS_URL": nats_url, "METER_NATS_STREAM": stream}
        worker = await stack.enter_async_context(_process(["worker"], env))
        p.phase("end to end: waiting for the worker to own every partition")
        ready_by = time.monotonic() + 60
        while time.monotonic() < ready_by:
            owned = await scan(nc.jetstream(), layout.leases_bucket, "partition.*")
            if len(owned) == settings.partitions:
                break
            await asyncio.sleep(0.1)
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
        while time.perf_counter() - start < 600:
            left = await _unapplied(nc, stream)
            p.phase(f"end to end: published {events_n:,}, {left:,} to apply")
            if left == 0:
                break
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - start
        await publishing
        readings = await _readings(nc, layout)
        results["e2e_events_per_s"] = round(events_n / elapsed)
        results["e2e_ratio"] = round(
            results["e2e_events_per_s"] / results["baseline_events_per_s"], 3
        )
        results["correct"] = readings == expected_readings(events) and publisher.errors == 0
        p.done(
            f"end to end: {results['e2e_events_per_s']:,} events/s "
            f"(ratio {results['e2e_ratio']}), readings correct: {results['correct']}"
        )

        lags = await measure_lag(nc, layout, stream, lag_rate, lag_seconds, p)
        results["lag_p50_ms"], results["lag_p99_ms"] = lags
        p.done(f"lag at {lag_rate:,} events/s: p50 {lags[0]} ms, p99 {lags[1]} ms")
        results["worker_peak_rss_mb"] = round(peak_rss_mb(worker.pid), 1)

        port = _free_port()
        gateway_env = {**env, "HTTP_SERVER_PORT": str(port)}
        async with _process(["gateway"], gateway_env):
            single, batch = await measure_http(port, http_seconds, p)
        results["http_single_events_per_s"] = single
        results["http_batch_events_per_s"] = batch
        p.done(f"HTTP ingest: single {single:,} events/s, batch {batch:,} events/s")
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(stream)
    return results


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
    rows = [
        ("baseline (raw JetStream publish + consume)", f"{r['baseline_events_per_s']:,} events/s"),
        ("end to end (publish -> readings final)", f"{r['e2e_events_per_s']:,} events/s"),
        ("end to end / baseline", f"{r['e2e_ratio']}"),
        ("readings correct", str(r["correct"])),
        ("HTTP single-event requests", f"{r['http_single_events_per_s']:,} events/s"),
        ("HTTP batch requests (500 per request)", f"{r['http_batch_events_per_s']:,} events/s"),
        ("lag p50 / p99", f"{r['lag_p50_ms']} ms / {r['lag_p99_ms']} ms"),
        ("worker peak RSS", f"{r['worker_peak_rss_mb']} MB"),
    ]
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)
