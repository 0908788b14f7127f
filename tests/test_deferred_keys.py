"""A reading deferred to the flush (under a backlog) and then written by a later round: on
success it leaves the flush list, and a lost compare-and-set restarts from the checkpoint
rather than folding only the later round into a re-read state (which would drop the earlier
rounds' events for good, their lastSeq being covered)."""

from datetime import UTC, datetime

import pytest

from kloudmeter_py.core.aggregate import Acc
from kloudmeter_py.core.meters import CompiledMeter
from kloudmeter_py.core.models import Meter
from kloudmeter_py.core.plan import KeyState, KeyWork, Part
from kloudmeter_py.worker import Worker
from kloudmeter_py.worker.keystore import state_size
from kloudmeter_py.worker.runner import Restart, Runner, _Round

KEY = (0, "deferred.s")


def _count_meter(meter_id: str) -> CompiledMeter:
    return CompiledMeter(
        Meter(
            id=meter_id,
            eventType="t",
            aggregation="count",
            startSeq=0,
            createdAt=datetime(2026, 1, 1, tzinfo=UTC),
        )
    )


def _round(runner: Runner, cm: CompiledMeter) -> _Round:
    rnd = _Round(runner._levels, 0)
    acc = Acc()
    acc.count = 2
    rnd.work = {KEY: KeyWork(Part(cm, "s", (), acc, 11, 0, 12, 2))}
    return rnd


@pytest.mark.parametrize("stale", [False, True])
async def test_a_deferred_reading_written_later(worker: Worker, stale: bool) -> None:
    cm = _count_meter("deferred")
    readings = worker.stores[0]
    revision = await readings.put(KEY[1], b"{}")
    runner = Runner(worker, [0])
    held = Acc()
    held.count = 3  # events 1..10, folded by an earlier round and not written yet
    runner.keys.replace(KEY, KeyState(held, 10, revision - 1 if stale else revision, 0))
    runner._dirty[KEY[1]] = cm
    if stale:
        with pytest.raises(Restart):
            await runner._write_chunk(_round(runner, cm), [KEY], {}, leader=False)
        assert KEY[1] in runner._dirty
        return
    assert await runner._write_chunk(_round(runner, cm), [KEY], {}, leader=False) == []
    assert KEY[1] not in runner._dirty
    # held packed until a round folds into it again, at the revision just written
    state = runner.keys.packed(KEY[1])
    assert state.acc.count == 5
    assert state.revision == (await readings.get(KEY[1])).revision


async def test_a_round_takes_back_the_keys_it_holds_one_at_a_time(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readings held packed are taken back, folded and packed again one by one, and only the
    keys not held wait for their read as states (runner._write_chunk): a round's keys are
    not all states at once. Each ends with its stored state plus the round's."""
    cm = _count_meter("held")
    runner = Runner(worker, [0])
    runner._defer = True  # as under METER_SUMMARY_FLUSH_MS (the tests' settings write at once)
    held = [(0, f"held.s{i}") for i in range(50)]
    for wkey in held:  # folded by an earlier round, deferred to the flush
        acc = Acc()
        acc.count = 1
        state = KeyState(acc, 10, 0, 0)
        state.size = state_size(state)
        runner.keys.replace(wkey, state)
        runner.keys.pack(wkey, state)
    fresh = [(0, f"held.f{i}") for i in range(5)]  # not held: read from the bucket
    rnd = _Round(runner._levels, 0)
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
    await runner._write(rnd, {}, defer_readings=True)
    assert most == len(fresh)
    assert runner.keys.cache == {}  # every one packed again, deferred to the flush
    assert {k: runner.keys.packed(k).acc.count for _, k in held + fresh} == {
        **{k: 3 for _, k in held},
        **{k: 2 for _, k in fresh},
    }
    assert set(runner._dirty) == {k for _, k in held + fresh}
