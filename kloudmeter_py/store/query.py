"""Run a meter query: plan it, read the needed summaries from KV, merge them."""

import asyncio
import contextlib
import gc
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import structlog
from nats.js import JetStreamContext

from kloudmeter_py.config import Settings
from kloudmeter_py.core.aggregate import AGGREGATIONS
from kloudmeter_py.core.budget import ReadBudget
from kloudmeter_py.core.models import Meter
from kloudmeter_py.core.query import PageMerge, Query, level_pages, page_filters, plan
from kloudmeter_py.core.windows import LEVELS, widths
from kloudmeter_py.store.kv import new_budget, scan, scan_lean
from kloudmeter_py.store.layout import Layout
from kloudmeter_py.store.migrate import without_rollups
from kloudmeter_py.store.wire import Wire, WireError

log = structlog.get_logger(__name__)


def horizons(settings: Settings, now: float | None = None) -> dict[str, int]:
    """Per level, the oldest window end that is still stored."""
    t = int(time.time() if now is None else now)
    return {level: t - settings.summary_retention(level) for level in LEVELS}


# Past this many key filters in one read, a subjects' query reads each subject's pages of a
# level with one filter (``<meter>.<subject>.>``) and drops the other pages when decoding.
MAX_FILTERS = 256


async def run_query(
    js: JetStreamContext,
    settings: Settings,
    meter: Meter,
    q: Query,
    budget: ReadBudget | None = None,
    wire: Wire | None = None,
) -> dict[str, Any]:
    """The query's answer, read in one server-filtered read per summary level that names
    the pages holding the windows asked (core.query.page_filters), merged page by page
    (core.query.PageMerge). Each page read and merged is a tick of ``budget`` (default: one
    of METER_READ_TIMEOUT_MS).

    Cost: an answer that does not split by subject reads the meter's rollups, one series per
    partition and group values (METER_PARTITIONS x groups x pages), whatever the number of
    subjects; one that splits by subject (``subject=``, groupBy=subject, the export) reads
    each subject's pages of the period once. Measured with ``kloudmeter bench --reads`` (see
    the README's Performance section). With ``wire`` (a lean connection), the pages are
    pulled on it in batches (store.kv.scan_lean).
    """
    if budget is None:
        budget = new_budget(settings.read_timeout_ms / 1000)
    layout = Layout(settings)
    windows, feeds = plan(q, settings.interval, horizons(settings))
    level_widths = widths(settings.interval)
    rollup = (
        not q.subjects
        and not q.by_subject
        and not AGGREGATIONS[meter.aggregation].uses_distinct
        and (meter.id, meter.startSeq) not in await without_rollups(js, layout)
    )
    with collector_paused():
        merged = PageMerge(q, meter, feeds)
        reads = []
        for level, pages in level_pages(feeds, level_widths).items():
            filters = page_filters(meter, q, pages, rollup=rollup)
            if len(filters) > MAX_FILTERS:
                filters = page_filters(meter, q, [">"], rollup=rollup)
            bucket = layout.summary_buckets[level]
            reads.append(
                (level, _pages(js, wire, bucket, filters, named=bool(q.subjects), budget=budget))
            )
        # The levels are read side by side (a MONTH up to now reads day, hour and minute
        # pages), then merged one after the other.
        started = time.perf_counter()
        found = await asyncio.gather(*(read for _, read in reads))
        read_at = time.perf_counter()
        for (level, _), pages_found in zip(reads, found, strict=True):
            for key, value in pages_found:
                await budget.tick()
                merged.add(level, key, value)
        log.debug(
            "query.read",
            meter=meter.id,
            levels=len(reads),
            keys=sum(len(f) for f in found),
            read_ms=round((read_at - started) * 1000, 1),
            merge_ms=round((time.perf_counter() - read_at) * 1000, 1),
        )
        started = time.perf_counter()
        data = await merged.result(windows, budget)
    log.debug("query.rows", rows=len(data), ms=round((time.perf_counter() - started) * 1000, 1))
    return {
        "from": q.start,
        "to": q.end,
        "windowSize": q.window_size.upper() if q.window_size else None,
        "windowTimeZone": q.tz.key,
        "data": data,
    }


_paused = 0


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused while a read builds its rows (reads may
    overlap: it resumes when the last one ends). A read allocates an object or more per
    window and row, and each full collection walks all of them: on 293,000 rows (10,000
    subjects, 30 days by DAY) merging and building the rows took 3.4 s with it, 2.0 s without.
    Nothing a read builds is cyclic: reference counting frees it all the same."""
    global _paused
    if _paused == 0:
        gc.disable()
    _paused += 1
    try:
        yield
    finally:
        _paused -= 1
        if _paused == 0:
            gc.enable()


# Up to this many filters naming keys of one subject, a read is one direct get (nats-server's
# multi_last) instead of a consumer.
DIRECT_FILTERS = 64
DIRECT_BATCH = 1000


async def _pages(
    js: JetStreamContext,
    wire: Wire | None,
    bucket: str,
    filters: list[str],
    *,
    named: bool,
    budget: ReadBudget,
) -> list[tuple[str, bytes]]:
    """The latest value of each key the filters match. Subjects' pages named by the query
    (``named``) are one direct get when they are few: a consumer's set-up is the larger cost
    there, and grows with the keys the bucket holds (one subject, 30 days: 24 ms at 1,000
    subjects, 60 ms at 10,000). Otherwise through a consumer, on ``wire`` when given."""
    if wire is None:  # (one consumer per filter, as scan_lean reads them)
        parts = [await scan(js, bucket, f, budget=budget) for f in dict.fromkeys(filters)]
        return [kv for part in parts for kv in part]
    if named and len(filters) <= DIRECT_FILTERS:
        prefix = f"$KV.{bucket}."
        try:
            got = await wire.last_values(
                f"KV_{bucket}", [prefix + f for f in filters], batch=DIRECT_BATCH
            )
        except WireError:
            pass  # a server that cannot answer so (multi_last needs 2.11): a consumer
        else:
            await budget.tick()
            if len(got) < DIRECT_BATCH:  # (as many as asked for: maybe more: a consumer)
                return [(s[len(prefix) :], v) for s, (v, _) in got.items() if v]
    # The summary buckets keep one message per key (history 1: store.provision).
    return await scan_lean(js, wire, bucket, filters, budget=budget, one_per_key=True)


def utc_now() -> datetime:
    return datetime.now(UTC)
