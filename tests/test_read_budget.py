"""Reads that never stall the process: a turn for the event loop every slice of work, a deadline
that answers 503, reads stopped at shutdown, and a worker that keeps its leases through a read."""

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError
from structlog.testing import capture_logs

import kloudmeter_py.core.query as core_query
from kloudmeter_py.config import Settings
from kloudmeter_py.core.budget import ReadBudget
from kloudmeter_py.core.keys import event_subject
from kloudmeter_py.errors import ReadTimeout, Unavailable
from kloudmeter_py.gateway import create_app
from kloudmeter_py.store.provision import provision
from kloudmeter_py.worker import Worker
from tests.conftest import eventually
from tests.helpers import Http, create_meter, readings, total_count

SUBJECTS = 300
EVENTS = 600  # two per subject, in different hours: 600 hour summaries to read


# -- the budget alone, on a fake clock ----------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _tick(budget: ReadBudget) -> str:
    """Run one tick by hand: "go" (no turn), "turn" (yielded once), or what it raised."""
    coro = budget.tick()
    try:
        coro.send(None)
    except StopIteration:
        return "go"
    except ReadTimeout:
        return "deadline"
    except Unavailable:
        return "stopped"
    with pytest.raises(StopIteration):
        coro.send(None)
    return "turn"


BUDGET_CASES = [
    # (timeout, [(clock at the tick, what the tick does)])
    ("within a slice: no turn", 1.0, [(0.0, "go"), (0.01, "go"), (0.049, "go")]),
    (
        "a turn when a slice is used up, then a new slice",
        1.0,
        [(0.01, "go"), (0.05, "turn"), (0.06, "go"), (0.099, "go"), (0.1, "turn")],
    ),
    ("one long item: a turn at the next tick", 1.0, [(0.3, "turn"), (0.31, "go")]),
    ("past the deadline", 0.2, [(0.1, "turn"), (0.15, "go"), (0.2, "deadline")]),
    ("a deadline inside a slice is not missed", 0.07, [(0.05, "turn"), (0.07, "deadline")]),
    ("no deadline", None, [(0.05, "turn"), (1e6, "turn"), (1e6 + 0.01, "go")]),
    ("a deadline of zero", 0.0, [(0.0, "deadline")]),
]


@pytest.mark.parametrize(
    ("timeout", "ticks"), [c[1:] for c in BUDGET_CASES], ids=[c[0] for c in BUDGET_CASES]
)
def test_budget_turns_and_deadline(timeout: float | None, ticks: list[tuple[float, str]]) -> None:
    """Each tick on a fake clock: cheap in a slice, a turn after one, an error past the deadline."""
    clock = FakeClock()
    budget = ReadBudget(timeout, clock=clock, what="GET /q")
    seen = []
    for at, _ in ticks:
        clock.now = at
        seen.append((at, _tick(budget)))
    assert seen == ticks
    assert budget.turns == sum(1 for _, what in ticks if what == "turn")


def test_budget_errors_say_why() -> None:
    """The deadline error names the read, the setting and what was done; stop names its reason."""
    clock = FakeClock()
    budget = ReadBudget(0.5, clock=clock, what="GET /api/meters/m/query")
    clock.now = 0.01
    assert _tick(budget) == "go"
    clock.now = 0.6
    with pytest.raises(ReadTimeout, match="METER_READ_TIMEOUT_MS") as exc:
        budget.tick().send(None)
    assert exc.value.status == 503
    assert exc.value.message.startswith("GET /api/meters/m/query: the read passed its deadline")
    assert "stopped after 0.600 s" in exc.value.message
    stopped = ReadBudget(None, clock=clock, what="GET /x")
    stopped.stop("the gateway is shutting down")
    with pytest.raises(Unavailable, match="GET /x: stopped: the gateway is shutting down"):
        stopped.tick().send(None)


async def test_a_busy_loop_with_ticks_lets_other_tasks_run() -> None:
    """Another task gets the event loop at least every slice while a loop works a second."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def other() -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(other())
    await asyncio.sleep(0)
    budget = ReadBudget(None)
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        _busy(0.001)  # an item of CPU work
        await budget.tick()
    done.set()
    await task
    assert budget.turns >= 10
    assert max(gaps) < 0.25, max(gaps)  # a slice is 0.05 s; without ticks: the whole second


def _busy(seconds: float) -> None:
    """CPU work standing in for decoding a large value: holds the event loop ``seconds``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


# -- reads over real data -----------------------------------------------------------------


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _yesterday() -> datetime:
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=1)


async def _load(nc: Client, http: Http) -> int:
    """The meter ``calls`` (sum of ``$.n``) and EVENTS events of SUBJECTS subjects over
    yesterday's hours, applied by the worker; the total of ``n``."""
    await create_meter(http, id="calls", eventType="call", aggregation="sum", valueProperty="$.n")
    js = nc.jetstream()
    day = _yesterday()
    total = 0
    publishes = []
    for i in range(EVENTS):
        n = i % 7 + 1
        total += n
        subject = f"customer-{i % SUBJECTS}"
        event = {
            "id": f"e{i}",
            "eventType": "call",
            "subject": subject,
            "time": _iso(day + timedelta(hours=i // SUBJECTS * 12 + i % 12, seconds=i)),
            "data": {"n": n},
        }
        publishes.append(
            js.publish(
                event_subject("meters", "call", subject),
                msgspec.json.encode(event),
                headers={"Nats-Msg-Id": event["id"]},
            )
        )
    await asyncio.gather(*publishes)
    await eventually(
        lambda: readings(http, meter="calls"), lambda rs: total_count(rs) == EVENTS, timeout=60
    )
    return total


def _day_by_hour() -> dict[str, str]:
    day = _yesterday()
    return {"from": _iso(day), "to": _iso(day + timedelta(days=1)), "windowSize": "HOUR"}


@contextlib.asynccontextmanager
async def _gateway(settings: Settings, nc: Client) -> AsyncIterator[Http]:
    async with TestClient(TestServer(create_app(settings, nc))) as client:
        yield client


async def test_a_read_past_its_deadline_answers_503_naming_the_reason(
    nc: Client, settings: Settings, worker: Worker, http: Http
) -> None:
    """With METER_READ_TIMEOUT_MS=1 the all-subject query, the OpenMeter by-subject query and
    the readings list answer 503 saying so; with the default the same query is exact."""
    total = await _load(nc, http)
    resp = await http.get("/api/meters/calls/query", params=_day_by_hour())
    assert resp.status == 200, await resp.text()
    assert sum(row["value"] for row in (await resp.json())["data"]) == total

    hurried = msgspec.structs.replace(settings, read_timeout_ms=1)
    async with _gateway(hurried, nc) as client:
        resp = await client.get("/api/meters/calls/query", params=_day_by_hour())
        assert resp.status == 503
        body = await resp.json()
        assert body["status"] == "error"
        assert body["message"].startswith("GET /api/meters/calls/query: the read passed its")
        assert "deadline of 0.001 s (METER_READ_TIMEOUT_MS)" in body["message"]

        params = {**_day_by_hour(), "groupBy": "subject"}
        resp = await client.get("/api/v1/meters/calls/query", params=params)
        assert resp.status == 503
        assert resp.content_type == "application/problem+json"
        assert "METER_READ_TIMEOUT_MS" in (await resp.json())["detail"]

        resp = await client.get("/api/readings", params={"meter": "calls"})
        assert resp.status == 503
        assert "passed its deadline" in (await resp.json())["message"]


@pytest.fixture
def slow_merge(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Every summary window a query merges costs 8 ms of CPU (a slow step injected in the
    merge); returns how many were merged so far."""
    calls = 0
    real = core_query._MERGES["sum"]  # the meter of these tests sums

    def slow(acc: Any, cell: Any) -> None:
        nonlocal calls
        calls += 1
        _busy(0.008)
        real(acc, cell)

    monkeypatch.setitem(core_query._MERGES, "sum", slow)
    return lambda: calls


async def test_the_worker_keeps_its_leases_through_a_long_read(
    nats_server: Any, slow_merge: Callable[[], int]
) -> None:
    """Gateway and worker in one event loop, as `kloudmeter up` runs them: a query that works
    for more than twice the lease TTL neither loses a lease nor restarts the worker's reader,
    and its answer is exact."""
    settings = Settings(
        nats_url=nats_server.url, partitions=4, lease_ttl=2, batch_size=200, summary_flush_ms=0
    )
    import nats

    nc = await nats.connect(settings.nats_url)
    await provision(nc.jetstream(), settings)
    worker = Worker(nc, settings)
    await worker.start()
    try:
        async with _gateway(settings, nc) as http:
            total = await _load(nc, http)
            assert worker.leases is not None and sorted(worker.leases.held) == [0, 1, 2, 3]
            before = dict(worker.leases.held)
            runner = worker.runner
            kv = await nc.jetstream().key_value("leases")
            with capture_logs() as logs:
                started = time.monotonic()
                # Split by subject: every subject's pages are read (a meter-wide answer
                # would read the partitions' rollups, far fewer windows).
                resp = await http.get(
                    "/api/v1/meters/calls/query", params={**_day_by_hour(), "groupBy": "subject"}
                )
                took = time.monotonic() - started
                # renewed during the read (a round every TTL/3)
                assert all(worker.leases.held.get(p, 0) > before[p] for p in before)
                # and the round after it finds every lease still its own
                after = await _lease_revisions(kv)
                await eventually(
                    lambda: _lease_revisions(kv), lambda now: all(now[p] > after[p] for p in after)
                )
            assert resp.status == 200, await resp.text()
            assert sum(row["value"] for row in (await resp.json())["data"]) == total
            assert slow_merge() == EVENTS
            assert took > 2 * settings.lease_ttl  # long enough to lose them all, unyielding
            assert [e["event"] for e in logs if e["event"].startswith("lease.")] == []
            assert sorted(worker.leases.held) == [0, 1, 2, 3]
            for p in range(4):
                entry = await kv.get(f"partition.{p}")
                assert entry.value == worker.worker_id.encode()
            assert worker.runner is runner  # its reader never restarted
    finally:
        await worker.stop()
        await nc.close()


async def _lease_revisions(kv: Any) -> dict[int, int]:
    """Revision of each partition's lease key (0: expired)."""
    out = {}
    for p in range(4):
        try:
            out[p] = (await kv.get(f"partition.{p}")).revision
        except KeyNotFoundError:
            out[p] = 0
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_stopping_the_gateway_stops_a_long_read_at_once(
    nc: Client, settings: Settings, worker: Worker, http: Http, slow_merge: Callable[[], int]
) -> None:
    """`kloudmeter up`'s gateway (cli._serving) stops within a second while a read that needs
    ~5 s runs: the read answers 503 "shutting down" (aiohttp alone would wait up to 60 s)."""
    from kloudmeter_py.cli import _serving

    await _load(nc, http)
    served = msgspec.structs.replace(settings, http_port=_free_port())
    url = f"http://127.0.0.1:{served.http_port}/api/v1/meters/calls/query"
    async with aiohttp.ClientSession() as session:
        serving = _serving(served, nc)
        await serving.__aenter__()
        # Split by subject: every subject's pages (~5 s with the slow merge).
        request = asyncio.create_task(
            session.get(url, params={**_day_by_hour(), "groupBy": "subject"})
        )
        await eventually(lambda: _value(slow_merge()), lambda n: n > 0)
        started = time.monotonic()
        await serving.__aexit__(None, None, None)
        took = time.monotonic() - started
        resp = await request
        assert resp.status == 503
        body = await resp.json()  # (OpenMeter's routes answer a problem: "detail")
        assert "shutting down" in body.get("message", body.get("detail", "")), body
    assert took < 1.5, took
    assert slow_merge() < EVENTS  # the read did not run to its end


async def _value(n: int) -> int:
    return n
