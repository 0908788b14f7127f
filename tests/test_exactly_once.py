"""Exactly once: nothing lost or counted twice through kills, restarts, duplicates, two owners.

Every test compares the readings in KV with a reference computed here from the events sent.
"""

import asyncio
import contextlib
import random
import re
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client

from kloudmeter_py.config import Settings
from kloudmeter_py.store.meters import MeterRegistry
from kloudmeter_py.store.provision import provision
from kloudmeter_py.store.server import NatsServer
from kloudmeter_py.worker import Worker
from tests.conftest import eventually
from tests.load import Load, WorkerProcess, actual, calls_total, create_meters, day_totals


async def _settled(nc: Client, load: Load, timeout: float = 60) -> None:
    """The readings equal the reference, and so do the day summaries added up (summaries
    are written after the readings, with the checkpoint)."""
    expected = load.expected()
    # Waited for until equal, not until the count meter is complete: under a backlog the
    # readings are written at the flush, in chunks, and one meter's chunk can be read before
    # another's is stored. A count too high or too low never becomes equal: it times out.
    got = await eventually(lambda: actual(nc), lambda r: r == expected, timeout=timeout)
    assert got == expected
    days = await eventually(lambda: day_totals(nc), lambda r: r == expected, timeout=timeout)
    assert days == expected


async def test_two_live_owners_of_every_partition_do_not_double_count(
    nc: Client, settings: Settings
) -> None:
    """Two workers owning the same partitions at the same time (no leases): readings exact."""
    await create_meters(nc)
    a = Worker(nc, settings, partitions=[0, 1], worker_id="a")
    b = Worker(nc, settings, partitions=[0, 1], worker_id="b")
    await a.start()
    await b.start()
    try:
        load = Load(3000, dup_ratio=0.1, seed=2)
        await load.publish(nc)
        await _settled(nc, load)
    finally:
        await a.stop()
        await b.stop()


@contextlib.asynccontextmanager
async def _four_partitions(server: NatsServer) -> AsyncIterator[tuple[Settings, Client]]:
    """Settings of four partitions (rounds of 200 events) and a connection to ``server``,
    provisioned for them, with the test meters; closed when the block ends."""
    settings = Settings(nats_url=server.url, partitions=4, batch_size=200)
    nc = await nats.connect(settings.nats_url)
    try:
        await provision(nc.jetstream(), settings)
        await create_meters(nc)
        yield settings, nc
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def _two_workers(nc: Client, settings: Settings) -> AsyncIterator[tuple[Worker, Worker]]:
    """Worker ``a`` of partitions 0 and 1 and ``b`` of 2 and 3, running until the block ends."""
    a = Worker(nc, settings, partitions=[0, 1], worker_id="a")
    b = Worker(nc, settings, partitions=[2, 3], worker_id="b")
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.stop()
        await b.stop()


async def test_workers_of_some_partitions_each_count_only_their_own(
    nats_server: NatsServer,
) -> None:
    """Four partitions, two workers with two each: each reads its partitions through a
    consumer per partition, filtered on the partition's prefix (one consumer with several
    filter subjects is slow to deliver, and an unfiltered one delivers every event to both
    workers: see Runner._config). Every event is read by one of them and counted once, in
    the readings and the day summaries."""
    async with _four_partitions(nats_server) as (settings, nc):
        async with _two_workers(nc, settings) as (a, b):
            load = Load(3000, dup_ratio=0.1, seed=21)
            await load.publish(nc)
            await _settled(nc, load)
            consumers = await nc.jetstream().consumers_info("meters")
            ours = {c.config.name: c for c in consumers if c.name and c.name.startswith("meters-w")}
            assert sorted(ours) == [
                "meters-wa-1-0",
                "meters-wa-1-1",
                "meters-wb-1-2",
                "meters-wb-1-3",
            ]
            for name, info in ours.items():
                assert info.config.filter_subject == f"meters.events.{name[-1]}.>"
                assert not info.config.filter_subjects
            # nats-server delivered each event once, to its partition's consumer: with every
            # worker reading every event the readings would be right too (lastSeq), but each
            # worker would do the work of both.
            stored = (await nc.jetstream().stream_info("meters")).state.messages
            assert sum(info.delivered.consumer_seq for info in ours.values()) == stored
            assert a.stats.events > 0 and b.stats.events > 0
            assert a.stats.events + b.stats.events == len(load.unique_events)


@pytest.mark.parametrize("let_go", [True, False], ids=["lets-go", "keeps-few-keys"])
async def test_a_worker_takes_its_partitions_backlogs_one_at_a_time(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, let_go: bool
) -> None:
    """A worker of two partitions (a consumer each) started on a backlog in both works
    through one, then the other (``rounds.focus``; its threshold lowered from 20,000 to
    100 events here). At each turn, once what it holds has reached METER_SPILL_MB
    (``rounds.lets_go``), it writes that and empties its key cache and its meters' reading
    keys; these keys take well under 12 MB, so it keeps them, and a key touched again is
    not read and written again. Run with ``lets_go`` made to let go whatever is held, and
    as it is: then it is asked with the next round's keys, of which it counts those not
    held. Every event is counted once, in the readings and the day summaries, with no
    restart."""
    from kloudmeter_py.core import rounds

    monkeypatch.setattr(rounds, "FOCUS_AT", 100)
    asked: list[tuple[int, int]] = []  # (unheld, keys) at each turn
    lets_go = rounds.lets_go

    def asking(held: int, packed: int, spill_mb: int, *, unheld: int, keys: int) -> bool:
        asked.append((unheld, keys))
        return True if let_go else lets_go(held, packed, spill_mb, unheld=unheld, keys=keys)

    monkeypatch.setattr(rounds, "lets_go", asking)
    forgotten = _count_forgotten(monkeypatch)
    async with _four_partitions(nats_server) as (settings, nc):
        load = Load(4000, dup_ratio=0.1, seed=41)
        await load.publish(nc)
        async with _two_workers(nc, settings) as (a, b):
            await _settled(nc, load)
            turned = _turned(a, b)
            let_go_times = forgotten.get(id(turned.registry), 0)
            assert let_go_times >= 2 if let_go else let_go_times == 0
            assert a.stats.let_goes + b.stats.let_goes == (len(asked) if let_go else 0)
            # (the round's keys are known when it is asked: spread before, not after)
            assert any(keys > 0 for _, keys in asked)
            assert all(0 <= unheld <= keys for unheld, keys in asked)
            assert a.stats.restarts == 0 and b.stats.restarts == 0
            assert a.stats.events + b.stats.events == len(load.unique_events)


def _count_forgotten(monkeypatch: pytest.MonkeyPatch) -> dict[int, int]:
    """Times each meter registry let its reading keys go (at a turn, see rounds.lets_go),
    by the registry's id."""
    forgotten: dict[int, int] = {}
    forget_keys = MeterRegistry.forget_keys

    def counted(registry: MeterRegistry) -> None:
        forgotten[id(registry)] = forgotten.get(id(registry), 0) + 1
        forget_keys(registry)

    monkeypatch.setattr(MeterRegistry, "forget_keys", counted)
    return forgotten


def _turned(a: Worker, b: Worker) -> Worker:
    """The worker of the two that turned most, having turned at least twice: to one
    partition, then the next or all. Asked of one worker of the two: on a loaded machine a
    worker was once seen never to have two partitions behind at once (turns (0, 6), once in
    ~20 runs beside two CPU hogs), whatever the rule."""
    turned = max((a, b), key=lambda w: w.stats.turns)
    assert turned.stats.turns >= 2, (a.stats, b.stats)
    return turned


async def test_a_round_ends_when_the_partition_in_hand_has_delivered_its_backlog(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker working through one partition's backlog while its other partition waits
    ends a round once the one in hand has nothing more to deliver, rather than gathering
    for the rest of METER_FLUSH_MS (12 s here) because the waiting one still has a backlog.
    The two workers then apply every event well within one METER_FLUSH_MS; when the
    waiting partition counted, each waited out 12 s at the end of its first partition's
    backlog. (Caught up, the flush that writes the readings may wait for METER_FLUSH_MS.)"""
    from kloudmeter_py.core import rounds

    monkeypatch.setattr(rounds, "FOCUS_AT", 100)
    async with _four_partitions(nats_server) as (settings, nc):
        load = Load(4000, dup_ratio=0.1, seed=43)
        await load.publish(nc)
        slow_gather = msgspec.structs.replace(settings, flush_ms=12_000)
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with _two_workers(nc, slow_gather) as (a, b):
            unique = len(load.unique_events)
            await eventually(
                lambda: _applied(a, b), lambda n: n == unique, timeout=30, interval=0.05
            )
            took = loop.time() - started
            assert a.stats.turns + b.stats.turns >= 1  # (see _turned)
            assert took < 8, f"every event applied after {took:.1f} s"
            await _settled(nc, load)


async def _applied(a: Worker, b: Worker) -> int:
    return a.stats.events + b.stats.events


async def test_a_round_being_written_is_stored_before_an_idle_flush(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a worker works through one partition's backlog, its other consumers keep what
    they have buffered. When the one in hand has nothing at that moment and METER_FLUSH_MS
    has passed, the loop flushes: only once the round still being written is stored. A
    flush beside that write cleared the dirty marks the write added meanwhile, and the pages
    they marked were never written once the next turn emptied the cache. Here each atomic
    batch waits 50 ms and METER_FLUSH_MS is 20, so writes are slow and the loop often finds
    nothing buffered (and every turn lets the cache go, ``rounds.lets_go`` made to): every
    event is still counted once in the day summaries."""
    from kloudmeter_py.core import rounds
    from kloudmeter_py.worker import keystore

    monkeypatch.setattr(rounds, "FOCUS_AT", 100)
    monkeypatch.setattr(rounds, "lets_go", lambda *_, **__: True)
    store_chunk = keystore.KeyStore.store_chunk

    async def slow(
        self: keystore.KeyStore, store: int, keys: Any, write: Any
    ) -> list[int | BaseException]:
        await asyncio.sleep(0.05)
        return await store_chunk(self, store, keys, write)

    monkeypatch.setattr(keystore.KeyStore, "store_chunk", slow)
    async with _four_partitions(nats_server) as (settings, nc):
        load = Load(16000, subjects=2000, spread_days=60, dup_ratio=0.1, seed=47)
        await load.publish(nc)
        quick = msgspec.structs.replace(settings, flush_ms=20)
        async with _two_workers(nc, quick) as (a, b):
            await _settled(nc, load)
            assert a.stats.turns >= 2 and b.stats.turns >= 2


@pytest.mark.parametrize("readings", [False, True], ids=["pages", "pages-and-readings"])
async def test_keys_written_between_flushes_are_let_go_and_read_again(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, readings: bool
) -> None:
    """Behind a backlog a worker writes the summary pages it holds once what it holds
    reaches METER_SPILL_MB (0 here: after every round) and lets them go, and its deferred
    readings too where they are half of it (``rounds.spills``; made to leave them for the
    flush in the ``pages`` case); the checkpoint and the acknowledgement wait for the flush.
    A later round that touches such a page or reading reads it from its bucket. Every event
    is counted once, in the readings and the day summaries."""
    from kloudmeter_py.core import rounds

    if not readings:
        monkeypatch.setattr(rounds, "spills", lambda *_: (True, False))
    async with _four_partitions(nats_server) as (settings, nc):
        load = Load(16000, subjects=2000, spread_days=60, dup_ratio=0.1, seed=53)
        await load.publish(nc)
        spill = msgspec.structs.replace(settings, spill_mb=0, batch_size=500)
        async with _two_workers(nc, spill) as (a, b):
            await _settled(nc, load)
            assert a.stats.spills >= 2 and b.stats.spills >= 2
            if readings:
                assert a.stats.reading_spills >= 2 and b.stats.reading_spills >= 2
            else:
                assert a.stats.reading_spills == 0 and b.stats.reading_spills == 0
            assert a.stats.restarts == 0 and b.stats.restarts == 0


async def _consumer_filters(nc: Client, prefix: str) -> list[str | None]:
    """The filter subject of each consumer of the stream whose name begins with ``prefix``."""
    infos = await nc.jetstream().consumers_info("meters")
    return [c.config.filter_subject for c in infos if c.name and c.name.startswith(prefix)]


async def test_one_worker_of_every_partition_splits_its_consumer_on_a_backlog(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker of all four partitions reads them through one unfiltered consumer, and
    through a consumer per partition while it is behind (``rounds.split``; the threshold
    lowered from 20,000 to 50 events a partition here), so that it works through their
    backlogs one at a time (``focus``). Started on a backlog it starts split; once caught
    up it reads through one consumer; a backlog that builds while it runs splits it again.
    Every event is counted once, in the readings and the day summaries, with no restart."""
    from kloudmeter_py.core import rounds

    monkeypatch.setattr(rounds, "FOCUS_AT", 50)
    async with _four_partitions(nats_server) as (settings, nc):
        worker = Worker(nc, settings, partitions=[0, 1, 2, 3], worker_id="a")

        def filters() -> Awaitable[list[str | None]]:
            return _consumer_filters(nc, "meters-wa")

        load = Load(8000, dup_ratio=0.1, seed=43)
        events = load.events
        load.events = events[:4000]
        await load.publish(nc)
        await worker.start()
        try:
            await eventually(filters, lambda f: f == [None])  # caught up: one consumer
            assert worker.stats.turns >= 2  # it was split: one partition, then the next
            # Joined once; twice in rare runs (once in CI and 1 in 64 local runs on
            # 2026-12-06; 0 in 20 on the code before, whose split and join are the same): a
            # join then another split and join at once. Not yet explained; a likely cause is
            # that a consumer's start measures the backlog from the lowest partition's
            # checkpoint (_consume).
            assert worker.stats.regroups in (1, 2)
            load.events = events[4000:]
            await load.publish(nc)  # a backlog while it runs
            await _settled(nc, load)
            await eventually(filters, lambda f: f == [None])
            assert worker.stats.regroups >= 3  # split again, and back to one
            assert worker.stats.restarts == 0
            assert worker.stats.events == len(load.unique_events)
        finally:
            await worker.stop()


async def _last_seq_by_partition(nc: Client) -> dict[int, int]:
    """The last stream sequence stored in each partition (from each stored subject's last)."""
    js = nc.jetstream()
    info = await js.stream_info("meters", subjects_filter="meters.events.>")
    lasts: dict[int, int] = {}
    for subject in info.state.subjects or {}:
        p = int(subject.split(".")[2])
        seq = (await js.get_last_msg("meters", subject)).seq or 0
        lasts[p] = max(lasts.get(p, 0), seq)
    return lasts


async def _checkpoints(nc: Client) -> dict[int, int]:
    offsets = await nc.jetstream().key_value("offsets")
    out: dict[int, int] = {}
    for p in range(4):
        try:
            out[p] = int(msgspec.json.decode((await offsets.get(f"partition.{p}")).value)["seq"])
        except Exception:
            out[p] = 0
    return out


async def test_workers_of_some_partitions_checkpoint_each_partition_where_it_stands(
    nats_server: NatsServer,
) -> None:
    """Two workers of two partitions each (a consumer per partition, read as one): each
    partition's checkpoint is the last sequence of its own events, not the highest its
    worker read. One of them stopped, more events stored, and a new worker of its two
    partitions started: each partition resumes from its own checkpoint and every event is
    counted once."""
    async with _four_partitions(nats_server) as (settings, nc):
        load = Load(4000, dup_ratio=0.1, seed=31)
        events = load.events
        first = events[:2000]
        uniques = load.unique_events
        a = Worker(nc, settings, partitions=[0, 1], worker_id="a")
        b = Worker(nc, settings, partitions=[2, 3], worker_id="b")
        await a.start()
        await b.start()
        try:
            load.events = first
            load.unique_events = [e for e in uniques if any(e is f for f in first)]
            await load.publish(nc)
            await _settled(nc, load)
            lasts = await _last_seq_by_partition(nc)
            assert sorted(lasts) == [0, 1, 2, 3] and len(set(lasts.values())) == 4
            await eventually(lambda: _checkpoints(nc), lambda c: c == lasts)
            await a.stop()
            load.events = events[2000:]
            await load.publish(nc)
            load.events, load.unique_events = events, uniques
            a = Worker(nc, settings, partitions=[0, 1], worker_id="a2")
            await a.start()
            await _settled(nc, load)
            lasts = await _last_seq_by_partition(nc)
            await eventually(lambda: _checkpoints(nc), lambda c: c == lasts)
        finally:
            await a.stop()
            await b.stop()


async def test_replaying_the_whole_stream_changes_nothing(nc: Client, settings: Settings) -> None:
    """Checkpoints wiped and every event read again: the readings stay as they were."""
    await create_meters(nc)
    load = Load(2000, seed=3)
    w = Worker(nc, settings, partitions=[0, 1])
    await w.start()
    await load.publish(nc)
    await _settled(nc, load)
    await w.stop()
    offsets = await nc.jetstream().key_value("offsets")
    for p in range(settings.partitions):
        await offsets.delete(f"partition.{p}")
    w2 = Worker(nc, settings, partitions=[0, 1])
    await w2.start()
    try:

        async def replayed() -> int:
            return w2.stats.events

        await eventually(replayed, lambda n: n >= len(load.unique_events))
        assert await actual(nc) == load.expected()
        assert w2.stats.writes == 0
    finally:
        await w2.stop()


async def _applied_position(nc: Client, partitions: int) -> int:
    offsets = await nc.jetstream().key_value("offsets")
    total = 0
    for p in range(partitions):
        try:
            total += msgspec.json.decode((await offsets.get(f"partition.{p}")).value)["seq"]
        except Exception:
            pass
    return total


async def _kill_after_progress(nc: Client, worker: WorkerProcess, after: float) -> WorkerProcess:
    """Once the worker's checkpoints of partitions 0 and 1 have moved on, SIGKILL it
    ``after`` seconds later (a random crash point, not a wait) and start it again."""
    seen = await _applied_position(nc, 2)
    await eventually(
        lambda: _applied_position(nc, 2), lambda pos, seen=seen: pos > seen, timeout=60
    )
    await asyncio.sleep(after)
    await worker.kill()
    return await WorkerProcess(worker.env, worker.log_path, *worker.args).start()


@pytest.mark.parametrize(
    ("subjects", "spread_days"),
    [(200, 0), (2000, 30)],
    ids=["live", "wide"],
)
async def test_worker_killed_repeatedly_loses_and_doubles_nothing(
    nc: Client, settings: Settings, tmp_path: Path, subjects: int, spread_days: int
) -> None:
    """20,000 events with 10% duplicates; the worker SIGKILLed 6 times, each time at a random
    moment after it has made progress, and started again. Wide: 2,000 subjects and times over
    30 days, so that most keys are day windows seen once or twice."""
    await create_meters(nc)
    load = Load(20_000, subjects=subjects, dup_ratio=0.1, seed=4, spread_days=spread_days)
    env = {"NATS_URL": settings.nats_url, "METER_PARTITIONS": "2", "METER_BATCH_SIZE": "300"}
    rng = random.Random(4)
    # Paced (about 2,000 events/s), so that all six kills fall while events are arriving.
    publisher = asyncio.create_task(load.publish(nc, pause=0.1))
    worker = await WorkerProcess(env, tmp_path / "worker.log", "--partitions", "0,1").start()
    kills = 0
    try:
        for _ in range(6):
            worker = await _kill_after_progress(nc, worker, rng.uniform(0.0, 0.4))
            kills += 1
        await publisher
        await _settled(nc, load, timeout=120)
    finally:
        await worker.stop()
    assert kills == 6 and load.duplicates > 1500


async def test_worker_killed_between_its_page_writes_and_the_checkpoint(
    nc: Client, settings: Settings, tmp_path: Path
) -> None:
    """A wide backlog (2,000 subjects, times over 30 days) worked through with
    METER_SPILL_MB=0: behind it, the worker writes its pages and readings after every round
    and lets them go, while the checkpoint waits for a flush every 1.5 s. SIGKILLed three
    times at a random moment after a checkpoint, so between keys written and the next
    checkpoint: every event is counted once, in the readings and the day summaries."""
    await create_meters(nc)
    load = Load(20_000, subjects=2000, dup_ratio=0.1, seed=6, spread_days=30)
    await load.publish(nc)
    env = {
        "NATS_URL": settings.nats_url,
        "METER_PARTITIONS": "2",
        "METER_BATCH_SIZE": "300",
        "METER_SPILL_MB": "0",
        "METER_SUMMARY_FLUSH_MS": "1500",
    }
    log = tmp_path / "worker.log"
    rng = random.Random(6)
    worker = await WorkerProcess(env, log, "--partitions", "0,1").start()
    try:
        for _ in range(3):
            worker = await _kill_after_progress(nc, worker, rng.uniform(0.0, 1.2))
        await _settled(nc, load, timeout=120)
    finally:
        await worker.stop()
    # The last worker, stopped in order, counted the spills it made.
    stopped = [line for line in log.read_text().splitlines() if "worker.stopped" in line]
    spills = re.search(r'"spills": (\d+)', stopped[-1]) if stopped else None
    assert spills is not None and int(spills.group(1)) > 0, stopped
    readings = re.search(r'"reading_spills": (\d+)', stopped[-1])
    assert readings is not None and int(readings.group(1)) > 0, stopped


async def test_nats_server_killed_and_restarted_mid_run(tmp_path: Path) -> None:
    """SIGKILL of nats-server during a run (file storage), restart on the same port: exact."""
    store = tmp_path / "nats"
    server = await NatsServer(store).start()
    port = server.port
    import nats

    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    settings = Settings(nats_url=server.url, partitions=2, lease_ttl=2)
    from kloudmeter_py.store.provision import provision

    await provision(nc.jetstream(), settings)
    await create_meters(nc)
    env = {"NATS_URL": server.url, "METER_PARTITIONS": "2", "METER_LEASE_TTL": "2"}
    worker = await WorkerProcess(env, tmp_path / "worker.log").start()

    async def consuming() -> bool:
        infos = await nc.jetstream().consumers_info("meters")
        return any(c.name and c.name.startswith("meters-w") for c in infos)

    # Killed mid-run, not mid-start: a fresh-clone CI run killed the server while the worker
    # was still making its buckets, and the worker exited with a timeout (then nothing was
    # counted, and the test outran pytest's timeout).
    await eventually(consuming, bool, timeout=30)
    load = Load(8000, dup_ratio=0.1, seed=5)
    publisher = asyncio.create_task(load.publish(nc))
    try:
        await asyncio.sleep(1.0)  # a point mid-run to crash the server at
        server.kill()
        await server.stop()
        server = await NatsServer(store, port=port).start()
        await publisher
        await _settled(nc, load, timeout=120)
    finally:
        await worker.stop()
        await nc.close()
        await server.stop()


async def test_three_workers_then_one_killed_partitions_move(
    nc: Client, tmp_path: Path, nats_server: NatsServer
) -> None:
    """Three worker processes share 6 partitions; one is killed; the others take its share."""
    settings = Settings(nats_url=nats_server.url, stream="multi", partitions=6, lease_ttl=2)
    from kloudmeter_py.store.provision import provision

    await provision(nc.jetstream(), settings)
    await create_meters(nc, "multi_meters")
    env = {
        "NATS_URL": nats_server.url,
        "METER_NATS_STREAM": "multi",
        "METER_PARTITIONS": "6",
        "METER_LEASE_TTL": "2",
    }
    workers = [await WorkerProcess(env, tmp_path / f"w{i}.log").start() for i in range(3)]
    leases = await nc.jetstream().key_value("multi_leases")

    async def owners() -> dict[int, str]:
        out = {}
        for p in range(6):
            try:
                out[p] = (await leases.get(f"partition.{p}")).value.decode()
            except Exception:
                pass
        return out

    try:
        spread = await eventually(
            owners, lambda o: len(o) == 6 and len(set(o.values())) == 3, timeout=30
        )
        load = Load(6000, dup_ratio=0.1, seed=6)
        publisher = asyncio.create_task(load.publish(nc, stream="multi"))
        await asyncio.sleep(0.5)  # a point mid-run to kill at
        victim_id = spread[0]
        await workers[0].kill()
        moved = await eventually(
            owners,
            lambda o: len(o) == 6 and len(set(o.values())) == 2,
            timeout=30,
        )
        assert victim_id in spread.values()
        await publisher
        expected = load.expected()
        got = await eventually(
            lambda: actual(nc, "multi_readings"),
            lambda r: calls_total(r) >= calls_total(expected),
            timeout=60,
        )
        assert got == expected
        assert len(set(moved.values())) == 2
    finally:
        for w in workers:
            await w.stop()


async def test_malformed_events_beside_good_ones_are_dead_lettered_and_counted(
    nc: Client, settings: Settings
) -> None:
    """Not JSON, missing fields, wrong types and huge payloads go to dead letters with reasons;
    the good events are all counted; the numbers add up."""
    await create_meters(nc)
    load = Load(1000, dup_ratio=0.0, seed=7)
    js = nc.jetstream()
    bad = [
        b"not json at all",
        b'{"id": "x1", "eventType": "req"}',
        b'{"id": 5, "eventType": "req", "subject": "customer 1"}',
        msgspec.json.encode(
            {"id": "x3", "eventType": "req", "subject": "customer 1", "data": "text"}
        ),
        msgspec.json.encode(
            {
                "id": "x4",
                "eventType": "req",
                "subject": "customer 1",
                "data": {"v": 1, "region": "eu", "user": "u", "pad": "x" * 200_000},
            }
        )[:150_000],
        msgspec.json.encode(
            {
                "id": "x5",
                "eventType": "req",
                "subject": "customer 1",
                "data": {"v": 1, "region": "eu", "user": "u", "pad": "y" * 200_000},
            }
        ),
    ]
    # Events above the configured size (64 KiB here) are refused, valid JSON or not.
    w = Worker(nc, msgspec.structs.replace(settings, max_body_bytes=65536), partitions=[0, 1])
    await w.start()
    try:
        publisher = asyncio.create_task(load.publish(nc))
        for i, payload in enumerate(bad):
            await js.publish(
                "meters.events.req.=Y3VzdG9tZXIgMQ", payload, headers={"Nats-Msg-Id": f"bad-{i}"}
            )
        await publisher
        await _settled(nc, load)
        info = await eventually(
            lambda: js.stream_info("meters_errors"), lambda i: i.state.messages >= len(bad)
        )
        assert info.state.messages == len(bad)
        reasons = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg("meters_errors", seq)
            reasons.append((msg.headers or {}).get("Kloudmeter-Error", ""))
        assert all(r.startswith("invalid event") for r in reasons), reasons
        assert any("larger than" in r for r in reasons)
    finally:
        await w.stop()


async def test_a_worker_reads_each_partition_from_its_own_checkpoint(
    nc: Client, settings: Settings
) -> None:
    """One consumer reads every partition a worker owns, from the lowest checkpoint: what a
    partition's own, higher checkpoint covers is skipped, not read again."""
    await create_meters(nc)
    load = Load(1500, dup_ratio=0, seed=8)
    w = Worker(nc, settings, partitions=[0, 1])
    await w.start()
    await load.publish(nc)
    await _settled(nc, load)
    await w.stop()
    # Partition 1 read again from the start, partition 0 from where it was.
    offsets = await nc.jetstream().key_value("offsets")
    await offsets.delete("partition.1")
    info = await nc.jetstream().stream_info("meters", subjects_filter="meters.events.1.>")
    in_partition_1 = sum((info.state.subjects or {}).values())
    assert 0 < in_partition_1 < len(load.unique_events)
    last_seq = (await nc.jetstream().stream_info("meters")).state.last_seq
    # Partition 0 is ahead while partition 1 catches up: its checkpoint never goes back.
    written_0: list[int] = []
    watch = await offsets.watch("partition.0", include_history=False)

    async def watch_0() -> None:
        async for entry in watch:
            if entry is not None and entry.value:
                written_0.append(int(msgspec.json.decode(entry.value)["seq"]))

    watching = asyncio.create_task(watch_0())
    w2 = Worker(nc, settings, partitions=[0, 1])
    await w2.start()
    try:

        async def checkpoint_1() -> int:
            try:
                return int(msgspec.json.decode((await offsets.get("partition.1")).value)["seq"])
            except Exception:
                return 0

        # Done once partition 1's checkpoint is back at the end of the stream.
        await eventually(checkpoint_1, lambda seq: seq == last_seq)
        # The round's count is added after its checkpoint is written: wait for it, then
        # check that nothing beyond partition 1's events was read.
        await eventually(lambda: asyncio.sleep(0, w2.stats.events), lambda n: n >= in_partition_1)
        assert w2.stats.events == in_partition_1
        assert w2.stats.writes == 0
        assert await actual(nc) == load.expected()
        await eventually(lambda: asyncio.sleep(0, len(written_0)), lambda n: n >= 2)
        assert min(written_0) == last_seq
    finally:
        watching.cancel()
        await w2.stop()


async def test_a_replay_still_dead_letters_what_a_lagging_partition_never_read(
    nc: Client, settings: Settings
) -> None:
    """Partition 0 applied up to the end, partition 1 not at all; a replay for a new meter
    then reads both. Events of partition 1 are read for the first time, so its bad events
    are dead-lettered (a replay dead-letters again only for the new meter)."""
    from kloudmeter_py.core.meters import CompiledMeter
    from kloudmeter_py.core.models import encoder, meter_in_decoder, validate_meter

    async def meter(body: dict[str, object]) -> CompiledMeter:
        m = validate_meter(meter_in_decoder.decode(msgspec.json.encode(body)))
        await (await nc.jetstream().key_value("meters")).put(m.id, encoder.encode(m))
        return CompiledMeter(m)

    await meter({"id": "total", "eventType": "t", "aggregation": "sum", "valueProperty": "$.v"})
    js = nc.jetstream()
    for i in range(16):
        for n, value in enumerate((1, "bad", 2)):
            body = {"id": f"e{i}-{n}", "eventType": "t", "subject": f"s{i}", "data": {"v": value}}
            await js.publish(f"meters.events.t.s{i}", msgspec.json.encode(body))
    last_seq = (await js.stream_info("meters")).state.last_seq
    info = await js.stream_info("meters", subjects_filter="meters.events.1.>")
    assert info.state.subjects  # some subjects (and their bad events) are in partition 1

    w1 = Worker(nc, settings, partitions=[0])
    await w1.start()
    offsets = await js.key_value("offsets")

    async def checkpoint_0() -> int:
        try:
            return int(msgspec.json.decode((await offsets.get("partition.0")).value)["seq"])
        except Exception:
            return 0

    try:
        await eventually(checkpoint_0, lambda seq: seq == last_seq)
    finally:
        await w1.stop()
    w2 = Worker(nc, settings, partitions=[0, 1])
    await w2.start()
    # A meter added before the runner has read its checkpoints: a replay from the start.
    w2._meter_added(await meter({"id": "calls", "eventType": "t", "aggregation": "count"}))
    try:

        async def dead_for_total() -> int:
            state = (await js.stream_info("meters_errors", subjects_filter=">")).state
            return (state.subjects or {}).get("meters.event-errors.total", 0)

        await eventually(dead_for_total, lambda n: n >= 16)
        await eventually(lambda: actual(nc), lambda r: calls_total(r) == 48)
        assert await dead_for_total() == 16
    finally:
        await w2.stop()
