"""``kloudmeter bench --reads``: the reads of issue 15 timed through real HTTP against a
gateway process, over the wide shape (times uniform over the last 30 days), beside the raw
cost of fetching as many KV entries as the biggest answer has rows, in the same run; then the
lifecycle reads (``/v1/records/{id}``, ``/v1/resources?tenant=``, ``POST /charging``) over
resources of a duration meter whose lifecycle events the bench publishes after the load.

Every timed read is checked against row counts and value totals the bench computes from the
events it published (and, for the lifecycle reads, the one flat price it sets), so a read that
errs or answers wrong is reported, never timed as if it had worked. The timed reads go only
through HTTP, and the raw fetch only through the bucket names of ``store.layout``: the key
layout and the query code may change under this bench.
"""

import asyncio
import contextlib
import math
import os
import random
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
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
    _free_port,
    _process,
    _unapplied,
    bench_nats,
    last_values_consumer,
    make_events,
    process_env,
)
from kloudmeter_py.config import Settings
from kloudmeter_py.core.keys import event_subject
from kloudmeter_py.core.lifecycle import meter_pattern
from kloudmeter_py.core.models import encoder, meter_in_decoder, validate_meter
from kloudmeter_py.core.rating import PriceIn, validate_price
from kloudmeter_py.store.credentials import load as load_credentials
from kloudmeter_py.store.layout import Layout
from kloudmeter_py.store.pull import RawPuller
from kloudmeter_py.store.rating import PriceStore
from kloudmeter_py.store.wire import Wire
from kloudmeter_py.worker.lifecycle import consumer_name

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
DAYS = 30
# Reads of the issue that this bench does not time (none left): named in the output so that
# an absence would be visible.
NOT_MEASURED: tuple[str, ...] = ()

# (rows, total) of an answer's body
Counted = tuple[int, int | Decimal]


@dataclass(frozen=True)
class Read:
    """One timed read: its name in the JSON, what it asks, and the answer it must give."""

    name: str
    label: str
    path: str
    params: tuple[tuple[str, str], ...]
    rows: int  # rows the answer must have
    total: int | Decimal  # sum of the values over those rows
    csv: bool = False  # the answer is CSV (value in the last column), not a QueryResult
    method: str = "GET"
    body: bytes | None = None  # a JSON request body
    # How the body's rows and total are counted, when it is neither CSV nor a QueryResult.
    count: Callable[[bytes], Counted] | None = None


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


# ---- lifecycle reads: a duration meter, its resources' events and one price ----

LIFECYCLE_TYPE = "vm"
DURATION_METER: dict[str, Any] = {
    "id": "vm",
    "eventType": LIFECYCLE_TYPE,
    "aggregation": "duration",
    "valueProperty": "$.vcpus",
}
CURRENCY = "EUR"
HOURLY = Decimal("0.05")  # per vCPU hour
# The one price: of the meter, flat, in force throughout (no effective dates, no tiers), so a
# resource's cost is its running vCPU hours x HOURLY and its records change only with its state.
PRICE = PriceIn(
    name="bench-vcpu-hour", currency=CURRENCY, unit_price=HOURLY, meter=DURATION_METER["id"]
)
_ACTIONS = {"start": "create", "change": "resize", "stop": "power_off", "end": "delete"}
SPAN_HOURS = DAYS * 24
# (hours after the span's start, kind, vCPUs or None)
_Point = tuple[int, str, int | None]


def lifecycle_points(i: int, rng: random.Random) -> list[_Point]:
    """Resource ``i``'s lifecycle at distinct whole hours inside the span (so every quantity is
    a whole number of vCPU hours): a start with 1-4 vCPUs; for about half of the resources a
    resize to another count, then for a third a power-off, then for a fifth a delete.
    Resource 0 has all four."""
    full = i == 0
    vcpus = 1 + rng.randrange(4)
    hour = rng.randrange(SPAN_HOURS - 130)  # (three steps of at most 40 h stay inside)
    points: list[_Point] = [(hour, "start", vcpus)]
    if full or rng.random() < 1 / 2:
        hour += 1 + rng.randrange(40)
        points.append((hour, "change", vcpus % 4 + 1))
    if full or rng.random() < 1 / 3:
        hour += 1 + rng.randrange(40)
        points.append((hour, "stop", None))
    if full or rng.random() < 1 / 5:
        hour += 1 + rng.randrange(40)
        points.append((hour, "end", None))
    return points


def billed(points: list[_Point], until_hour: int) -> tuple[int, Decimal]:
    """Billing segments and cost of one resource up to ``until_hour`` (or its delete) under
    ``PRICE``: a segment from each point to the next (states and weights differ from point to
    point, so none merge), the cost its running vCPU hours x HOURLY."""
    segments = 0
    vcpu_hours = 0
    weight = 1
    running = False
    for n, (hour, kind, vcpus) in enumerate(points):
        if kind == "end":
            break
        if vcpus is not None:
            weight = vcpus
        if kind == "start":
            running = True
        elif kind == "stop":
            running = False
        end = points[n + 1][0] if n + 1 < len(points) else until_hour
        segments += 1
        if running:
            vcpu_hours += weight * (end - hour)
    return segments, HOURLY * vcpu_hours


def _count_records(body: bytes) -> Counted:
    data = msgspec.json.decode(body)
    return len(data), sum((Decimal(r["consumption"]) for r in data), Decimal(0))


def _count_resources(body: bytes) -> Counted:
    """Resources, and the cost of those not running (a running one's grows with the clock)."""
    data = msgspec.json.decode(body)
    done = (Decimal(r["consumption"]) for r in data if r["status"] != "running")
    return len(data), sum(done, Decimal(0))


def _count_charging(body: bytes) -> Counted:
    data = msgspec.json.decode(body)
    return len(data["items"]), sum((Decimal(v) for v in data["totals"].values()), Decimal(0))


@dataclass(frozen=True)
class LifecyclePlan:
    events: list[tuple[str, bytes, str]]  # (subject, body, id), as make_events gives them
    resources: int
    reads: list[Read]


def plan_lifecycle(resources: int, subjects: int, day_from_ms: int, seed: int = 2) -> LifecyclePlan:
    """Lifecycle events of ``resources`` resources (resource ``i``, ``vm-<i>``, of subject
    ``customer-<i % subjects>``, as make_events names subjects) over the span
    ``[day_from_ms, day_from_ms + DAYS days)``, and the three lifecycle reads with their
    expected answers: the records of ``vm-0`` (deleted: its records no longer grow), the
    resources of ``customer-0`` (the cost of those not running), and the charging of
    ``customer-0`` over the span (which ends before the reads, so running resources are
    charged up to its end)."""
    if resources < 1:
        raise ValueError("at least one resource")
    rng = random.Random(seed)
    run_id = uuid.uuid4().hex[:8]
    regions = SHAPES["wide"].regions
    tenant = "customer-0"
    events: list[tuple[str, bytes, str]] = []
    records: tuple[int, Decimal] | None = None
    tenant_resources = 0
    not_running_cost = Decimal(0)
    charged = Decimal(0)
    for i in range(resources):
        subject = f"customer-{i % subjects}"
        points = lifecycle_points(i, rng)
        for n, (hour, kind, vcpus) in enumerate(points):
            data: dict[str, Any] = {
                "event_type": _ACTIONS[kind],
                "resource_id": f"vm-{i}",
                "resource_type": "instance",
                "region": regions[i % len(regions)],
            }
            if vcpus is not None:
                data["vcpus"] = vcpus
            at = datetime.fromtimestamp((day_from_ms + hour * HOUR_MS) / 1000, UTC)
            event_id = f"{run_id}-vm-{i}-{n}"
            body = {
                "id": event_id,
                "time": at.isoformat().replace("+00:00", "Z"),
                "eventType": LIFECYCLE_TYPE,
                "subject": subject,
                "data": data,
            }
            events.append((subject, msgspec.json.encode(body), event_id))
        if i == 0:
            records = billed(points, SPAN_HOURS)
        if subject == tenant:
            tenant_resources += 1
            charged += billed(points, SPAN_HOURS)[1]
            if points[-1][1] in ("stop", "end"):
                not_running_cost += billed(points, SPAN_HOURS)[1]
    assert records is not None
    charging = {
        "tenant": tenant,
        "start": _iso(day_from_ms),
        "end": _iso(day_from_ms + DAYS * DAY_MS),
    }
    reads = [
        Read(
            "records_one_resource",
            "/v1/records/{id}: one resource's billing segments",
            "/v1/records/vm-0",
            (),
            records[0],
            records[1],
            count=_count_records,
        ),
        Read(
            "resources_one_tenant",
            f"/v1/resources?tenant=: one tenant's resources ({tenant_resources:,})",
            "/v1/resources",
            (("tenant", tenant),),
            tenant_resources,
            not_running_cost,
            count=_count_resources,
        ),
        Read(
            "charging_one_tenant_month",
            f"POST /charging: one tenant, {DAYS} days",
            "/charging",
            (),
            tenant_resources,  # one item per resource: each ran under the one price
            charged,
            method="POST",
            body=msgspec.json.encode(charging),
            count=_count_charging,
        ),
    ]
    return LifecyclePlan(events, resources, reads)


async def setup_lifecycle(nc: Client, layout: Layout) -> None:
    """The duration meter, written to the meters bucket as ``bench.bench_nats`` writes the
    bench's other meters (before the worker starts), and its price in the price book."""
    kv = await nc.jetstream().key_value(layout.meters_bucket)
    meter = validate_meter(meter_in_decoder.decode(msgspec.json.encode(DURATION_METER)))
    await kv.put(meter.id, encoder.encode(meter))
    validate_price(PRICE)
    await PriceStore(nc.jetstream(), layout).create(PRICE)


async def resource_keys(nc: Client, layout: Layout) -> int:
    """Keys of the duration meter's resources in the ``resources`` bucket."""
    bucket = layout.resources_bucket
    pattern = meter_pattern(DURATION_METER["id"])
    request = msgspec.json.encode({"subjects_filter": f"$KV.{bucket}.{pattern}"})
    reply = await nc.request(f"$JS.API.STREAM.INFO.KV_{bucket}", request, timeout=10)
    info = msgspec.json.decode(reply.data)
    if "error" in info:
        raise RuntimeError(f"stream info of KV_{bucket}: {info['error']}")
    return len(info["state"].get("subjects") or {})


async def lifecycle_unfolded(nc: Client, stream: str, layout: Layout, resources: int) -> str:
    """Why the published lifecycle events are not all folded yet ("" when they are): the
    meter's event type has a consumer with nothing pending or unacknowledged (the worker
    acknowledges a batch after writing its keys), no history read is running, and the bucket
    holds a key for each resource."""
    infos = {c.name: c for c in await nc.jetstream().consumers_info(stream)}
    if any(name and name.startswith("lifecycle-read-") for name in infos):
        return "a history read is running"
    info = infos.get(consumer_name(LIFECYCLE_TYPE))
    if info is None:
        return "no lifecycle consumer yet"
    left = (info.num_pending or 0) + (info.num_ack_pending or 0)
    if left:
        return f"{left:,} lifecycle events to fold"
    keys = await resource_keys(nc, layout)
    if keys != resources:
        return f"{keys:,}/{resources:,} resources folded"
    return ""


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
    total: int | Decimal = -1
    error = None
    headers = {"Content-Type": "application/json"} if read.body is not None else None
    for _ in range(repeat):
        start = time.perf_counter()
        async with http.request(
            read.method,
            base + read.path,
            params=list(read.params),
            data=read.body,
            headers=headers,
        ) as r:
            body = await r.read()
        elapsed = (time.perf_counter() - start) * 1000
        if r.status != 200:
            error = f"HTTP {r.status}: {body[:300].decode(errors='replace')}"
            break
        try:
            rows, total = _count(read, body)
        except (msgspec.DecodeError, ValueError, KeyError, TypeError, ArithmeticError) as exc:
            error = f"unexpected answer ({exc!r}): {body[:300].decode(errors='replace')}"
            break
        if rows != read.rows or total != read.total:
            error = f"{rows} rows totalling {total}, expected {read.rows} totalling {read.total}"
            break
        samples.append(elapsed)
    out: dict[str, Any] = {
        "rows": rows,
        "expected_rows": read.rows,
        # (money as a string, as the API gives it)
        "total": str(total) if isinstance(total, Decimal) else total,
        "expected_total": str(read.total) if isinstance(read.total, Decimal) else read.total,
    }
    if error is not None:
        out["error"] = error
        out["p50_ms"] = out["p99_ms"] = None
    else:
        p50, p99 = percentiles(samples)
        out["p50_ms"], out["p99_ms"] = round(p50, 1), round(p99, 1)
    return out


def _count(read: Read, body: bytes) -> Counted:
    if read.count is not None:
        return read.count(body)
    if read.csv:
        lines = body.decode().splitlines()[1:]
        return len(lines), sum(int(line.rsplit(",", 1)[1] or 0) for line in lines)
    data = msgspec.json.decode(body)["data"]
    return len(data), sum(row["value"] or 0 for row in data)


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
    resources: int = 10_000,
    repeat: int = 5,
    quiet: bool,
    secured: Settings | None = None,
) -> dict[str, Any]:
    """Load the wide shape (``events_n`` and ``subjects`` shrink it) through a worker
    process, then time every read through a gateway process, and the raw fetch; then publish
    the lifecycle events of ``resources`` resources, wait until the worker has folded them,
    and time the lifecycle reads through the same gateway."""
    p = Progress(quiet)
    form = SHAPES["wide"]
    events_n = events_n or form.events
    subjects = subjects or form.subjects
    if resources < 1:
        raise ValueError("resources must be positive")
    results: dict[str, Any] = {
        "shape": "wide",
        "events": events_n,
        "subjects": subjects,
        "resources": resources,
    }
    results["load_avg_1m"] = round(os.getloadavg()[0], 2)
    async with contextlib.AsyncExitStack() as stack:
        _, settings, nc, layout = await bench_nats(stack, nats_url, secured)
        nats_url = settings.nats_url
        stream = settings.stream
        await setup_lifecycle(nc, layout)

        p.phase("generating events")
        now_ms = int(time.time() * 1000)
        events = make_events(events_n, subjects, shape=form, now_ms=now_ms)
        day_from_ms = now_ms - now_ms % DAY_MS - DAYS * DAY_MS
        hour_from_ms = now_ms - now_ms % HOUR_MS - 24 * HOUR_MS

        env = process_env(settings)
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

        # The lifecycle reads: events of the resources over the same span, folded by the
        # same worker, read through the same gateway.
        plan = plan_lifecycle(resources, subjects, day_from_ms)
        results["lifecycle_events"] = len(plan.events)
        items = [(event_subject(stream, LIFECYCLE_TYPE, s), b, i) for s, b, i in plan.events]
        start = time.perf_counter()
        await publisher.publish_all(items)
        if publisher.errors:
            raise RuntimeError(f"{publisher.errors} events refused by the stream")
        while why := await lifecycle_unfolded(nc, stream, layout, resources):
            p.phase(f"lifecycle: {len(items):,} events published, {why}")
            if worker.returncode is not None:
                raise RuntimeError(f"the worker exited ({worker.returncode}): {why}")
            if time.perf_counter() - start > 3600:
                raise TimeoutError(f"lifecycle events not folded within an hour: {why}")
            await asyncio.sleep(0.05)
        results["lifecycle_fold_s"] = round(time.perf_counter() - start, 1)
        p.done(
            f"lifecycle: {len(items):,} events of {resources:,} resources published and "
            f"folded in {results['lifecycle_fold_s']} s"
        )
        del items
        for read in plan.reads:
            p.phase(f"reads: {read.label} x{repeat}")
            measured = await time_read(http, base, read, repeat)
            for field, value in measured.items():
                results[f"{read.name}_{field}"] = value
            correct = correct and "error" not in measured
            p.done(f"{read.label}: p50 {measured['p50_ms']} ms, {measured['rows']:,} rows")
        results["reads_correct"] = correct
        results["not_measured"] = list(NOT_MEASURED)
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(stream)
    results["labels"] = {read.name: read.label for read in (*reads, *plan.reads)}
    return results


def table(r: dict[str, Any]) -> str:
    rows = [
        ("shape", f"wide: {r['events']:,} events, {r['subjects']:,} subjects, 30 days"),
        (
            "lifecycle (duration meter)",
            f"{r['resources']:,} resources, {r['lifecycle_events']:,} events, "
            f"folded in {r['lifecycle_fold_s']} s",
        ),
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
    rows.append(("not yet measured", ", ".join(r["not_measured"]) or "-"))
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)
