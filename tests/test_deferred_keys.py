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
from kloudmeter_py.worker.runner import Restart, Runner, _Round

KEY = (0, "deferred.s")


def _round(runner: Runner, cm: CompiledMeter) -> _Round:
    rnd = _Round(runner._levels, 0)
    acc = Acc()
    acc.count = 2
    rnd.work = {KEY: KeyWork(Part(cm, "s", (), acc, 11, 0, 12, 2))}
    return rnd


@pytest.mark.parametrize("stale", [False, True])
async def test_a_deferred_reading_written_later(worker: Worker, stale: bool) -> None:
    cm = CompiledMeter(
        Meter(
            id="deferred",
            eventType="t",
            aggregation="count",
            startSeq=0,
            createdAt=datetime(2026, 1, 1, tzinfo=UTC),
        )
    )
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
