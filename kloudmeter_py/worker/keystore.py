"""The key states a runner folds into: a cache bounded by bytes, and reads and conditional
writes of many keys at once on the lean connection.

Keys are ``(store, key)``: store 0 is the readings bucket, 1.. the summary levels. Reads are
direct multi-gets (``multi_last``, up to 1,000 keys a request); writes are atomic batches of up
to 1,000 compare-and-set writes, one acknowledgement each, at most ``BATCHES_IN_FLIGHT`` open
per bucket. Measured on the wide bench shape (100,000 events, 10,000 subjects, times over 30
days): nats-server spent ~7.5 us per key it found and ~0.6 us per key it did not, and
~8-9 us per conditional write in an atomic batch (~6 us as a plain publish, which then costs
the worker an acknowledgement per write).
"""

import asyncio
import ctypes
import struct
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from kloudmeter_py.core.aggregate import Acc
from kloudmeter_py.core.meters import from_reading
from kloudmeter_py.core.models import reading_decoder
from kloudmeter_py.core.plan import (
    CLOSED,
    PAGE_ACC,
    KeyState,
    WKey,
    empty_state,
    freeze,
    pack_reading,
    unpack_reading,
)
from kloudmeter_py.core.summaries import page_head
from kloudmeter_py.store.kv import get_with_revision
from kloudmeter_py.store.wire import WireError

if TYPE_CHECKING:
    from kloudmeter_py.worker import Worker

# Atomic batches a runner keeps open at once per bucket. nats-server allows 50 in flight per
# stream (1,000 per server) and answers any batch beyond that with 10176 "atomic publish batch
# is incomplete": a flush of 2,000 summary batches started all at once drew 31 of those at
# 10,000 subjects, each a restart from the checkpoint. Eight per runner leave room for six
# workers on one bucket and still keep the server busy (a batch is a round trip of ~1,000 writes).
BATCHES_IN_FLIGHT = 8
CHUNK = 1000  # keys per load request and per atomic batch (nats-server answers <= 1,024)
# Writes of a batch queued between two waits for the connection's send buffer: with up to
# BATCHES_IN_FLIGHT batches a bucket writing, what is queued beyond the buffer's limit is at
# most ~64 writes each (~80 KB of pages), not 256.
_DRAIN_EVERY = 64
# Bytes of bodies an atomic batch may carry: a chunk of readings whose distinct sets are large
# goes in several batches.
_BATCH_BYTES = 4 << 20
# A write of one key: its body and the revision the key must be at (KeyStore.store_chunk).
Write = tuple[bytes | memoryview, int]


def libc_function(name: str) -> Any:
    """A function of the C library this process runs on (``ctypes``), or None where it has
    none of that name (not glibc, or an older one) or none can be loaded."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (AttributeError, OSError, TypeError):  # (TypeError: no CDLL(None))
        return None


_TRIM: Callable[[int], int] | None = libc_function("malloc_trim")


def give_back() -> None:
    """Return the C allocator's free pages to the system (glibc ``malloc_trim``; elsewhere
    nothing), after a flush or spill has let go of what it wrote.

    Python keeps objects over 512 bytes (pages and packed readings of many windows or
    values, dict tables, a flush's encoded batches) in glibc's heap, which hands back only
    what is free at its top. On the wide bench shape at 10,000 subjects that heap grew from
    ~21 to ~34 MB a worker after the first seconds while what it held in use stayed at
    17-27 MB, and the worker's peak RSS came from there: 121.5/122.5 MB against 115.3/114.9
    with it (two workers, one run each, the same hour).
    """
    if _TRIM is not None:
        _TRIM(0)


class _BatchAck(msgspec.Struct):
    seq: int = 0
    error: dict[str, Any] | None = None


_ack_decoder = msgspec.json.Decoder(_BatchAck)


def state_size(state: KeyState) -> int:
    """Estimated bytes a cached key state takes, key and cache entry included.

    From tracemalloc: a reading ~650 bytes (50,000 sum readings decoded from KV and held as
    the worker holds them, their sequences, times and sums ints over 256 and floats: 575
    besides a key of ~70; counted at 450 before, which left 180,000 readings at 30,000
    subjects ~35 MB over what the cache counted). Of 100,000 states of the wide bench
    shape's keys: a page ~290 and its bytes while closed (~465 while each page had an Acc
    and a dict of its own: core.plan.PAGE_ACC, CLOSED), or per window ~280 as an Acc and
    ~100 and its bytes while open but untouched. Distinct values are shared
    (core.aggregate.shared): a set of them ~200 bytes and ~40 a value.
    """
    size = (650 if state.windows is None else 290) + 8 * len(state.replayed or ())
    if state.raw is not None:
        return size + len(state.raw)
    windows = state.windows
    if windows is None:
        if state.frozen is not None:
            return size + 60 + 8 * len(state.frozen)
        distinct = state.acc.distinct
        return size + (200 + 40 * len(distinct) if distinct else 0)
    for w in windows.values():
        if isinstance(w, Acc):
            size += 280 + (200 + 40 * len(w.distinct) if w.distinct else 0)
        else:
            size += 100 + len(w)
    return size


# Estimated bytes a parked page takes besides its value: its key string and dict entry.
PARKED_SIZE = 150
# Estimated bytes a packed reading takes besides its value (core.plan.pack_reading): its
# bytes object's header (~33), key string (~90 for a meter id, subject and region of ~15
# characters each; a meter keeps the keys of the current round only, so most are the
# dict's own on a wide backlog) and dict entry (~40).
PACKED_SIZE = 180


def _packed_bytes(value: bytes) -> int:
    """Estimated bytes a packed reading takes (PACKED_SIZE besides its value)."""
    return PACKED_SIZE + len(value)


# A parked page: its revision, lastSeq, meter generation and whether it lists replayed dead
# letters (then read from its bytes), then its stored bytes. The head saves decoding the
# page's JSON when a round takes it back: ~2.5 pages an event on the wide shape.
_HEAD = struct.Struct(">qqqB")
HEAD = _HEAD.size


_REVISION = struct.Struct(">q")


def _parked(state: KeyState) -> bytes:
    """A closed page's parked value, one bytes object: a flush sends its bytes without a
    copy (``KeyStore.parked``), and a write's new revision makes a new one (``written``).

    Why not a bytearray, whose head a write could change in place: that is two allocations
    (the object and its buffer), and the object's ~56 bytes stay in Python's small-object
    heap, whose arenas are never given back once filled. A wide worker holds ~30,000
    parked pages at its highs (10,000 subjects, ~10,000 at 1,000). A new head takes ~0.2 us
    for a page of ~1.3 KB against ~0.08 in place (this machine), once per write."""
    assert state.raw is not None
    head = _HEAD.pack(state.revision, state.last_seq, state.meter_start_seq, bool(state.replayed))
    return head + state.raw


def _unparked(value: bytes) -> KeyState:
    revision, last_seq, meter_start_seq, replays = _HEAD.unpack_from(value)
    raw = bytes(memoryview(value)[HEAD:])
    replayed = page_head(raw).replayed if replays else None
    state = KeyState(
        PAGE_ACC, last_seq, revision, meter_start_seq, replayed, windows=CLOSED, raw=raw
    )
    state.size = state_size(state)
    return state


class KeyStore:
    """The cache of key states of one runner, and how they are read and written.

    Three tiers: ``cache`` holds a ``KeyState`` per key a round is folding, ``pages`` the
    rest of the pages, each as one bytes object (its KV revision and its stored bytes) in a
    dict per bucket keyed by the key's string, and ``readings`` the rest of the readings,
    each packed the same way (core.plan.pack_reading). A round that touches a parked page or
    a packed reading takes it back into ``cache`` (``load``, no server read) and parks or
    packs it again once it is encoded, written or waiting for the flush (``park``,
    ``pack``).

    Why: a page held as a ``KeyState`` cost ~450 bytes besides its value (the state, its
    (store, key) tuple, three int objects over 256 and the cache entry), parked ~150. On the
    wide bench shape most cached keys are pages (~160,000 of ~230,000 on a 500,000-event
    backlog), so the same ``METER_CACHE_MB`` holds about twice as many of them.
    """

    def __init__(self, worker: "Worker", log: Any) -> None:
        self.w = worker
        # Batch ids: a random prefix and a counter, unique per runner. nats-server stores the
        # batch headers with every message of a batch: a short id keeps them small.
        self.batch_prefix = uuid.uuid4().hex[:8]
        self.log = log
        self.cache: dict[WKey, KeyState] = {}
        self.pages: dict[int, dict[str, bytes]] = {}  # store -> key -> head + value
        self.readings: dict[str, bytes] = {}  # key -> packed reading
        self.cache_bytes = 0  # estimated (see state_size, PARKED_SIZE)
        self.parked_bytes = 0  # the part of it that parked pages take
        self.packed_bytes = 0  # the part of it that packed readings take
        self.cache_budget = worker.settings.cache_mb << 20
        self._batch_counter = 0
        self._batch_slots: dict[int, asyncio.Semaphore] = {}

    def clear(self) -> None:
        self.cache.clear()
        self.pages.clear()
        self.readings.clear()
        self.cache_bytes = 0
        self.parked_bytes = 0
        self.packed_bytes = 0
        give_back()

    def _packed_size(self, size: int) -> None:
        """Packed readings took ``size`` bytes more (less, if negative), in both counts."""
        self.cache_bytes += size
        self.packed_bytes += size

    def _parked_size(self, size: int) -> None:
        """Parked pages took ``size`` bytes more (less, if negative), in both counts."""
        self.cache_bytes += size
        self.parked_bytes += size

    def drop_parked(self, *, readings: bool = False) -> None:
        """Let every parked page go, and with ``readings`` every packed reading (all of them
        written): a round that touches one again reads it from its bucket. Key states stay."""
        self.cache_bytes -= self.parked_bytes
        self.parked_bytes = 0
        self.pages.clear()
        if readings:
            self.cache_bytes -= self.packed_bytes
            self.packed_bytes = 0
            self.readings.clear()
        give_back()

    def forget(self, wkey: WKey) -> None:
        gone = self.cache.pop(wkey, None)
        self.cache_bytes -= gone.size if gone else 0
        if not wkey[0]:
            packed = self.readings.pop(wkey[1], None)
            if packed is not None:
                self._packed_size(-_packed_bytes(packed))
            return
        parked = self.pages.get(wkey[0], {}).pop(wkey[1], None)
        if parked is not None:
            self._parked_size(-PARKED_SIZE - len(parked))

    def park(self, wkey: WKey, state: KeyState) -> int:
        """Hold a closed page (``state.raw`` set) as its bytes and revision only; the bytes
        it now takes (estimated)."""
        assert wkey[0] and state.raw is not None
        if self.cache.pop(wkey, None) is not None:
            self.cache_bytes -= state.size
        value = _parked(state)
        pages = self.pages.get(wkey[0])
        if pages is None:
            pages = self.pages[wkey[0]] = {}
        old = pages.pop(wkey[1], None)  # popped: a page parked again goes last (trim order)
        if old is not None:
            self._parked_size(-PARKED_SIZE - len(old))
        pages[wkey[1]] = value
        self._parked_size(PARKED_SIZE + len(value))
        return PARKED_SIZE + len(value)

    def pack(self, wkey: WKey, state: KeyState) -> None:
        """Hold a reading that no round is folding into as its packed bytes (kept as it is,
        its distinct values frozen, where it cannot be packed)."""
        assert not wkey[0] and state.windows is None
        value = pack_reading(state)
        if value is None:
            freeze(state)
            self.resize(state)
            return
        if self.cache.pop(wkey, None) is not None:
            self.cache_bytes -= state.size
        old = self.readings.pop(wkey[1], None)
        if old is not None:
            self._packed_size(-_packed_bytes(old))
        self.readings[wkey[1]] = value
        self._packed_size(_packed_bytes(value))

    def packed(self, key: str) -> KeyState:
        """A packed reading's state, left packed (for a flush that writes it)."""
        return unpack_reading(self.readings[key])

    def parked(self, wkey: WKey) -> tuple[memoryview, int]:
        """A parked page's stored bytes (a view: not to be held past its write) and
        revision."""
        value = self.pages[wkey[0]][wkey[1]]
        return memoryview(value)[HEAD:], _REVISION.unpack_from(value)[0]

    def written(self, wkey: WKey, revision: int) -> None:
        """A key the runner holds was stored: its new revision. A key state takes it as it
        is; a parked page or packed reading gets a new head (both heads start with it; the
        value keeps its place in its dict, and so in the trim order)."""
        state = self.cache.get(wkey)
        if state is not None:  # (a page a flush wrote still held, a reading not packable)
            state.revision = revision
            return
        held = self.pages[wkey[0]] if wkey[0] else self.readings
        held[wkey[1]] = _REVISION.pack(revision) + held[wkey[1]][_REVISION.size :]

    def replace(self, wkey: WKey, state: KeyState) -> None:
        old = self.cache.get(wkey)
        self.cache_bytes += state.size - (old.size if old else 0)
        self.cache[wkey] = state

    def holds(self, wkey: WKey) -> bool:
        """Whether the runner holds a key (a state, a parked page or a packed reading)."""
        if wkey in self.cache:
            return True
        if wkey[0]:
            return wkey[1] in self.pages.get(wkey[0], ())
        return wkey[1] in self.readings

    def take(self, wkey: WKey) -> KeyState | None:
        """A key's state where the runner holds it (a state, a parked page or a packed
        reading), taken into ``cache``; None where it must be read (``load``)."""
        cached = self.cache.get(wkey)
        if cached is not None:
            return cached
        store, key = wkey
        if store:
            parked = self.pages.get(store, {}).pop(key, None)
            if parked is None:
                return None
            self._parked_size(-PARKED_SIZE - len(parked))
            cached = _unparked(parked)
        else:
            packed = self.readings.pop(key, None)
            if packed is None:
                return None
            self._packed_size(-_packed_bytes(packed))
            cached = unpack_reading(packed)
            cached.size = state_size(cached)
        self.replace(wkey, cached)
        return cached

    async def load(self, keys: list[WKey], *, leader: bool = False) -> None:
        """Read keys into the cache: many per direct-get request, or one by one from the
        stream leader (after a lost compare-and-set, where a replica might lag). A key the
        runner holds is taken as it is (``take``), not read."""
        results: dict[tuple[int, str], tuple[bytes | None, int]] = {}
        by_store: dict[int, list[str]] = {}
        for wkey in keys:
            if self.take(wkey) is None:
                by_store.setdefault(wkey[0], []).append(wkey[1])
        one_by_one: list[tuple[int, str]] = []

        async def direct(store: int, chunk: list[str]) -> None:
            bucket = self.w.store_buckets[store]
            prefix = f"$KV.{bucket}."
            try:
                wire = await self.w.wire()
                found = await wire.last_values(f"KV_{bucket}", [prefix + k for k in chunk])
            except WireError as exc:
                self.log.debug("load.direct_failed", error=str(exc))
                one_by_one.extend((store, k) for k in chunk)
                return
            for k in chunk:
                results[(store, k)] = found.get(prefix + k, (None, 0))

        if not leader:
            # nats-server answers at most 1,024 subjects per multi_last request (413 above)
            await asyncio.gather(
                *(
                    direct(store, names[i : i + CHUNK])
                    for store, names in by_store.items()
                    for i in range(0, len(names), CHUNK)
                )
            )
        else:
            one_by_one = [(store, k) for store, names in by_store.items() for k in names]
        if one_by_one:
            kvs = self.w.stores
            limit = asyncio.Semaphore(64)

            async def get(wkey: tuple[int, str]) -> None:
                async with limit:
                    results[wkey] = await get_with_revision(kvs[wkey[0]], wkey[1])

            await asyncio.gather(*(get(wkey) for wkey in one_by_one))
        for wkey in results:
            value, revision = results[wkey]
            if value is None:
                cached = empty_state(wkey[0], revision, -1)
            elif wkey[0]:
                head = page_head(value)
                cached = KeyState(
                    PAGE_ACC,
                    head.lastSeq,
                    revision,
                    head.meterStartSeq,
                    head.replayed,
                    windows=CLOSED,
                    raw=value,
                )
            else:
                r = reading_decoder.decode(value)
                cached = KeyState(
                    from_reading(r), r.lastSeq, revision, r.meterStartSeq, r.replayed, r.late
                )
                # Its distinct values as a tuple until its round folds into it (thaw): a
                # chunk's up to 1,000 keys are all read before the first is folded.
                freeze(cached)
            cached.size = state_size(cached)
            self.replace(wkey, cached)

    def resize(self, cached: KeyState) -> None:
        """After a write: the state has grown by what was folded into it."""
        size = state_size(cached)
        self.cache_bytes += size - cached.size
        cached.size = size

    def trim(self) -> None:
        """Keep the cache within METER_CACHE_MB (estimated): park the pages still held as
        states, then drop the pages parked longest ago (the buckets in turn), then the
        readings packed longest ago, then the oldest states, down to half of it (the runner
        flushes once the cache, what waits to be written included, reaches the budget: the
        other half is room for what the next rounds change). Then the allocator's free pages
        go back (give_back).

        Called after a flush, when nothing in the cache waits to be written. Memory then
        grows with the budget, not with the number of keys: on the wide bench shape a round
        touches ~200,000 keys, three quarters of them summaries of windows that the next
        round seldom touches again, while every reading comes back round after round.
        """
        self._trim()
        give_back()

    def _trim(self) -> None:
        if self.cache_bytes <= self.cache_budget:
            return
        goal = self.cache_budget // 2
        cache = self.cache
        for wkey in [k for k in cache if k[0]]:
            state = cache[wkey]
            if state.raw is not None:
                self.park(wkey, state)
            else:  # open (a replay that changed nothing) or empty: read again when needed
                self.cache_bytes -= cache.pop(wkey).size
        if self.cache_bytes <= goal:
            return
        stores = [(pages, list(pages)) for pages in self.pages.values()]
        for n in range(max((len(names) for _, names in stores), default=0)):
            for pages, names in stores:
                if n < len(names):
                    self._parked_size(-PARKED_SIZE - len(pages.pop(names[n])))
            if self.cache_bytes <= goal:
                return
        readings = self.readings
        for key in list(readings):
            self._packed_size(-_packed_bytes(readings.pop(key)))
            if self.cache_bytes <= goal:
                return
        for wkey in list(cache):
            self.cache_bytes -= cache.pop(wkey).size
            if self.cache_bytes <= goal:
                return

    async def _cas(self, store: int, key: str, body: bytes | memoryview, revision: int) -> int:
        kv: KeyValue = self.w.stores[store]
        rev: int = await kv.update(key, bytes(body), last=revision)
        return rev

    async def store_chunk(
        self, store: int, keys: Sequence[str], write: Callable[[int], Write]
    ) -> list[int | BaseException]:
        """Compare-and-set each of ``keys`` (one bucket) to the body ``write(n)`` makes for
        ``keys[n]``, at the revision it names; per key its new revision or the error.

        With atomic batches (nats-server 2.12+, streams with allow_atomic) the keys go in
        batches of up to CHUNK conditional writes and ~4 MB, one acknowledgement each; a
        stale revision rejects its whole batch (KeyWrongLastSequenceError for each of its
        keys). Otherwise they are sent as concurrent conditional updates.

        ``write(n)`` is called once per key, in order, as the key's turn to be sent comes,
        and its body is let go once queued on the connection: what a flush holds then does
        not grow with the keys it has in flight. Made before, each key in flight held its
        body (an encoded reading, or a view of a parked page), its write's tuple, its
        (store, key) and two ints until its batch was acknowledged: ~450 bytes of small
        objects for each of up to 8,000 keys (_FLUSHES_IN_FLIGHT chunks). On the wide bench
        shape at 10,000 subjects a worker's first flush that let its cache go (~30,000
        pages and ~20,000 readings held) raised the blocks Python's small-object allocator
        had in use from ~415,000 to ~475,000, and its arenas, which it keeps, from 44-45
        to 47-48 MB: the highest mark of the run. Made as sent (two workers, three runs
        against two of the code before, the same morning): peak RSS a worker 84.0-90.0 MB
        against 89.8-90.6 at 10,000 subjects, 80.5-85.2 against 86.5-88.9 at 1,000; the
        live shape unchanged (82.6-86.7 against 83.3-87.4): README, Performance.
        """
        if not self.w.atomic:
            made = [write(n) for n in range(len(keys))]
            return list(
                await asyncio.gather(
                    *(self._cas(store, key, *w) for key, w in zip(keys, made, strict=True)),
                    return_exceptions=True,
                )
            )
        results: list[int | BaseException] = [0] * len(keys)
        slots = self._batch_slots.get(store)
        if slots is None:
            slots = self._batch_slots[store] = asyncio.Semaphore(BATCHES_IN_FLIGHT)
        n, total = 0, len(keys)
        ahead = write(0) if total else None
        while ahead is not None:
            async with slots:
                start = n
                try:
                    n, ahead, ack = await self._atomic(store, keys, write, n, ahead)
                except Exception as exc:
                    # (the connection or the wait failed: the caller stops at it)
                    results[start:] = [exc] * (total - start)
                    return results
            if ack.error is None:
                # An atomic batch is stored contiguously, its commit last.
                results[start:n] = range(ack.seq - (n - 1 - start), ack.seq + 1)
                continue
            err: BaseException
            if ack.error.get("err_code") == 10071:
                err = KeyWrongLastSequenceError(description=ack.error.get("description"))
            else:
                err = RuntimeError(f"atomic batch refused: {ack.error}")
            results[start:n] = [err] * (n - start)
        return results

    async def _atomic(
        self,
        store: int,
        keys: Sequence[str],
        write: Callable[[int], Write],
        n: int,
        first: Write,
    ) -> tuple[int, Write | None, _BatchAck]:
        """Send one atomic batch from ``keys[n]`` on (``first``: its write, already made);
        the index after the batch, the write made for it (None: no keys left) and the
        batch's acknowledgement.

        A batch ends after CHUNK keys, before a body that would take it past ~4 MB, or at
        the last key: so each write is made one key ahead of its send, to know whether the
        one before it commits the batch."""
        self._batch_counter += 1
        batch_id = f"{self.batch_prefix}{self._batch_counter:x}"
        bucket = self.w.store_buckets[store]
        head = b"NATS/1.0\r\nNats-Batch-Id: %s\r\nNats-Batch-Sequence: " % batch_id.encode()
        wire = await self.w.wire()
        reply, answer = wire.new_reply()
        total = len(keys)
        start, size = n, 0
        ahead: Write | None = first
        try:
            while ahead is not None:
                body, revision = ahead
                size += len(body)
                ahead = write(n + 1) if n + 1 < total else None
                last = (
                    ahead is None or n + 1 - start >= CHUNK or size + len(ahead[0]) > _BATCH_BYTES
                )
                headers = b"%s%d\r\nNats-Expected-Last-Subject-Sequence: %d\r\n%s\r\n" % (
                    head,
                    n - start + 1,
                    revision,
                    b"Nats-Batch-Commit: 1\r\n" if last else b"",
                )
                wire.hpublish(f"$KV.{bucket}.{keys[n]}", headers, body, reply if last else "")
                del body  # (queued: it goes once the connection has written it)
                n += 1
                if (n - start) % _DRAIN_EVERY == 0:
                    await wire.drain()
                if last:
                    break
            async with asyncio.timeout(10):
                data = await answer
        finally:
            wire.forget_reply(reply)
        return n, ahead, _ack_decoder.decode(data)
