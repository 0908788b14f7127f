"""A reading deferred to the flush (under a backlog) and then written by a later round: on
success it leaves the flush list, and a lost compare-and-set restarts from the checkpoint
rather than folding only the later round into a re-read state (which would drop the earlier
rounds' events for good, their lastSeq being covered)."""

from datetime import UTC, datetime
from typing import Any

import pytest

from kloudmeter_py.core.aggregate import Acc
from kloudmeter_py.core.meters import CompiledMeter
from kloudmeter_py.core.models import Meter, reading_decoder
from kloudmeter_py.core.plan import KeyState, KeyWork, Part
from kloudmeter_py.worker import Worker
from kloudmeter_py.worker.keystore import state_size
from kloudmeter_py.worker.round import Restart, Round
from kloudmeter_py.worker.runner import Runner

KEY = (0, "deferred.s")


def _count_meter(meter_id: str, aggregation: str = "count") -> CompiledMeter:
    return CompiledMeter(
        Meter(
            id=meter_id,
            eventType="t",
            aggregation=aggregation,
            valueProperty="$.user" if aggregation == "unique" else None,
            startSeq=0,
            createdAt=datetime(2026, 1, 1, tzinfo=UTC),
        )
    )


def _round(runner: Runner, cm: CompiledMeter) -> Round:
    rnd = Round(runner._levels, 0)
    acc = Acc()
    acc.count = 2
    rnd.work = {KEY: KeyWork(Part(cm, "s", (), acc, 11, 0, 12, 2))}
    return rnd


def _counts(runner: Runner, cm: CompiledMeter, wkeys: list[tuple[int, str]], first: int) -> Round:
    """A round of two events (``first``, ``first`` + 1) for each key, named by its subject."""
    rnd = Round(runner._levels, 0)
    for wkey in wkeys:
        acc = Acc()
        acc.count = 2
        subject = wkey[1].split(".", 1)[1]
        rnd.work[wkey] = KeyWork(Part(cm, subject, (), acc, first, 0, first + 1, 2))
    return rnd


def _holding(worker: Worker, prefix: str, n: int) -> tuple[Runner, list[tuple[int, str]]]:
    """A runner that defers its keys to the flush, as under METER_SUMMARY_FLUSH_MS (the
    tests' settings write at once), holding ``n`` count readings of 1 packed (folded by an
    earlier round, deferred to the flush), and their keys."""
    runner = Runner(worker, [0])
    runner.writer.defer = True
    held = [(0, f"{prefix}.s{i}") for i in range(n)]
    for wkey in held:
        acc = Acc()
        acc.count = 1
        state = KeyState(acc, 10, 0, 0)
        state.size = state_size(state)
        runner.keys.replace(wkey, state)
        runner.keys.pack(wkey, state)
    return runner, held


@pytest.mark.parametrize("stale", [False, True])
async def test_a_deferred_reading_written_later(worker: Worker, stale: bool) -> None:
    cm = _count_meter("deferred")
    readings = worker.stores[0]
    revision = await readings.put(KEY[1], b"{}")
    runner = Runner(worker, [0])
    held = Acc()
    held.count = 3  # events 1..10, folded by an earlier round and not written yet
    runner.keys.replace(KEY, KeyState(held, 10, revision - 1 if stale else revision, 0))
    runner.writer.dirty[KEY[1]] = cm
    if stale:
        with pytest.raises(Restart):
            await runner.writer.write_chunk(_round(runner, cm), [KEY], {}, leader=False)
        assert KEY[1] in runner.writer.dirty
        return
    assert await runner.writer.write_chunk(_round(runner, cm), [KEY], {}, leader=False) == []
    assert KEY[1] not in runner.writer.dirty
    # held packed until a round folds into it again, at the revision just written
    state = runner.keys.packed(KEY[1])
    assert state.acc.count == 5
    assert state.revision == (await readings.get(KEY[1])).revision


async def test_a_round_takes_back_the_keys_it_holds_one_at_a_time(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readings held packed are taken back, folded and packed again one by one, and only the
    keys not held wait for their read as states (worker.write.Writer.write_chunk): a round's
    keys are not all states at once. Each ends with its stored state plus the round's."""
    cm = _count_meter("held")
    runner, held = _holding(worker, "held", 50)
    fresh = [(0, f"held.f{i}") for i in range(5)]  # not held: read from the bucket
    rnd = Round(runner._levels, 0)
    for wkey in held + fresh:
        acc = Acc()
        acc.count = 2
        rnd.work[wkey] = KeyWork(Part(cm, wkey[1][5:], (), acc, 11, 0, 12, 2))
    most = 0
    replace = runner.keys.replace

    def counted(wkey: tuple[int, str], state: KeyState) -> None:
        nonlocal most
        replace(wkey, state)
        most = max(most, len(runner.keys.cache))

    monkeypatch.setattr(runner.keys, "replace", counted)
    await runner.writer.write(rnd, {}, defer_readings=True)
    assert most == len(fresh)
    assert runner.keys.cache == {}  # every one packed again, deferred to the flush
    assert {k: runner.keys.packed(k).acc.count for _, k in held + fresh} == {
        **{k: 3 for _, k in held},
        **{k: 2 for _, k in fresh},
    }
    assert set(runner.writer.dirty) == {k for _, k in held + fresh}


async def test_readings_wait_for_their_read_and_their_write_with_distinct_values_frozen(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A unique reading read from its bucket, or encoded and waiting for its batch, holds
    its distinct values as a tuple (core.plan.freeze): a chunk's readings wait together
    there, and a set is ~10x the tuple (~8.4 KB for 100 values). Only the fold thaws one,
    and the readings stored are exact."""
    cm = _count_meter("uniq", "unique")
    runner = Runner(worker, [0])
    keys = [(0, f"uniq.s{i}") for i in range(20)]

    def round_of(users: list[str], first: int) -> Round:
        rnd = Round(runner._levels, 0)
        for wkey in keys:
            acc = Acc()
            acc.count, acc.distinct = len(users), set(users)
            part = Part(cm, wkey[1][5:], (), acc, first, 0, first + 1, len(users))
            rnd.work[wkey] = KeyWork(part)
        return rnd

    await runner.writer.write(round_of(["a", "b"], 1), {})  # written at once (the tests' settings)
    runner.keys.clear()  # so that the next round reads every one from the bucket
    sets: list[int] = []
    load, store_chunk = runner.keys.load, runner.keys.store_chunk

    def held_as_sets() -> int:
        return sum(1 for state in runner.keys.cache.values() if state.acc.distinct is not None)

    async def loaded(wkeys: list[tuple[int, str]], *, leader: bool = False) -> None:
        await load(wkeys, leader=leader)
        sets.append(held_as_sets())

    async def storing(store: int, keys: Any, write: Any) -> Any:
        sets.append(held_as_sets())
        return await store_chunk(store, keys, write)

    monkeypatch.setattr(runner.keys, "load", loaded)
    monkeypatch.setattr(runner.keys, "store_chunk", storing)
    await runner.writer.write(round_of(["b", "c"], 3), {})
    assert sets == [0, 0]  # read: 20 frozen; written: 20 encoded, frozen
    for _, key in keys:
        entry = await worker.stores[0].get(key)
        assert entry.value is not None
        reading = reading_decoder.decode(entry.value)
        assert (reading.distinct, reading.unique, reading.count) == (["a", "b", "c"], 3, 4)


async def test_a_round_lets_go_of_each_keys_work_once_it_is_deferred(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key folded and deferred to the flush, or left unchanged (its events already in it),
    needs its round's work no more: it is let go at once, so that its parts go while the
    round's other keys wait for their read, rather than beside the next round's parts. A
    key written with its round keeps its work until the round is stored (a lost
    compare-and-set folds it again)."""
    cm = _count_meter("done")
    runner, held = _holding(worker, "done", 30)
    fresh = [(0, f"done.f{i}") for i in range(4)]  # not held: read from the bucket

    def round_of(wkeys: list[tuple[int, str]], first: int) -> Round:
        return _counts(runner, cm, wkeys, first)

    rnd = round_of(held + fresh, 11)
    at_read: list[int] = []
    load = runner.keys.load

    async def loaded(wkeys: list[tuple[int, str]], *, leader: bool = False) -> None:
        at_read.append(len(rnd.work))
        await load(wkeys, leader=leader)

    monkeypatch.setattr(runner.keys, "load", loaded)
    await runner.writer.write(rnd, {}, defer_readings=True)
    assert at_read == [len(fresh)]  # the held keys' work was let go before the read
    assert rnd.work == {}
    assert {k: runner.keys.packed(k).acc.count for _, k in held + fresh} == {
        **{k: 3 for _, k in held},
        **{k: 2 for _, k in fresh},
    }
    again = round_of(held[:3], 11)  # events these keys already hold: nothing changes
    await runner.writer.write(again, {}, defer_readings=True)
    assert again.work == {}
    assert [runner.keys.packed(k).acc.count for _, k in held[:3]] == [3, 3, 3]
    written = round_of(fresh, 13)
    await runner.writer.write(written, {})  # readings written with their round
    assert set(written.work) == set(fresh)
    assert {k: runner.keys.packed(k).acc.count for _, k in fresh} == {k: 4 for _, k in fresh}


async def test_keys_written_with_their_round_wait_for_their_batch_packed(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reading written with its round is packed as soon as it is encoded (and a page
    parked): while its batch is in flight it is not held as a state (~650 bytes a reading;
    up to ~5,000 at once in a wide worker's first rounds). Once stored it has its new
    revision; a key another runner wrote meanwhile loses its compare-and-set, is read again
    and folded again, exactly."""
    cm = _count_meter("flight")
    runner = Runner(worker, [0])
    other = Runner(worker, [0])
    keys = [(0, f"flight.s{i}") for i in range(30)]

    def round_of(wkeys: list[tuple[int, str]], first: int) -> Round:
        return _counts(runner, cm, wkeys, first)

    await runner.writer.write(round_of(keys, 11), {})  # read, folded, written; now held packed
    await other.writer.write(round_of(keys[:1], 21), {})  # another runner writes the first key
    in_flight: list[int] = []
    store_chunk = runner.keys.store_chunk

    async def storing(store: int, names: Any, write: Any) -> Any:
        in_flight.append(len(runner.keys.cache))
        return await store_chunk(store, names, write)

    monkeypatch.setattr(runner.keys, "store_chunk", storing)
    await runner.writer.write(round_of(keys, 31), {})
    assert in_flight == [0, 0]  # the round, then the lost key again: no states held
    readings = worker.stores[0]
    for wkey in keys:
        entry = await readings.get(wkey[1])
        assert runner.keys.packed(wkey[1]).revision == entry.revision
        count = reading_decoder.decode(entry.value).count
        assert count == (6 if wkey == keys[0] else 4), wkey
