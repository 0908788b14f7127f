"""The store step of a runner (worker.runner): a round's keys loaded, the round applied to
them, and stored; and, at a flush or spill, what earlier rounds deferred.

1. ``write``: the round's keys (worker.round.Round.work) in chunks of one bucket, side by
   side (``write_chunk``): the keys held are taken back from the cache (worker.keystore) and
   applied first, the others read in one multi-get and applied as they come
   (core.plan.apply); each is encoded at once and parked or packed again.
2. A reading is stored with its round, or deferred to the flush under a backlog; a page is
   deferred to the flush (``dirty`` and ``dirty_pages``, the key strings the key store
   holds). With METER_SUMMARY_FLUSH_MS 0 nothing is deferred (``defer``).
   What is stored goes in atomic batches, compare-and-set on each key's revision; a key
   whose write lost is read again and applied again (a further pass of ``write``), unless it
   was deferred: then the runner starts again from its checkpoints (Restart).
3. ``write_dirty``: at a flush (before the checkpoint) or a spill, every deferred key, each
   encoded as its turn to be sent comes.
4. ``dead_letter``: the events no meter could use, published before the checkpoint.

Nothing here acknowledges a message or writes a checkpoint: the runner does, once this has
stored everything they cover.
"""

import asyncio
from collections.abc import Coroutine, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
from nats.js.errors import KeyWrongLastSequenceError

from kloudmeter_py.core.keys import encode_token, reading_series
from kloudmeter_py.core.meters import CompiledMeter, to_reading
from kloudmeter_py.core.models import encoder
from kloudmeter_py.core.plan import (
    CLOSED,
    KeyState,
    WKey,
    apply,
    close_page,
    empty_state,
    freeze,
    mark_dirty,
    mark_dirty_page,
    thaw,
)
from kloudmeter_py.core.summaries import encode_page
from kloudmeter_py.worker.fold import Folder
from kloudmeter_py.worker.keystore import CHUNK, KeyStore, Write
from kloudmeter_py.worker.round import Dead, Restart, Round

if TYPE_CHECKING:
    from kloudmeter_py.worker import Worker

# Multi-get requests (up to 1,000 keys each) a runner keeps open at once.
_LOADS_IN_FLIGHT = 4
# Flush chunks stored at once (each of up to CHUNK keys of one bucket): 8, the atomic batches a
# bucket has in flight (keystore.BATCHES_IN_FLIGHT). At 16, a flush of ~25,000 readings (the
# wide bench shape at 10,000 subjects) held 16,000 encoded at once, half of them waiting for a
# batch slot, and each such flush or spill raised a worker's peak RSS by 3-6 MB between two
# samples. 4 was measured and not kept, when each write waiting in a chunk still held
# ~300-400 bytes of small objects: at 10,000 subjects the peaks moved within their spread
# (87.5-92.1 MB a worker against 89.2-93.7, three runs each), and the live shape's went up
# (83.0-92.8 MB against 80.3-86.3; end to end 0.572-0.613 against 0.595-0.643). Since 29ff72f
# a chunk's writes are made as they are sent (KeyStore.store_chunk), so a chunk in flight
# holds little more than its keys (README, Performance).
_FLUSHES_IN_FLIGHT = 8
_T = TypeVar("_T")


def _chunks(keys: list[tuple[int, str]]) -> list[list[tuple[int, str]]]:
    """The keys in chunks of up to CHUNK of one bucket each, in order."""
    by_store: dict[int, list[tuple[int, str]]] = {}
    for wkey in keys:
        by_store.setdefault(wkey[0], []).append(wkey)
    return [
        names[i : i + CHUNK] for names in by_store.values() for i in range(0, len(names), CHUNK)
    ]


def _in_turn(by_store: dict[int, list[str]]) -> list[tuple[int, list[str]]]:
    """Each bucket's keys in chunks of up to CHUNK, the buckets taken in turn."""
    chunks = [
        (n, store, names[i : i + CHUNK])
        for store, names in by_store.items()
        for n, i in enumerate(range(0, len(names), CHUNK))
    ]
    chunks.sort(key=lambda c: c[0])  # (stable: the buckets keep their order in each turn)
    return [(store, names) for _, store, names in chunks]


async def _all(coros: Iterable[Coroutine[Any, Any, _T]]) -> list[_T]:
    """Run side by side; the first failure cancels the rest and is raised as itself."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coros]
    except BaseExceptionGroup as eg:
        raise eg.exceptions[0] from None
    return [t.result() for t in tasks]


def _clean_header(text: str) -> str:
    return " ".join(text.split())[:500]


class Writer:
    """Loads, applies and stores a runner's rounds, and holds what they deferred to the flush
    (the steps in this module's docstring)."""

    def __init__(
        self, worker: "Worker", keys: KeyStore, folder: Folder, log: structlog.BoundLogger
    ) -> None:
        self.w = worker
        self.keys = keys
        self.folder = folder
        self.log = log
        self.settings = worker.settings
        self.layout = worker.layout
        # Summaries are written at the flush, with the checkpoint (METER_SUMMARY_FLUSH_MS 0:
        # with their round).
        self.defer = self.settings.summary_flush_ms > 0
        # The readings to write at the next flush: the meter (generation) each was folded
        # for, by key (its subject and group values are in the key: core.keys.reading_series).
        # Held by key string only, as the pages (written as they are parked) are: per
        # reading, a (store, key) tuple and a (meter, subject, groups) one, with the subject
        # and group values they kept alive, were ~100,000 objects of a wide worker's peak at
        # 10,000 subjects (~25,000 readings waiting).
        self.dirty: dict[str, CompiledMeter] = {}
        self.dirty_pages: dict[int, set[str]] = {}  # store -> keys of pages to write
        self.load_slots = asyncio.Semaphore(_LOADS_IN_FLIGHT)
        self.flush_slots = asyncio.Semaphore(_FLUSHES_IN_FLIGHT)

    def forget(self) -> None:
        """Nothing deferred: the rounds not yet flushed are read again from the checkpoints."""
        self.dirty.clear()
        self.dirty_pages.clear()

    async def write(self, rnd: Round, dead: Dead, *, defer_readings: bool = False) -> None:
        """Fold the round into every key it changes and store them: readings now, summaries
        now or (deferred) with the next flush.

        The keys go in chunks of up to 1,000 of one bucket, each a small pipeline of its
        own: read the keys that are not cached (one direct multi-get), fold the round into
        them, encode them and send them as one atomic batch. Chunks run side by side (at most
        _LOADS_IN_FLIGHT reads and, per bucket, keystore.BATCHES_IN_FLIGHT batches at once), so the
        worker folds and encodes one chunk while nats-server reads or stores another. Done
        one step after the other for the whole round, a 50,000-event round of the wide shape
        (203,000 keys) spent 0.4 s reading, 0.75 s folding and encoding and 0.6 s writing,
        with one of the two processes idle at every moment.

        A key whose compare-and-set lost is read again from the stream leader and folded
        again, in a further pass.
        """
        todo = list(rnd.work)
        for attempt in range(20):
            failed = await _all(
                self.write_chunk(rnd, c, dead, leader=attempt > 0, defer_readings=defer_readings)
                for c in _chunks(todo)
            )
            todo = [wkey for keys in failed for wkey in keys]
            if not todo:
                return
            self.log.info("batch.cas_conflict", keys=len(todo), attempt=attempt)
        raise Restart("compare-and-set kept failing")

    async def write_chunk(
        self,
        rnd: Round,
        chunk: list[tuple[int, str]],
        dead: Dead,
        *,
        leader: bool,
        defer_readings: bool = False,
    ) -> list[tuple[int, str]]:
        """Load, fold and store one chunk of keys (one bucket); the keys whose write lost.

        The keys the runner holds are folded first, one at a time, each taken back from its
        parked or packed form (KeyStore.take) and parked or packed again at once; only then
        are the others read, and folded once they come. Before, every key of a chunk was
        taken back as a state before the chunk's read, and the round's chunks all start at
        once, so a round's keys were held as states together while the reads were under
        way: on the wide bench shape at 10,000 subjects (~8,500 keys a round), up to ~7,200
        states a worker against ~450 at 1,000 subjects (~1,900 keys a round); now none
        between reads in the memory traces (the peak RSS did not move measurably: README,
        Performance).

        A key deferred to the flush (or left unchanged) is done with once folded: its work
        is let go then (``del work[wkey]``), and a part goes once every key it falls in is
        done, rather than when the round is stored (``Round.release``). The next round is
        folded while this one is written, and each had up to ~10,000 parts
        (core.rounds.ROUND_PARTS): both rounds' were in memory at a wide worker's highs
        (~20,000 parts, with their ``Acc`` and ints, 1,000 and 10,000 subjects alike). A key
        written with its round keeps its work until stored, since a lost compare-and-set
        folds it again.
        """
        work = rnd.work
        now = datetime.now(UTC)
        writes: list[tuple[WKey, bytes | memoryview, int]] = []

        def fold_key(wkey: WKey, cached: KeyState) -> None:
            kw = work[wkey]
            meter = kw.meter.meter
            if cached.meter_start_seq != meter.startSeq:
                # Written for an earlier meter of this id (or new): start from zero.
                cached = empty_state(wkey[0], cached.revision, meter.startSeq)
                self.keys.replace(wkey, cached)
            if not wkey[0]:
                thaw(cached)
            if not self.apply_key(rnd, wkey, cached, dead):
                if wkey[0]:
                    rnd.held += self.park_page(wkey, cached)  # (opened by a replay, or as read)
                else:
                    self.keys.pack(wkey, cached)
                del work[wkey]  # done with: its parts go once no other key needs them
                return
            if wkey[0]:
                # A page is encoded at once and held as its bytes (windows closed).
                assert cached.windows is not None
                close_page(
                    cached,
                    encode_page(cached.windows, cached.last_seq, meter.startSeq, cached.replayed),
                )
            if self.defer and (wkey[0] or defer_readings):
                # Written by Runner._flush, with the checkpoint; its size counts towards the flush.
                if wkey[0]:
                    pages = self.dirty_pages.get(wkey[0])
                    if pages is None:
                        pages = self.dirty_pages[wkey[0]] = set()
                    mark_dirty_page(pages, wkey[1])
                    rnd.held += self.keys.park(wkey, cached)
                else:
                    mark_dirty(self.dirty, wkey[1], kw.meter)
                    self.keys.pack(wkey, cached)
                    self.w.stats.applied += kw.events
                del work[wkey]
                return
            # Encoded: held parked or packed while its batch is in flight, not as a state
            # (a page sent from its parked bytes), and given its new revision once stored.
            # A round's keys written at once wait together for their batches: as states, up
            # to ~5,000 at once in a wide worker's first rounds (~650 bytes a reading).
            revision = cached.revision
            body: bytes | memoryview
            if wkey[0]:
                rnd.held += self.keys.park(wkey, cached)
                body = self.keys.parked(wkey)[0]
            else:
                body = encoder.encode(
                    to_reading(
                        cached.acc,
                        meter,
                        kw.subject,
                        kw.groups,
                        cached.last_seq,
                        now,
                        cached.replayed,
                        late=cached.late,
                    )
                )
                # (kept as a state, its distinct values frozen, where it cannot be packed)
                self.keys.pack(wkey, cached)
            writes.append((wkey, body, revision))

        missing: list[WKey] = []
        for wkey in chunk:
            cached = self.keys.take(wkey)
            if cached is None:
                missing.append(wkey)
            else:
                fold_key(wkey, cached)
        if missing:
            async with self.load_slots:
                await self.keys.load(missing, leader=leader)
            for wkey in missing:
                fold_key(wkey, self.keys.cache[wkey])
        if not writes:
            return []
        results = await self.keys.store_chunk(
            chunk[0][0], [w[0][1] for w in writes], lambda n: (writes[n][1], writes[n][2])
        )
        failed = []
        for (wkey, _, _), result in zip(writes, results, strict=True):
            if isinstance(result, int):
                self.keys.written(wkey, result)
                if not wkey[0]:
                    self.w.stats.applied += work[wkey].events
                self.w.stats.writes += 1
                # Deferred by an earlier round (a reading under a backlog): written now.
                if wkey[0]:
                    self.dirty_pages.get(wkey[0], set()).discard(wkey[1])
                else:
                    self.dirty.pop(wkey[1], None)
            elif isinstance(result, KeyWrongLastSequenceError):
                self.w.stats.conflicts += 1
                if self.is_dirty(wkey):
                    # It held earlier rounds' events, no longer at hand to fold again:
                    # start again from the checkpoint (lastSeq makes the replay exact).
                    raise Restart("a deferred key was written by another worker")
                # Someone else wrote this key: read it again and fold what is still new.
                self.keys.forget(wkey)
                failed.append(wkey)
            else:
                self.keys.forget(wkey)
                assert isinstance(result, BaseException)
                raise result
        return failed

    def apply_key(self, rnd: Round, wkey: WKey, cached: KeyState, dead: Dead) -> bool:
        """Fold the round into one key's cached state (core.plan.apply); False when nothing
        in it is new. Events over a unique reading's limit are dead-lettered."""
        changed, failures = apply(
            wkey,
            rnd.work[wkey],
            cached,
            self.settings.unique_limit,
            lambda: self.folder.round_items(rnd),
        )
        for seq, meter_id, reason in failures:
            dead[(seq, meter_id)] = (rnd.by_seq()[seq], meter_id, reason)
        return changed

    def park_page(self, wkey: WKey, cached: KeyState) -> int:
        """Encode a page whose windows are open and park it (KeyStore.park); its bytes."""
        assert cached.windows is not None
        if cached.raw is None and cached.windows is not CLOSED:
            close_page(
                cached,
                encode_page(
                    cached.windows, cached.last_seq, cached.meter_start_seq, cached.replayed
                ),
            )
        return self.keys.park(wkey, cached) if cached.raw is not None else 0

    def has_dirty(self) -> bool:
        return bool(self.dirty) or any(self.dirty_pages.values())

    def is_dirty(self, wkey: WKey) -> bool:
        if not wkey[0]:
            return wkey[1] in self.dirty
        return wkey[1] in self.dirty_pages.get(wkey[0], ())

    async def write_dirty(self, *, readings: bool, spill: bool = False) -> None:
        """Store the pages changed since they were last written, and the deferred readings
        too with ``readings``; then nothing of them is dirty. ``spill``: for a spill (the
        log says which), not a flush."""
        by_store = {store: list(keys) for store, keys in self.dirty_pages.items() if keys}
        if readings and self.dirty:
            by_store[0] = list(self.dirty)
        self.log.debug(
            "summaries.spill" if spill else "summaries.flush",
            readings=readings,
            keys=sum(len(keys) for keys in by_store.values()),
            cached=len(self.keys.cache),
            cache_mb=self.keys.cache_bytes >> 20,
        )
        # Buckets taken in turn, so that each has batches in flight from the start.
        await _all(self.flush_chunk(store, keys) for store, keys in _in_turn(by_store))
        if readings:
            self.dirty.clear()
        self.dirty_pages.clear()

    async def flush_chunk(self, store: int, keys: list[str]) -> None:
        """Encode and store one chunk of deferred summaries (one bucket), at most
        _FLUSHES_IN_FLIGHT chunks at once. Each key's body is made as its turn to be sent
        comes (KeyStore.store_chunk): a reading is encoded then, a page sent from the bytes
        held, not all the flush's at once (~70,000 readings, tens of MB, on a wide
        backlog), nor a whole chunk's before its batch goes."""
        async with self.flush_slots:
            await self._flush_chunk_now(store, keys)

    async def _flush_chunk_now(self, store: int, keys: list[str]) -> None:
        dirty = self.dirty
        cache = self.keys.cache
        now = datetime.now(UTC)

        def write(n: int) -> Write:
            key = keys[n]
            cached = cache.get((store, key))
            if store:  # a page, encoded when a round folded into it: parked, or still held
                if cached is None:
                    return self.keys.parked((store, key))
                assert cached.raw is not None
                return cached.raw, cached.revision
            # A reading: packed (unpacked here for its write only), or held frozen where it
            # could not be packed (thawed for the write, then frozen again).
            state = self.keys.packed(key) if cached is None else cached
            subject, groups = reading_series(key)
            if cached is not None:
                thaw(state)
            body = encoder.encode(
                to_reading(
                    state.acc,
                    dirty[key].meter,
                    subject,
                    groups,
                    state.last_seq,
                    now,
                    state.replayed,
                    late=state.late,
                )
            )
            if cached is not None:
                freeze(state)
            return body, state.revision

        results = await self.keys.store_chunk(store, keys, write)
        for key, result in zip(keys, results, strict=True):
            if isinstance(result, int):
                self.keys.written((store, key), result)
                self.w.stats.writes += 1
            elif isinstance(result, KeyWrongLastSequenceError):
                # The events behind this state are no longer at hand: start again from
                # the checkpoint (lastSeq makes the replay exact).
                self.w.stats.conflicts += 1
                raise Restart("a summary was written by another worker")
            else:
                raise result

    async def dead_letter(self, dead: Dead, stored_ms: dict[int, int]) -> None:
        js = self.w.js
        publishes = []
        for (seq, meter_key), (msg, meter_id, reason) in sorted(dead.items()):
            cm = self.w.registry.by_id.get(meter_id) if meter_id else None
            generation = cm.meter.startSeq if cm else 0
            headers = {
                "Nats-Msg-Id": f"{self.layout.stream}:{seq}:{meter_key}:{generation}",
                "Kloudmeter-Error": _clean_header(reason),
                "Kloudmeter-Meter": meter_id or "",
                "Kloudmeter-Stream-Seq": str(seq),
                "Kloudmeter-Subject": msg.subject,
                "Kloudmeter-Stored-At": datetime.fromtimestamp(
                    stored_ms[seq] / 1000, UTC
                ).isoformat(),
            }
            subject = self.layout.error_subject(encode_token(meter_id) if meter_id else "_event")
            publishes.append(js.publish(subject, msg.data, headers=headers))
            self.log.info("event.dead_lettered", seq=seq, meter=meter_id, reason=reason)
        await asyncio.gather(*publishes)
