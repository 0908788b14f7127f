"""The worker's key cache: pages parked as bytes, trimmed within METER_CACHE_MB, and exact
when the cache is far smaller than what the events make."""

from types import SimpleNamespace
from typing import Any

import pytest

from kloudmeter_py.core.aggregate import Acc
from kloudmeter_py.core.plan import CLOSED, PAGE_ACC, KeyState
from kloudmeter_py.worker.keystore import HEAD, PARKED_SIZE, KeyStore, state_size
from tests.helpers import small_wide_bench


def _store(cache_mb: int = 1) -> KeyStore:
    worker: Any = SimpleNamespace(settings=SimpleNamespace(cache_mb=cache_mb))
    return KeyStore(worker, None)


def _page(
    revision: int, raw: bytes, last_seq: int = 7, start: int = 0, replayed: list[int] | None = None
) -> KeyState:
    state = KeyState(PAGE_ACC, last_seq, revision, start, replayed, windows=CLOSED, raw=raw)
    state.size = state_size(state)
    return state


def _reading() -> KeyState:
    state = KeyState(Acc(), 7, 3, 0)
    state.size = state_size(state)
    return state


def test_a_parked_page_keeps_its_bytes_and_revision_and_its_size_is_counted() -> None:
    keys = _store()
    state = _page(5, b"page-bytes")
    keys.replace((2, "k"), state)
    assert keys.park((2, "k"), state) == PARKED_SIZE + HEAD + len(b"page-bytes")
    assert (2, "k") not in keys.cache
    assert keys.parked((2, "k")) == (b"page-bytes", 5)
    assert keys.cache_bytes == PARKED_SIZE + HEAD + len(b"page-bytes")
    keys.written((2, "k"), 9)
    assert keys.parked((2, "k")) == (b"page-bytes", 9)
    assert type(keys.pages[2]["k"]) is bytes  # one object, not a bytearray and its buffer
    # parked again after a later round: the new bytes, counted once
    keys.park((2, "k"), _page(10, b"longer-page-bytes"))
    assert keys.parked((2, "k")) == (b"longer-page-bytes", 10)
    assert keys.cache_bytes == PARKED_SIZE + HEAD + len(b"longer-page-bytes")
    keys.forget((2, "k"))
    assert keys.cache_bytes == 0 and keys.pages[2] == {}


async def test_a_parked_page_comes_back_as_its_state_without_a_read() -> None:
    from kloudmeter_py.core.summaries import encode_page

    keys = _store()
    for replayed in (None, [17]):
        raw = encode_page({}, 41, 3, replayed)
        keys.park((1, "p"), _page(12, raw, 41, 3, replayed))
        # the worker has no connection: a read from the server would fail
        await keys.load([(1, "p")])
        state = keys.cache.pop((1, "p"))
        assert (state.raw, state.revision, state.last_seq) == (raw, 12, 41)
        assert (state.meter_start_seq, state.replayed) == (3, replayed)
        assert keys.cache_bytes == state.size
        keys.cache_bytes = 0
    # a generation of -1 (nothing stored for the meter) survives the head
    keys.park((1, "q"), _page(0, b"{}", 0, -1))
    await keys.load([(1, "q")])
    assert keys.cache[(1, "q")].meter_start_seq == -1


def test_trim_parks_pages_then_drops_the_oldest_parked_then_readings() -> None:
    keys = _store(cache_mb=1)
    budget = keys.cache_budget
    raw = b"x" * 2000
    n = 0
    while keys.cache_bytes <= budget:  # pages of two buckets, and readings, over the budget
        for store in (1, 3):
            keys.replace((store, f"p{n}"), _page(n + 1, raw))
        keys.replace((0, f"r{n}"), _reading())
        n += 1
    keys.trim()
    assert keys.cache_bytes <= budget // 2
    assert all(store == 0 for store, _ in keys.cache)  # pages are parked, readings kept
    for store in (1, 3):
        held = list(keys.pages[store])
        assert held and held == [f"p{i}" for i in range(n - len(held), n)]  # newest kept
    assert abs(len(keys.pages[1]) - len(keys.pages[3])) <= 1  # the buckets in turn
    total = sum(s.size for s in keys.cache.values()) + sum(
        PARKED_SIZE + len(v) for pages in keys.pages.values() for v in pages.values()
    )
    assert total == keys.cache_bytes
    parked = sum(PARKED_SIZE + len(v) for pages in keys.pages.values() for v in pages.values())
    assert keys.parked_bytes == parked


def test_parked_pages_are_counted_apart_and_let_go_together() -> None:
    """What parked pages take is counted on its own (runner._spill compares it with
    METER_SPILL_MB); letting them go keeps the readings and their bytes, and lets the packed
    readings go too only when asked."""
    keys = _store()
    reading = _reading()
    keys.replace((0, "r"), reading)
    for n in range(3):
        state = _page(n + 1, b"x" * (100 * n))
        keys.replace((1, f"p{n}"), state)
        keys.park((1, f"p{n}"), state)
    keys.park((1, "p1"), _page(9, b"y" * 50))  # parked again: counted once, as it is now
    keys.forget((1, "p0"))
    assert keys.parked_bytes == 2 * (PARKED_SIZE + HEAD) + 50 + 200
    assert keys.cache_bytes == reading.size + keys.parked_bytes
    packed = _reading()
    keys.replace((0, "q"), packed)
    keys.pack((0, "q"), packed)
    held = keys.packed_bytes
    assert held > 0 and list(keys.readings) == ["q"]
    keys.drop_parked()
    assert keys.parked_bytes == 0 and keys.pages == {}
    assert keys.cache == {(0, "r"): reading} and keys.cache_bytes == reading.size + held
    assert list(keys.readings) == ["q"]  # pages only: the packed reading stays
    keys.drop_parked(readings=True)  # (a spill that wrote the readings too: core.rounds.spills)
    assert keys.readings == {} and keys.packed_bytes == 0
    assert keys.cache == {(0, "r"): reading} and keys.cache_bytes == reading.size


async def test_a_packed_reading_comes_back_as_its_state_without_a_read() -> None:
    """A reading no round folds into is held packed (core.plan.pack_reading), counted in
    the cache's bytes; a round takes it back without a server read, a flush's write gives
    it its new revision (a new bytes object, in the same place in its dict), and one that
    cannot be packed stays a state."""
    from kloudmeter_py.worker.keystore import PACKED_SIZE

    keys = _store()
    acc = Acc()
    acc.count, acc.sum, acc.distinct = 4, 10, {"a", "b"}
    state = KeyState(acc, 41, 12, 3, [17], 2)
    state.size = state_size(state)
    keys.replace((0, "r"), state)
    keys.pack((0, "r"), state)
    assert keys.cache == {} and list(keys.readings) == ["r"]
    assert keys.cache_bytes == keys.packed_bytes == PACKED_SIZE + len(keys.readings["r"])
    assert keys.parked_bytes == 0  # a spill lets pages go, not readings
    keys.written((0, "r"), 13)
    assert keys.packed("r").revision == 13 and "r" in keys.readings  # left packed
    assert type(keys.readings["r"]) is bytes
    # the worker has no connection: a read from the server would fail
    await keys.load([(0, "r")])
    back = keys.cache[(0, "r")]
    assert back.acc == acc and (back.last_seq, back.revision) == (41, 13)
    assert (back.meter_start_seq, back.replayed, back.late) == (3, [17], 2)
    assert keys.readings == {} and keys.cache_bytes == back.size and keys.packed_bytes == 0
    keys.pack((0, "r"), back)
    keys.forget((0, "r"))
    assert keys.readings == {} and keys.cache_bytes == keys.packed_bytes == 0
    huge = KeyState(Acc(), 1, 1, 0)
    huge.acc.sum, huge.acc.distinct = 2**64, {"a"}
    keys.replace((0, "h"), huge)
    keys.pack((0, "h"), huge)
    assert keys.cache[(0, "h")] is huge and huge.frozen == ("a",) and keys.readings == {}
    assert keys.cache_bytes == huge.size == state_size(huge)
    keys.written((0, "h"), 5)  # stored: a key held as a state takes its revision as it is
    assert huge.revision == 5 and keys.cache[(0, "h")] is huge


def test_trim_drops_packed_readings_before_the_states_held() -> None:
    keys = _store(cache_mb=1)
    n = 0
    while keys.cache_bytes <= keys.cache_budget:
        state = _reading()
        keys.replace((0, f"r{n}"), state)
        keys.pack((0, f"r{n}"), state)
        n += 1
    held = _reading()
    keys.replace((0, "held"), held)
    keys.trim()
    assert keys.cache_bytes <= keys.cache_budget // 2
    assert keys.packed_bytes == keys.cache_bytes - held.size  # what is left of them
    kept = list(keys.readings)
    assert kept and kept == [f"r{i}" for i in range(n - len(kept), n)]  # newest kept
    assert keys.cache == {(0, "held"): held}


async def test_wide_backlog_through_a_two_megabyte_cache_is_exact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every reading and window exact when the worker's cache (METER_CACHE_MB=2) holds a
    small part of the keys: pages are parked, dropped and read again, flush after flush;
    rounds of 400 events, so that a page is folded by several rounds between two flushes."""
    monkeypatch.setenv("METER_CACHE_MB", "2")
    monkeypatch.setenv("METER_BATCH_SIZE", "200")
    results = await small_wide_bench(8000)
    assert results["correct"] is True, results.get("wrong")
