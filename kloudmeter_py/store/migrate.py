"""Bring the summary buckets of an earlier layout to the current one, at ``setup``.

Layout 1 stored one key per window (``<series>.<YYYYMMDDTHHMMSSZ>``); layout 2 stores pages
of windows (``<series>.<page>``, see core.summaries). ``setup`` folds every layout 1 window
into its page and removes the window key. Layout 3 adds meter-wide rollups (see
``migrate_summaries``). ``setup`` then records ``layout = 3`` in the offsets bucket so later
starts skip the scan. Stop the workers of the older version before upgrading: a window they
write after the migration would not be moved.

Moving a window keeps what makes a replay exact: the page's ``lastSeq`` is the highest of its
windows', so events between the checkpoint and a window's ``lastSeq`` (a crash after a flush,
before the checkpoint) are still skipped. The move is idempotent: a window whose start a page
already holds is not added again (an interrupted migration run twice counts nothing twice).
"""

import msgspec
import structlog
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from kloudmeter_py.core.summaries import (
    PageState,
    decode_page,
    decode_window,
    encode_page,
    is_page_token,
    page_token,
)
from kloudmeter_py.core.windows import parse_window_token, widths
from kloudmeter_py.store.kv import get_with_revision, scan
from kloudmeter_py.store.layout import Layout
from kloudmeter_py.store.meters import MeterStore

log = structlog.get_logger(__name__)

LAYOUT_KEY = "layout"
LAYOUT = 3
# Meters (id, startSeq) that existed before rollups (layout 3): their rollups miss the events
# folded before, so their meter-wide reads read the subjects' pages.
NO_ROLLUP_KEY = "norollup"
_pairs = msgspec.json.Decoder(list[tuple[str, int]])


async def migrate_summaries(js: JetStreamContext, layout: Layout, interval: int) -> int:
    """Bring the summaries to layout 3; the number of layout 1 windows moved into pages."""
    offsets = await js.key_value(layout.offsets_bucket)
    have, _ = await get_with_revision(offsets, LAYOUT_KEY)
    if have is not None and int(have) >= LAYOUT:
        return 0
    moved = 0 if have is not None and int(have) >= 2 else await _pages(js, layout, interval)
    # Layout 3 adds meter-wide rollups (core.keys.rollup_key), written by the worker from
    # now on. They cannot be rebuilt exactly from the subjects' pages (a page may hold
    # events past its partition's checkpoint after a crash), so the meters already here go
    # on being read from their subjects' pages; re-creating such a meter (and backfilling)
    # gives it rollups.
    meters = await MeterStore(js, layout).list()
    without = sorted((m.id, m.startSeq) for m in meters)
    await offsets.put(NO_ROLLUP_KEY, msgspec.json.encode(without))
    if without:
        log.info("setup.rollups_from_now", meters=len(without))
    await offsets.put(LAYOUT_KEY, str(LAYOUT).encode())
    return moved


async def without_rollups(js: JetStreamContext, layout: Layout) -> set[tuple[str, int]]:
    """(meter id, startSeq) of the meters whose rollups are incomplete (see above)."""
    offsets = await js.key_value(layout.offsets_bucket)
    value, _ = await get_with_revision(offsets, NO_ROLLUP_KEY)
    return set(_pairs.decode(value)) if value else set()


async def _pages(js: JetStreamContext, layout: Layout, interval: int) -> int:
    """Fold layout 1 window keys into pages; the number of windows moved."""
    level_widths = widths(interval)
    moved = 0
    for level, bucket in layout.summary_buckets.items():
        width = level_widths[level]
        kv = await js.key_value(bucket)
        pages: dict[str, list[tuple[str, bytes, int]]] = {}
        for key, value in await scan(js, bucket):
            series, _, token = key.rpartition(".")
            if is_page_token(token):
                continue
            start = parse_window_token(token)
            pages.setdefault(f"{series}.{page_token(width, start)}", []).append((key, value, start))
        for page_key, windows in pages.items():
            moved += await _move(kv, page_key, windows)
            for key, _, _ in windows:
                await kv.purge(key)
        if pages:
            log.info("setup.summaries_migrated", bucket=bucket, pages=len(pages))
    return moved


async def _move(kv: KeyValue, page_key: str, windows: list[tuple[str, bytes, int]]) -> int:
    """Add the windows to their page (compare-and-set); how many were added."""
    for _ in range(10):
        value, revision = await get_with_revision(kv, page_key)
        page = decode_page(value) if value is not None else PageState({}, 0, -1)
        states = [(decode_window(data), start) for _, data, start in windows]
        # One meter generation per page: the newest among what is stored (readers ignore
        # windows of an earlier generation of the same meter id anyway).
        generation = max([page.meter_start_seq] + [w.meter_start_seq for w, _ in states])
        if page.meter_start_seq != generation:
            page = PageState({}, 0, generation)
        added = 0
        replayed = set(page.replayed or ())
        for w, start in states:
            if w.meter_start_seq != generation or start in page.windows:
                continue
            page.windows[start] = w.acc
            page.last_seq = max(page.last_seq, w.last_seq)
            replayed.update(w.replayed or ())
            added += 1
        if not added:
            return 0
        body = encode_page(page.windows, page.last_seq, generation, sorted(replayed) or None)
        try:
            if revision:
                await kv.update(page_key, body, last=revision)
            else:
                await kv.create(page_key, body)
        except KeyWrongLastSequenceError:
            continue
        return added
    raise RuntimeError(f"setup: could not write summary page {page_key!r}: it kept changing")
