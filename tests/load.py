"""Load for the exactness tests: events with duplicates, a reference computed in the test, and
worker processes that can be killed."""

import asyncio
import os
import random
import signal
import sys
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.client import Client

from kloudmeter_py.core.keys import event_subject
from kloudmeter_py.core.models import Meter, reading_decoder
from kloudmeter_py.core.summaries import summary_readings
from kloudmeter_py.store.kv import scan
from kloudmeter_py.store.server import die_with_parent

METERS: list[dict[str, Any]] = [
    {"id": "calls", "eventType": "req", "aggregation": "count"},
    {
        "id": "bytes",
        "eventType": "req",
        "aggregation": "sum",
        "valueProperty": "$.v",
        "groupBy": {"region": "$.region"},
    },
    {"id": "users", "eventType": "req", "aggregation": "unique", "valueProperty": "$.user"},
]
REGIONS = ["eu", "us", "ap"]


class Load:
    """Events to publish (with duplicates) and what the readings must be afterwards."""

    def __init__(
        self,
        n: int,
        *,
        subjects: int = 50,
        dup_ratio: float = 0.1,
        seed: int = 1,
        spread_days: int = 0,
    ):
        """``spread_days``: event times spread uniformly over that many days before
        2026-11-22T10:00Z (the wide shape: many day windows per series) instead of all in
        one hour of that day."""
        rng = random.Random(seed)
        base = 1_795_341_600  # 2026-11-22T10:00:00Z
        self.events: list[dict[str, Any]] = []
        uniques: list[dict[str, Any]] = []
        for i in range(n):
            if uniques and rng.random() < dup_ratio:
                self.events.append(rng.choice(uniques))
                continue
            event = {
                "id": f"ev-{seed}-{i}",
                "time": (
                    f"2026-11-22T10:{(i // 60) % 60:02d}:{i % 60:02d}Z"
                    if not spread_days
                    else datetime.fromtimestamp(
                        base - rng.randrange(spread_days * 86400), UTC
                    ).strftime("%Y-%m-%dT%H:%M:%SZ")
                ),
                "eventType": "req",
                "subject": f"customer {rng.randrange(subjects)}",
                "data": {
                    "v": rng.randint(1, 1000),
                    "region": rng.choice(REGIONS),
                    "user": f"u{rng.randrange(40)}",
                },
            }
            uniques.append(event)
            self.events.append(event)
        self.unique_events = uniques
        self.duplicates = n - len(uniques)

    def expected(self) -> dict[tuple[str, str, tuple[Any, ...]], Any]:
        count: Counter[str] = Counter()
        total: Counter[tuple[str, str]] = Counter()
        users: dict[str, set[str]] = defaultdict(set)
        for e in self.unique_events:
            s, d = e["subject"], e["data"]
            count[s] += 1
            total[(s, d["region"])] += d["v"]
            users[s].add(d["user"])
        out: dict[tuple[str, str, tuple[Any, ...]], Any] = {}
        for s, c in count.items():
            out[("calls", s, ())] = c
            out[("users", s, ())] = len(users[s])
        for (s, r), v in total.items():
            out[("bytes", s, (r,))] = v
        return out

    async def publish(
        self, nc: Client, *, chunk: int = 200, stream: str = "meters", pause: float = 0.0
    ) -> None:
        """Publish every event, retrying each until JetStream acknowledges it; ``pause``
        seconds between chunks paces the offered load like a steady producer."""
        js = nc.jetstream(timeout=5)
        for start in range(0, len(self.events), chunk):
            part = self.events[start : start + chunk]
            await asyncio.gather(*(self._publish_one(js, e, stream) for e in part))
            if pause:
                await asyncio.sleep(pause)

    async def _publish_one(self, js: Any, event: dict[str, Any], stream: str) -> None:
        body = msgspec.json.encode(event)
        subject = event_subject(stream, event["eventType"], event["subject"])
        for _ in range(200):
            try:
                await js.publish(subject, body, headers={"Nats-Msg-Id": event["id"]})
                return
            except Exception:
                await asyncio.sleep(0.1)
        raise AssertionError(f"could not publish {event['id']}")


async def actual(
    nc: Client, bucket: str = "readings"
) -> dict[tuple[str, str, tuple[Any, ...]], Any]:
    """The readings in KV, in the same shape as Load.expected()."""
    js = nc.jetstream(timeout=10)
    out: dict[tuple[str, str, tuple[Any, ...]], Any] = {}
    for _, value in await scan(js, bucket):
        r = reading_decoder.decode(value)
        out[(r.meterId, r.subject, tuple(r.groupBy.values()))] = r.value
    return out


async def actual_or_empty(
    nc: Client, bucket: str = "readings"
) -> dict[tuple[str, str, tuple[Any, ...]], Any]:
    """actual(), or nothing while the cluster elects a leader."""
    try:
        return await actual(nc, bucket)
    except Exception:
        return {}


async def day_totals(
    nc: Client, bucket: str = "summaries_day"
) -> dict[tuple[str, str, tuple[Any, ...]], Any]:
    """What the day summaries add up to per series, in the shape of Load.expected(): counts
    and sums added over the windows, unique counts as the size of the union."""
    js = nc.jetstream(timeout=10)
    out: dict[tuple[str, str, tuple[Any, ...]], Any] = {}
    users: dict[tuple[str, str, tuple[Any, ...]], set[str]] = defaultdict(set)
    meters_bucket = bucket.replace("summaries_day", "meters")
    meters = {
        key: msgspec.json.decode(value, type=Meter) for key, value in await scan(js, meters_bucket)
    }
    for key, value in await scan(js, bucket):
        meter = meters.get(key.split(".", 1)[0])
        if meter is None:
            continue
        for r in summary_readings(key, value, meter, 86400):
            rkey = (r.meterId, r.subject, tuple(r.groupBy.values()))
            if r.aggregation == "unique":
                users[rkey].update(r.distinct or ())
            else:
                out[rkey] = out.get(rkey, 0) + (r.value or 0)
    out.update({key: len(values) for key, values in users.items()})
    return out


def calls_total(readings: dict[tuple[str, str, tuple[Any, ...]], Any]) -> int:
    return sum(v for (m, _, _), v in readings.items() if m == "calls")


async def create_meters(nc: Client, meters_bucket: str = "meters") -> None:
    from kloudmeter_py.core.models import encoder, meter_in_decoder, validate_meter

    kv = await nc.jetstream().key_value(meters_bucket)
    for body in METERS:
        meter: Meter = validate_meter(meter_in_decoder.decode(msgspec.json.encode(body)))
        await kv.put(meter.id, encoder.encode(meter))


class WorkerProcess:
    """``kloudmeter worker`` in its own process, so that it can be SIGKILLed."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.env = dict(os.environ, **env)
        self.log_path = log_path
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> "WorkerProcess":
        log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "kloudmeter_py",
            "--log-level",
            "info",
            "worker",
            *self.args,
            env=self.env,
            stdout=log,
            stderr=log,
            preexec_fn=die_with_parent,
        )
        log.close()
        return self

    async def kill(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()

    async def stop(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await self.proc.wait()
            except TimeoutError:
                await self.kill()
