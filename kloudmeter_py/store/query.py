"""Run a meter query: plan it, read the needed summaries from KV, merge them."""

import time
from datetime import UTC, datetime
from typing import Any

from nats.js import JetStreamContext

from kloudmeter_py.config import Settings
from kloudmeter_py.core.budget import ReadBudget
from kloudmeter_py.core.keys import encode_token
from kloudmeter_py.core.models import Meter, Reading
from kloudmeter_py.core.query import Query, merge_rows, plan
from kloudmeter_py.core.summaries import summary_readings
from kloudmeter_py.core.windows import LEVELS, widths
from kloudmeter_py.store.kv import new_budget, scan
from kloudmeter_py.store.layout import Layout


def horizons(settings: Settings, now: float | None = None) -> dict[str, int]:
    """Per level, the oldest window end that is still stored."""
    t = int(time.time() if now is None else now)
    return {level: t - settings.summary_retention(level) for level in LEVELS}


async def run_query(
    js: JetStreamContext,
    settings: Settings,
    meter: Meter,
    q: Query,
    budget: ReadBudget | None = None,
) -> dict[str, Any]:
    """The query's answer; every summary read and merged is a tick of ``budget`` (default: one
    of METER_READ_TIMEOUT_MS)."""
    if budget is None:
        budget = new_budget(settings.read_timeout_ms / 1000)
    layout = Layout(settings)
    windows, feeds = plan(q, settings.interval, horizons(settings))
    levels = sorted({level for level, _ in feeds}, key=LEVELS.index)
    m = encode_token(meter.id)
    tail = ".".join(["*"] * (len(meter.groupBy) + 1))
    if q.subjects:
        patterns = [f"{m}.{encode_token(s)}.{tail}" for s in q.subjects]
    else:
        patterns = [f"{m}.>"]
    summaries: list[tuple[str, Reading]] = []
    level_widths = widths(settings.interval)
    for level in levels:
        starts = {start for lv, start in feeds if lv == level}
        lo, hi = min(starts), max(starts) + level_widths[level]
        for pattern in patterns:
            for key, value in await scan(js, layout.summary_buckets[level], pattern, budget=budget):
                await budget.tick()
                for s in summary_readings(key, value, meter, level_widths[level]):
                    if s.windowStart is not None and lo <= s.windowStart.timestamp() < hi:
                        summaries.append((level, s))
    data = await merge_rows(q, meter, windows, feeds, summaries, budget)
    return {
        "from": q.start,
        "to": q.end,
        "windowSize": q.window_size.upper() if q.window_size else None,
        "windowTimeZone": q.tz.key,
        "data": data,
    }


def utc_now() -> datetime:
    return datetime.now(UTC)
