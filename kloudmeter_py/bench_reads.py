"""``kloudmeter bench --reads``: the reads of issue 15 timed through real HTTP against a
gateway process, over the wide shape (times uniform over the last 30 days), beside the raw
cost of fetching as many KV entries as the biggest answer has rows, in the same run.

Every timed read is checked against row counts and value totals the bench computes from the
events it published, so a read that errs or answers wrong is reported, never timed as if it
had worked. The timed reads go only through HTTP, and the raw fetch only through the bucket
names of ``store.layout``: the key layout and the query code may change under this bench.
"""

import asyncio
import contextlib
import math
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from kloudmeter_py.bench import (
    SHAPES,
    Progress,
    Publisher,
    _auth_env,
    _free_port,
    _process,
    _unapplied,
    bench_nats,
    last_values_consumer,
    make_events,
)
from kloudmeter_py.config import Settings
from kloudmeter_py.core.keys import event_subject
from kloudmeter_py.store.credentials import load as load_credentials
from kloudmeter_py.store.layout import Layout
from kloudmeter_py.store.pull import RawPuller
from kloudmeter_py.store.wire import Wire

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
DAYS = 30
# Reads the issue lists that this bench does not set up yet (they need lifecycle events,
# duration meters and prices): named in the output so that their absence is visible.
NOT_MEASURED = ("/v1/records/{id}", "/v1/resources", "/charging")


@dataclass(frozen=True)
class Read:
    """One timed read: its name in the JSON, what it asks, and the answer it must give."""

    name: str
    label: str
    path: str
    params: tuple[tuple[str, str], ...]
    rows: int  # rows the answer must have
    total: int  # sum of the values over those rows
    csv: bool = False  # the answer is CSV (value in the last column), not a QueryResult


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def plan_reads(
    events: list[tuple[str, bytes, str]], day_from_ms: int, hour_from_ms: int, to_ms: int
) -> list[Read]:
    """The reads of the issue's table with their expected answers, computed from the events
    (UTC windows; every event time lies in [day_from_ms, to_ms))."""
    one = events[0][0]
    one_days: set[int] = set()
    one_calls = 0
    days: set[int] = set()
    day_regions: set[tuple[int, str]] = set()
    hour_regions: set[tuple[int, str]] = set()
    subject_days: set[tuple[str, int]] = set()
    subject_months: set[tuple[str, tuple[int, int]]] = set()
    total_bytes = 0
    hour_bytes = 0
    for subject, body, _ in events:
        event = msgspec.json.decode(body)
        at_ms = int(datetime.fromisoformat(event["time"]).timestamp() * 1000)
        if not day_from_ms <= at_ms < to_ms:
            raise ValueError(f"event time {event['time']} outside the reads' span")
        day = at_ms // DAY_MS
        region = event["data"]["region"]
        size = event["data"]["bytes"]
        days.add(day)
        day_regions.add((day, region))
        subject_days.add((subject, day))
        stamp = datetime.fromtimestamp(at_ms / 1000, UTC)
        subject_months.add((subject, (stamp.year, stamp.month)))
        total_bytes += size
        if subject == one:
            one_days.add(day)
            one_calls += 1
        if at_ms >= hour_from_ms:
            hour_regions.add((at_ms // HOUR_MS, region))
            hour_bytes += size
    n = len(events)
    span = (("from", _iso(day_from_ms)), ("to", _iso(to_ms)))
    by_day = ("windowSize", "DAY")
    return [
        Read(
            "one_subject_day",
            f"one subject, {DAYS} days by DAY",
            "/api/meters/calls/query",
            (*span, by_day, ("subject", one)),
            len(one_days),
            one_calls,
        ),
        Read(
            "all_subjects_day",
            f"all subjects, {DAYS} days by DAY",
            "/api/meters/calls/query",
            (*span, by_day),
            len(days),
            n,
        ),
        Read(
            "sum_by_region_day",
            f"all subjects, {DAYS} days by DAY, sum meter by region",
            "/api/meters/bytes/query",
            (*span, by_day, ("groupBy", "region")),
            len(day_regions),
            total_bytes,
        ),
        Read(
            "last_day_hour_by_region",
            "all subjects, last day by HOUR, sum meter by region",
            "/api/meters/bytes/query",
            (
                ("from", _iso(hour_from_ms)),
                ("to", _iso(to_ms)),
                ("windowSize", "HOUR"),
                ("groupBy", "region"),
            ),
            len(hour_regions),
            hour_bytes,
        ),
        Read(
            "openmeter_by_subject_day",
            f"OpenMeter /api/v1/meters/{{m}}/query?groupBy=subject, {DAYS} days by DAY",
            "/api/v1/meters/calls/query",
            (*span, by_day, ("groupBy", "subject")),
            len(subject_days),
            n,
        ),
        Read(
            "openmeter_by_subject_month",
            f"OpenMeter groupBy=subject, {DAYS} days by MONTH",
            "/api/v1/meters/calls/query",
            (*span, ("windowSize", "MONTH"), ("groupBy", "subject")),
            len(subject_months),
            n,
        ),
        Read(
            "export_month_csv",
            f"billing export, {DAYS} days by MONTH, CSV",
            "/api/meters/calls/export",
            (*span, ("windowSize", "MONTH"), ("format", "csv")),
            len(subject_months),
            n,
            csv=True,
        ),
    ]


def percentiles(samples: list[float]) -> tuple[float, float]:
    """Median and nearest-rank p99 (of 5 samples: the slowest), in the samples' unit."""
    ordered = sorted(samples)
    p99 = ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]
    return statistics.median(ordered), p99


async def time_read(
    http: aiohttp.ClientSession, base: str, read: Read, repeat: int
) -> dict[str, Any]:
    """``repeat`` timings of one read (request sent to body decoded). The first answer that is
    not a 200 with the expected rows and total stops the read and is reported instead."""
    samples: list[float] = []
    rows = -1
    error = None
    for _ in range(repeat):
        start = time.perf_counter()
        async with http.get(base + read.path, params=list(read.params)) as r:
            body = await r.read()
        elapsed = (time.perf_counter() - start) * 1000
        if r.status != 200:
            error = f"HTTP {r.status}: {body[:300].decode(errors='replace')}"
            break
        if read.csv:
            lines = body.decode().splitlines()[1:]
            rows = len(lines)
            total = sum(int(line.rsplit(",", 1)[1] or 0) for line in lines)
        else:
            data = msgspec.json.decode(body)["data"]
            rows = len(data)
            total = sum(row["value"] or 0 for row in data)
        if rows != read.rows or total != read.total:
            error = f"{rows} rows totalling {total}, expected {read.rows} totalling {read.total}"
            break
        samples.append(elapsed)
    out: dict[str, Any] = {"rows": rows, "expected_rows": read.rows}
    if error is not None:
        out["error"] = error
        out["p50_ms"] = out["p99_ms"] = None
    else:
        p50, p99 = percentiles(samples)
        out["p50_ms"], out["p99_ms"] = round(p50, 1), round(p99, 1)
    return out


async def summary_entries(nc: Client, layout: Layout) -> dict[str, int]:
    """Keys in each summary bucket (whatever they are named), largest first."""
    counts = {}
    for bucket in layout.summary_buckets.values():
        # (nats-py's StreamState has no num_subjects: the JetStream API's answer has)
        reply = await nc.request(f"$JS.API.STREAM.INFO.KV_{bucket}", b"", timeout=10)
        info = msgspec.json.decode(reply.data)
        if "error" in info:
            raise RuntimeError(f"stream info of KV_{bucket}: {info['error']}")
        counts[bucket] = int(info["state"].get("num_subjects", 0))
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


async def pull_entries(nc: Client, wire: Wire, buckets: list[str], n: int) -> int:
    """Latest values of ``n`` keys (fewer if the buckets hold fewer), bucket after bucket,
    through one ephemeral pull consumer per bucket on the lean connection, in batches of
    1,000 (as ``bench.latest_values`` reads a bucket); the entries fetched."""
    got = 0
    for bucket in buckets:
        if got >= n:
            break
        info = await last_values_consumer(nc, bucket)
        name = info.name
        try:
            left = min(info.num_pending or 0, n - got)
            puller = RawPuller(wire, f"KV_{bucket}", name, 1000)
            await puller.start()
            while left > 0:
                msgs = await puller.take(left, timeout=30)
                if not msgs:
                    raise TimeoutError(f"{bucket}: {left} values not delivered")
                got += sum(1 for m in msgs if m.data)
                left -= len(msgs)
            await puller.stop()
        finally:
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_consumer(f"KV_{bucket}", name)
    return got


async def ordered_entries(nc: Client, entries: dict[str, int], n: int) -> int:
    """The same through nats-py's ordered push consumer (flow control, no acks); ``entries``:
    the keys in each bucket, so that it knows when a bucket is exhausted."""
    got = 0
    for bucket, keys in entries.items():
        if min(keys, n - got) > 0:
            got += await _ordered_bucket(nc, bucket, min(keys, n - got))
    return got


async def _ordered_bucket(nc: Client, bucket: str, want: int) -> int:
    seen = got = 0
    done = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        nonlocal seen, got
        if seen >= want:  # (more arrive until the unsubscribe is through)
            return
        seen += 1
        if msg.data:
            got += 1
        if seen >= want:
            done.set()

    sub = await nc.jetstream(timeout=30).subscribe(
        f"$KV.{bucket}.>",
        cb=on_msg,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        pending_msgs_limit=-1,
    )
    try:
        async with asyncio.timeout(300):
            await done.wait()
    finally:
        await sub.unsubscribe()
    return got


async def time_raw(
    label: str, fetch: Callable[[], Awaitable[int]], repeat: int, p: Progress
) -> tuple[float, int]:
    samples = []
    got = 0
    for i in range(repeat):
        p.phase(f"raw fetch ({label}): {i + 1}/{repeat}")
        start = time.perf_counter()
        got = await fetch()
        samples.append((time.perf_counter() - start) * 1000)
    return round(percentiles(samples)[0], 1), got


async def _wait_healthy(http: aiohttp.ClientSession, base: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(f"{base}/healthy") as r:
                if r.status == 200:
                    return
        if time.monotonic() > deadline:
            raise TimeoutError("the gateway did not answer /healthy within 30 s")
        await asyncio.sleep(0.1)


async def run(
    *,
    nats_url: str | None,
    events_n: int | None = None,
    subjects: int | None = None,
    repeat: int = 5,
    quiet: bool,
    secured: Settings | None = None,
) -> dict[str, Any]:
    """Load the wide shape (``events_n`` and ``subjects`` shrink it) through a worker
    process, then time every read through a gateway process, and the raw fetch."""
    p = Progress(quiet)
    form = SHAPES["wide"]
    events_n = events_n or form.events
    subjects = subjects or form.subjects
    results: dict[str, Any] = {"shape": "wide", "events": events_n, "subjects": subjects}
    results["load_avg_1m"] = round(os.getloadavg()[0], 2)
    async with contextlib.AsyncExitStack() as stack:
        _, settings, nc, layout = await bench_nats(stack, nats_url, secured)
        nats_url = settings.nats_url
        stream = settings.stream

        p.phase("generating events")
        now_ms = int(time.time() * 1000)
        events = make_events(events_n, subjects, shape=form, now_ms=now_ms)
        day_from_ms = now_ms - now_ms % DAY_MS - DAYS * DAY_MS
        hour_from_ms = now_ms - now_ms % HOUR_MS - 24 * HOUR_MS

        env = {"NATS_URL": nats_url, "METER_NATS_STREAM": stream}
        env.update({var: value for var, value in _auth_env(settings).items() if value})
        worker = await stack.enter_async_context(_process(["worker"], env))
        publisher = Publisher(nc)
        await publisher.start()
        items = [(event_subject(stream, "req", s), body, i) for s, body, i in events]
        start = time.perf_counter()
        publishing = asyncio.create_task(publisher.publish_all(items))
        while not publishing.done():
            p.phase(f"loading: published {publisher.acked:,}/{events_n:,}")
            await asyncio.wait({publishing}, timeout=0.25)
        await publishing
        if publisher.errors:
            raise RuntimeError(f"{publisher.errors} events refused by the stream")
        while True:
            left = await _unapplied(nc, stream)
            p.phase(f"loading: published {events_n:,}, {left:,} to apply")
            if left == 0:
                break
            if worker.returncode is not None:
                raise RuntimeError(f"the worker exited ({worker.returncode}) with {left} to apply")
            if time.perf_counter() - start > 3600:
                raise TimeoutError(f"the worker has not applied {left} events within an hour")
            await asyncio.sleep(0.05)
        results["load_s"] = round(time.perf_counter() - start, 1)
        p.done(f"loaded: {events_n:,} events applied in {results['load_s']} s")
        del items

        read_start = time.time()
        to_ms = (int(read_start) // 60 + 1) * 60_000
        reads = plan_reads(events, day_from_ms, hour_from_ms, to_ms)
        del events
        port = _free_port()
        await stack.enter_async_context(
            _process(["gateway"], {**env, "HTTP_SERVER_PORT": str(port)})
        )
        base = f"http://127.0.0.1:{port}"
        timeout = aiohttp.ClientTimeout(total=1800)
        http = await stack.enter_async_context(aiohttp.ClientSession(timeout=timeout))
        await _wait_healthy(http, base)
        results["load_avg_1m_reads"] = round(os.getloadavg()[0], 2)
        correct = True
        for read in reads:
            p.phase(f"reads: {read.label} x{repeat}")
            measured = await time_read(http, base, read, repeat)
            for field, value in measured.items():
                results[f"{read.name}_{field}"] = value
            correct = correct and "error" not in measured
            p.done(f"{read.label}: p50 {measured['p50_ms']} ms, {measured['rows']:,} rows")
        results["reads_correct"] = correct

        # The raw baseline: as many KV entries as the biggest answer has rows, from the
        # summary buckets (largest first), whatever their keys are.
        entries = await summary_entries(nc, layout)
        results["summary_entries"] = sum(entries.values())
        buckets = list(entries)
        n = max(read.rows for read in reads)
        creds = load_credentials(settings)
        wire = await Wire.connect(nats_url, name="kloudmeter-bench", credentials=creds)
        try:
            pull_ms, got = await time_raw(
                "pull", lambda: pull_entries(nc, wire, buckets, n), repeat, p
            )
        finally:
            await wire.close()
        ordered_ms, got_ordered = await time_raw(
            "ordered", lambda: ordered_entries(nc, entries, n), repeat, p
        )
        if got_ordered != got:
            raise RuntimeError(f"raw fetch: {got} entries pulled, {got_ordered} through ordered")
        results["raw_entries"] = got
        results["raw_fetch_pull_ms"] = pull_ms
        results["raw_fetch_ordered_ms"] = ordered_ms
        results["raw_fetch_ms"] = min(pull_ms, ordered_ms)
        biggest = max(reads, key=lambda read: read.rows).name
        results["biggest_read"] = biggest
        p50 = results.get(f"{biggest}_p50_ms")
        results["biggest_over_raw"] = (
            round(p50 / results["raw_fetch_ms"], 2) if p50 and results["raw_fetch_ms"] else None
        )
        p.done(f"raw fetch of {got:,} entries: {results['raw_fetch_ms']} ms")
        results["not_measured"] = list(NOT_MEASURED)
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(stream)
    results["labels"] = {read.name: read.label for read in reads}
    return results


def table(r: dict[str, Any]) -> str:
    rows = [
        ("shape", f"wide: {r['events']:,} events, {r['subjects']:,} subjects, 30 days"),
        (
            "load average (1 min) at start / at reads",
            f"{r['load_avg_1m']} / {r['load_avg_1m_reads']}",
        ),
    ]
    for name, label in r["labels"].items():
        if r.get(f"{name}_error"):
            value = f"ERROR {r[f'{name}_error']}"
        else:
            value = (
                f"p50 {r[f'{name}_p50_ms']:,} ms, p99 {r[f'{name}_p99_ms']:,} ms, "
                f"{r[f'{name}_rows']:,} rows"
            )
        rows.append((label, value))
    rows.append(
        (
            f"raw fetch of {r['raw_entries']:,} KV entries (p50)",
            f"{r['raw_fetch_ms']:,} ms (lean pull {r['raw_fetch_pull_ms']:,} ms, "
            f"ordered consumer {r['raw_fetch_ordered_ms']:,} ms)",
        )
    )
    rows.append((f"{r['biggest_read']} / raw fetch", str(r["biggest_over_raw"])))
    rows.append(("summary entries stored", f"{r['summary_entries']:,}"))
    rows.append(("reads answered as expected", str(r["reads_correct"])))
    rows.append(("not yet measured", ", ".join(r["not_measured"])))
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)
