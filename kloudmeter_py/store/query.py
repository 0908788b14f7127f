"""Run a meter query: plan it, read the needed summaries from KV, merge them."""

import time
from datetime import UTC, datetime
from typing import Any

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
from kloudmeter_py.store.wire import Wire


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
    merged = PageMerge(q, meter, feeds)
    for level, pages in level_pages(feeds, level_widths).items():
        filters = page_filters(meter, q, pages, rollup=rollup)
        if len(filters) > MAX_FILTERS:
            filters = page_filters(meter, q, [">"], rollup=rollup)
        bucket = layout.summary_buckets[level]
        if wire is not None:
            found = await scan_lean(js, wire, bucket, filters, budget=budget)
        else:
            found = await scan(js, bucket, filters, budget=budget)
        for key, value in found:
            await budget.tick()
            merged.add(level, key, value)
    data = await merged.result(windows, budget)
    return {
        "from": q.start,
        "to": q.end,
        "windowSize": q.window_size.upper() if q.window_size else None,
        "windowTimeZone": q.tz.key,
        "data": data,
    }


def utc_now() -> datetime:
    return datetime.now(UTC)
