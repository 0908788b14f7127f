"""Corrections applied by the worker, exactly once, through shuffled orders, repeats and
worker SIGKILLs: readings and day summaries equal the events corrected by hand."""

import asyncio
import random
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.client import Client

from kloudmeter_py.config import Settings
from kloudmeter_py.core.corrections import correction_id
from kloudmeter_py.core.keys import event_subject
from kloudmeter_py.core.models import Meter, encoder, meter_in_decoder, validate_meter
from tests.conftest import eventually
from tests.load import METERS as LOAD_METERS
from tests.load import WorkerProcess, actual, day_totals

# load.METERS' count and sum meters, an avg, and a unique and a max (whose states are rebuilt
# from the stream at each correction).
METERS: list[dict[str, Any]] = [
    *(m for m in LOAD_METERS if m["aggregation"] in ("count", "sum")),
    {"id": "mean", "eventType": "req", "aggregation": "avg", "valueProperty": "$.v"},
    {"id": "who", "eventType": "req", "aggregation": "unique", "valueProperty": "$.u"},
    {"id": "top", "eventType": "req", "aggregation": "max", "valueProperty": "$.w"},
]
BASE = 1_795_341_600  # 2026-11-22T10:00:00Z


def _time(rng: random.Random) -> str:
    at = BASE - rng.randrange(3 * 86400)
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Corrected:
    """Events and corrections in one shuffled stream order, and the totals by hand."""

    def __init__(self, n: int, corrections: int, seed: int) -> None:
        rng = random.Random(seed)
        self.rng = rng
        self.events = [
            {
                "id": f"ev-{i}",
                "eventType": "req",
                "subject": f"c{rng.randrange(12)}",
                "time": _time(rng),
                "data": {
                    "v": rng.randint(1, 100),
                    "region": rng.choice(["eu", "us"]),
                    "u": f"u{rng.randrange(300)}",
                    "w": rng.randrange(100_000),
                },
            }
            for i in range(n)
        ]
        # A correction names an event published before it: its place in the stream is
        # drawn after its original's (ops are (kind, payload)).
        self.ops: list[tuple[str, Any]] = [("event", e) for e in self.events]
        for _ in range(corrections):
            i = rng.randrange(n)
            j = next(
                k for k, op in enumerate(self.ops) if op[0] == "event" and op[1] is self.events[i]
            )
            place = rng.randrange(j + 1, len(self.ops) + 1)
            if rng.random() < 0.35:
                op = ("cancel", {"of": i})
            else:
                data = {
                    "v": rng.randint(1, 100),
                    "region": rng.choice(["eu", "us"]),
                    "u": f"u{rng.randrange(300)}",
                    "w": rng.randrange(100_000),
                }
                op = ("amend", {"of": i, "data": data, "time": _time(rng)})
            op[1]["by_seq"] = rng.random() < 0.5  # else the worker finds it by id
            op[1]["repeat"] = rng.random() < 0.15  # published twice (a retry)
            self.ops.insert(place, op)
        self.seqs: dict[int, int] = {}  # event index -> stream seq
        self.last_correction: dict[int, int] = {}  # event index -> its last correction's seq

    async def publish(self, nc: Client) -> None:
        js = nc.jetstream(timeout=10)
        for kind, payload in self.ops:
            if kind == "event":
                subject = event_subject("meters", "req", payload["subject"])
                ack = await js.publish(
                    subject, msgspec.json.encode(payload), headers={"Nats-Msg-Id": payload["id"]}
                )
                self.seqs[int(payload["id"].split("-")[1])] = ack.seq
                continue
            original = self.events[payload["of"]]
            seq = self.seqs[payload["of"]]
            when = datetime.fromisoformat(payload["time"]) if kind == "amend" else None
            cid = correction_id(
                seq,
                kind,  # type: ignore[arg-type]
                payload.get("data"),
                when,
                after=self.last_correction.get(payload["of"], 0),
            )
            body: dict[str, Any] = {
                "id": cid,
                "eventType": "req",
                "subject": original["subject"],
                "correction": {"action": kind, "of": original["id"]},
            }
            if payload["by_seq"]:
                body["correction"]["seq"] = seq
            if kind == "amend":
                body["data"] = payload["data"]
                body["time"] = payload["time"]
            subject = event_subject("meters", "req", original["subject"])
            for attempt in range(2 if payload["repeat"] else 1):
                # a retry within the duplicate window, then one after it (a new message id)
                msg_id = cid if attempt == 0 else f"{cid}.again"
                ack = await js.publish(
                    subject, encoder.encode(body), headers={"Nats-Msg-Id": msg_id}
                )
                assert not ack.duplicate
                if attempt == 0:
                    self.last_correction[payload["of"]] = ack.seq

    def current(self) -> list[dict[str, Any]]:
        """Every event as it counts after the corrections, in stream order."""
        now: dict[int, dict[str, Any] | None] = {i: e for i, e in enumerate(self.events)}
        for kind, payload in self.ops:
            if kind == "cancel":
                now[payload["of"]] = None
            elif kind == "amend":
                e = self.events[payload["of"]]
                now[payload["of"]] = {**e, "data": payload["data"], "time": payload["time"]}
        return [e for e in now.values() if e is not None]

    def by_day(self) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int]]:
        """Events counted per (UTC day, subject), and per day over all subjects."""
        per: Counter[tuple[str, str]] = Counter()
        total: Counter[tuple[str, str]] = Counter()
        for e in self.current():
            per[(e["time"][:10], e["subject"])] += 1
            total[(e["time"][:10], "")] += 1
        return dict(per), dict(total)

    def top_by_day(self) -> dict[tuple[str, str], int]:
        """The largest w per UTC day over all subjects."""
        top: dict[tuple[str, str], int] = {}
        for e in self.current():
            day = (e["time"][:10], "")
            top[day] = max(top.get(day, -1), e["data"]["w"])
        return top

    def expected(self) -> dict[tuple[str, str, tuple[Any, ...]], Any]:
        count: Counter[str] = Counter()
        total: Counter[tuple[str, str]] = Counter()
        values: dict[str, int] = Counter()
        who: dict[str, set[str]] = {}
        top: dict[str, int] = {}
        for e in self.current():
            who.setdefault(e["subject"], set()).add(e["data"]["u"])
            top[e["subject"]] = max(top.get(e["subject"], -1), e["data"]["w"])
            count[e["subject"]] += 1
            total[(e["subject"], e["data"]["region"])] += e["data"]["v"]
            values[e["subject"]] += e["data"]["v"]
        out: dict[tuple[str, str, tuple[Any, ...]], Any] = {}
        for s, c in count.items():
            out[("calls", s, ())] = c
            out[("mean", s, ())] = values[s] / c
            out[("who", s, ())] = len(who[s])
            out[("top", s, ())] = top[s]
        for (s, r), v in total.items():
            out[("bytes", s, (r,))] = v
        return out


def _comparable(readings: dict[tuple[str, str, tuple[Any, ...]], Any]) -> dict[Any, Any]:
    """Readings of the corrected meters that count something (a fully cancelled series
    reads 0 / no average)."""
    return {k: v for k, v in readings.items() if v}


async def _meters(nc: Client) -> None:
    kv = await nc.jetstream().key_value("meters")
    for body in METERS:
        meter: Meter = validate_meter(meter_in_decoder.decode(msgspec.json.encode(body)))
        await kv.put(meter.id, encoder.encode(meter))


async def test_corrections_apply_once_through_shuffles_repeats_and_worker_kills(
    nc: Client, settings: Settings, tmp_path: Path, http: Any
) -> None:
    """1,500 events, 300 corrections (cancels, amendments moving time and group, several of
    one event, some repeated), published while a worker is SIGKILLed 3 times: the readings
    of every meter (count, sum, avg, unique, max), the day summaries and the query API equal
    the corrected events."""
    await _meters(nc)
    load = Corrected(1500, 300, seed=18)
    env = {"NATS_URL": settings.nats_url, "METER_PARTITIONS": "2", "METER_BATCH_SIZE": "200"}
    publishing = asyncio.create_task(load.publish(nc))
    worker = await WorkerProcess(env, tmp_path / "worker.log", "--partitions", "0,1").start()
    try:
        for _ in range(3):
            await eventually(lambda: _positions(nc), lambda p: p > 0, timeout=60)
            await asyncio.sleep(load.rng.uniform(0.1, 0.6))  # a random crash point
            await worker.kill()
            worker = await WorkerProcess(
                env, tmp_path / "worker.log", "--partitions", "0,1"
            ).start()
        await publishing
        expected = load.expected()
        got = await eventually(
            lambda: actual(nc), lambda r: _comparable(r) == expected, timeout=120
        )
        assert _comparable(got) == expected
        days = await eventually(
            lambda: day_totals(nc),
            lambda r: (
                {k: v for k, v in r.items() if k[0] in ("calls", "bytes", "who") and v}
                == {k: v for k, v in expected.items() if k[0] in ("calls", "bytes", "who")}
            ),
            timeout=60,
        )
        assert {k: v for k, v in days.items() if k[0] in ("calls", "bytes", "who") and v} == {
            k: v for k, v in expected.items() if k[0] in ("calls", "bytes", "who")
        }
        # The query API by day: per subject from the pages, meter-wide from the rollups.
        by_day, totals = load.by_day()
        assert await _queried(http, "calls", "subject") == by_day
        assert await _queried(http, "calls", None) == totals
        # a max meter's meter-wide windows, rebuilt from the partitions' events
        assert await _queried(http, "top", None) == load.top_by_day()
    finally:
        await worker.stop()


async def _queried(http: Any, meter: str, group: str | None) -> dict[tuple[str, str], int]:
    params = [
        ("from", "2026-11-18T00:00:00Z"),
        ("to", "2026-11-23T00:00:00Z"),
        ("windowSize", "DAY"),
    ]
    if group:
        params.append(("groupBy", group))
    resp = await http.get(f"/api/v1/meters/{meter}/query", params=params)
    body = await resp.json()
    assert resp.status == 200, body
    return {
        (row["windowStart"][:10], row.get("subject") or ""): row["value"]
        for row in body["data"]
        if row["value"]
    }


async def _positions(nc: Client) -> int:
    offsets = await nc.jetstream().key_value("offsets")
    total = 0
    for p in range(2):
        try:
            total += msgspec.json.decode((await offsets.get(f"partition.{p}")).value)["seq"]
        except Exception:
            pass
    return total


async def test_an_amendment_repairs_a_dead_lettered_event(
    http: Any, worker: Any, nc: Client
) -> None:
    """An event whose value a sum meter cannot read is dead-lettered; amended, it counts for
    the meter once; its letter is listed as corrected and a replay deletes it as obsolete
    (the original is not folded in beside its amendment)."""
    from tests.helpers import create_meter, publish_event, readings, total_count

    await create_meter(http, id="bytes", eventType="t", aggregation="sum", valueProperty="$.b")
    await publish_event(nc, id="x", eventType="t", subject="s", data={"b": "lots"})
    await publish_event(nc, id="y", eventType="t", subject="s", data={"b": 10})
    await eventually(lambda: readings(http, meter="bytes"), lambda rs: total_count(rs) == 1)

    async def letters() -> list[dict[str, Any]]:
        resp = await http.get("/api/dead-letters/list")
        out: list[dict[str, Any]] = await resp.json()
        return out

    dead = await eventually(letters, lambda d: len(d) == 1)
    original_seq = dead[0]["eventSeq"]
    await publish_event(
        nc,
        id=correction_id(original_seq, "amend", {"b": 5}, None),
        eventType="t",
        subject="s",
        data={"b": 5},
        correction={"action": "amend", "of": "x", "seq": original_seq},
    )
    rs = await eventually(lambda: readings(http, meter="bytes"), lambda rs: total_count(rs) == 2)
    assert rs[0]["value"] == 15
    dead = await eventually(letters, lambda d: bool(d and d[0]["correctedBy"]))
    assert len(dead) == 1 and dead[0]["correctedBy"] == [original_seq + 2]
    resp = await http.post("/api/dead-letters/replay")
    report = await resp.json()
    assert report["obsolete"] == 1 and report["replayed"] == 0
    assert await letters() == []
    assert (await readings(http, meter="bytes"))[0]["value"] == 15
