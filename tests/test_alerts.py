"""Usage alerts live: channels, rules and events through the openmeter SDK against a gateway,
a worker and nats-server; a webhook receiver started here gets each threshold alert under one
event id, signed, through worker SIGKILLs, a failing receiver and a gateway restart."""

import asyncio
import random
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from corehttp.exceptions import HttpResponseError, ResourceNotFoundError
from nats.aio.client import Client
from openmeter.aio import Client as OpenMeter

from kloudmeter_py.config import Settings
from kloudmeter_py.core.alerts import Threshold, reset_event_id, threshold_event_id, verify
from kloudmeter_py.gateway import create_app
from kloudmeter_py.gateway.deliveries import DELIVERER, Deliverer
from kloudmeter_py.store.alerts import AlertStore
from kloudmeter_py.store.entitlements import (
    EntitlementRecord,
    EntitlementStore,
    FeatureRecord,
    GrantRecord,
    Period,
    ResetRecord,
    new_id,
)
from kloudmeter_py.store.layout import Layout
from kloudmeter_py.worker import Worker
from kloudmeter_py.worker.alerts import month_start
from tests.conftest import eventually
from tests.helpers import Http
from tests.load import WorkerProcess


@dataclass
class Receiver:
    """A webhook receiver: records every delivery (event id, status answered, signature
    valid); answers 500 while ``failing``."""

    secret: str = ""
    failing: bool = False
    got: list[tuple[str, int, bool, dict[str, Any]]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        eid = request.headers["webhook-id"]
        valid = (
            verify(
                self.secret,
                eid,
                int(request.headers["webhook-timestamp"]),
                body,
                request.headers["webhook-signature"],
            )
            and request.headers.get("X-Tenant") == "ops"
        )
        status = 500 if self.failing else 200
        self.got.append((eid, status, valid, msgspec.json.decode(body)))
        return web.Response(status=status)

    def ok(self) -> set[str]:
        return {eid for eid, status, _, _ in self.got if status == 200}

    async def delivered(self) -> set[str]:
        return self.ok()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    app = web.Application()
    app.router.add_post("/hook", r.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    r.url = f"http://{host}:{port}/hook"
    yield r
    await runner.cleanup()


def _gateway(settings: Settings, nc: Client) -> TestClient[Any, Any]:
    """A gateway whose deliveries are tried often: every 0.1 s, retries 0.2 s apart
    doubling up to 1 s, and a claim (a send a stopped gateway may not have finished) lasting
    2 s."""
    app = create_app(settings, nc)
    store = AlertStore(nc.jetstream(), settings, create=False)
    app[DELIVERER] = Deliverer(store, tick=0.1, first_retry=0.2, most_retry=1.0, lease=2.0)
    return TestClient(TestServer(app, host="127.0.0.1"))


@pytest.fixture
async def http(nc: Client, settings: Settings) -> AsyncIterator[Http]:
    async with _gateway(settings, nc) as client:
        yield client


def _sdk(http: Http) -> Any:
    """The SDK client, untyped: it takes the JSON bodies as plain dicts."""
    return OpenMeter(endpoint=str(http.make_url("")).rstrip("/"), retry_total=0)


def _event(i: int, subject: str, tokens: int) -> dict[str, Any]:
    return {
        "id": f"a-{i}",
        "source": "tests",
        "specversion": "1.0",
        "type": "prompt",
        "subject": subject,
        "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "data": {"tokens": tokens},
    }


async def _setup(
    om: Any,
    r: Receiver,
    nc: Client,
    settings: Settings,
    thresholds: list[Threshold],
    grant: float,
    subject: str = "acme",
) -> str:
    """The meter, feature "tokens" with a monthly entitlement of ``subject`` granted
    ``grant``, a channel to ``r`` and a rule with ``thresholds``: the rule's id."""
    await om.meters.create(
        {"slug": "tokens", "aggregation": "SUM", "eventType": "prompt", "valueProperty": "$.tokens"}
    )
    now = datetime.now(UTC)
    store = EntitlementStore(nc.jetstream(), Layout(settings))
    feature = await store.create_feature(
        FeatureRecord(
            id=new_id(),
            key="tokens",
            name="Tokens",
            createdAt=now,
            updatedAt=now,
            meterSlug="tokens",
        )
    )
    ent = await store.create_entitlement(
        EntitlementRecord(
            id=new_id(),
            type="metered",
            subjectKey=subject,
            featureId=feature.id,
            featureKey=feature.key,
            createdAt=now,
            updatedAt=now,
            usagePeriod=Period("MONTH", month_start(now)),
            measureUsageFrom=month_start(now),
        )
    )
    await store.create_grant(
        GrantRecord(
            id=new_id(),
            entitlementId=ent.id,
            amount=grant,
            priority=1,
            effectiveAt=month_start(now),
            createdAt=now,
            updatedAt=now,
        )
    )
    channel = await om.notification_channels.create(
        {"type": "WEBHOOK", "name": "ops", "url": r.url, "customHeaders": {"X-Tenant": "ops"}}
    )
    assert channel["signingSecret"].startswith("whsec_")
    r.secret = channel["signingSecret"]
    rule = await om.notification_rules.create(
        {
            "type": "entitlements.balance.threshold",
            "name": "tokens used",
            "channels": [channel["id"]],
            "thresholds": [{"type": t.type, "value": t.value} for t in thresholds],
            "features": ["tokens"],
        }
    )
    return str(rule["id"])


def _ids(rule: str, subject: str, thresholds: list[Threshold]) -> set[str]:
    start = month_start(datetime.now(UTC))
    return {threshold_event_id(rule, subject, start, t) for t in thresholds}


THREE = [Threshold("NUMBER", 10), Threshold("PERCENT", 50), Threshold("NUMBER", 30)]


async def test_a_customers_entitlement_alerts_on_the_usage_of_all_its_subjects(
    http: Http, worker: Worker, receiver: Receiver, nc: Client, settings: Settings
) -> None:
    """A customer's entitlement counts every subject the customer owns: usage split over two
    of them crosses its threshold, and the one alert is the customer's (none per subject)."""
    async with _sdk(http) as om:
        await om.customers.create(
            {
                "key": "acme-co",
                "name": "Acme",
                "usageAttribution": {"subjectKeys": ["acme-eu", "acme-us"]},
            }
        )
        ten = [Threshold("NUMBER", 10)]
        rule_id = await _setup(om, receiver, nc, settings, ten, grant=20, subject="acme-co")
        await om.events.ingest_event(_event(1, "acme-eu", 6))
        await eventually(worker_rounds(worker), lambda n: n >= 1)
        await om.events.ingest_event(_event(2, "acme-us", 6))  # 12 for the customer: past 10
        expected = _ids(rule_id, "acme-co", ten)
        await eventually(receiver.delivered, lambda d: d == expected)
        await om.events.ingest_event(_event(3, "acme-eu", 1))
        await eventually(lambda: _checkpointed(nc), bool)  # its alert check is done too
        events = await om.notification_events.list()
        assert [e["payload"]["data"]["subject"]["key"] for e in events["items"]] == ["acme-co"]
        assert events["items"][0]["payload"]["data"]["value"]["usage"] == 12


async def test_channels_rules_and_events_through_the_sdk(
    http: Http, worker: Worker, receiver: Receiver, nc: Client, settings: Settings
) -> None:
    """Channel and rule CRUD, an alert per threshold crossed (two in one round), signed and
    delivered once each, listed and fetched as events, resent on request."""
    async with _sdk(http) as om:
        rule_id = await _setup(om, receiver, nc, settings, THREE, grant=40)
        channels = await om.notification_channels.list()
        assert channels["totalCount"] == 1
        channel = channels["items"][0]
        renamed = await om.notification_channels.update(
            channel["id"],
            {
                "type": "WEBHOOK",
                "name": "ops-2",
                "url": receiver.url,
                "customHeaders": {"X-Tenant": "ops"},
            },
        )
        assert renamed["name"] == "ops-2" and renamed["signingSecret"] == receiver.secret  # kept
        rule = await om.notification_rules.get(rule_id)
        assert [(t["type"], t["value"]) for t in rule["thresholds"]] == [
            ("NUMBER", 10),
            ("PERCENT", 50),
            ("NUMBER", 30),
        ]
        assert [c["id"] for c in rule["channels"]] == [channel["id"]]
        assert [f["key"] for f in rule["features"]] == ["tokens"]
        assert (await om.notification_rules.list(feature=["tokens"]))["totalCount"] == 1
        assert (await om.notification_rules.list(feature=["other"]))["totalCount"] == 0
        with pytest.raises(ResourceNotFoundError):
            await om.notification_rules.get("01UNKNOWNRULE0000000000000")
        with pytest.raises(HttpResponseError) as bad:
            await om.notification_rules.create(
                {
                    "type": "entitlements.balance.threshold",
                    "name": "x",
                    "channels": ["nope"],
                    "thresholds": [{"type": "NUMBER", "value": 1}],
                }
            )
        assert bad.value.status_code == 400 and "channels" in str(bad.value)
        with pytest.raises(HttpResponseError) as bad:
            await om.notification_channels.create(
                {"type": "WEBHOOK", "name": "x", "url": "ftp://h"}
            )
        assert bad.value.status_code == 400 and "url" in str(bad.value)

        await om.events.ingest_event(_event(1, "acme", 5))
        await om.events.ingest_event(_event(2, "acme", 7))  # 12: past 10
        await eventually(receiver.delivered, lambda d: len(d) == 1)
        await om.events.ingest_events([_event(3, "acme", 20), _event(4, "globex", 3)])  # 32
        expected = _ids(rule_id, "acme", THREE)
        await eventually(receiver.delivered, lambda d: d == expected)

        events = await eventually(
            om.notification_events.list,
            lambda p: all(s["state"] == "SUCCESS" for e in p["items"] for s in e["deliveryStatus"]),
        )
        assert {e["id"] for e in events["items"]} == expected
        first = await om.notification_events.get(min(expected))
        assert first["type"] == "entitlements.balance.threshold"
        assert first["rule"]["id"] == rule_id
        assert first["payload"]["data"]["subject"]["key"] == "acme"
        assert first["payload"]["data"]["feature"]["key"] == "tokens"
        assert first["deliveryStatus"][0]["channel"]["id"] == channel["id"]
        assert (await om.notification_events.list(subject=["globex"]))["totalCount"] == 0
        assert (await om.notification_events.list(feature=["tokens"]))["totalCount"] == 3
        # The PERCENT 50 alert (20 of the 40 granted) was made in the round that reached 32.
        half = threshold_event_id(rule_id, "acme", month_start(datetime.now(UTC)), THREE[1])
        data = (await om.notification_events.get(half))["payload"]["data"]
        assert data["threshold"] == {"type": "PERCENT", "value": 50}
        assert (data["value"]["usage"], data["value"]["balance"]) == (32, 8)
        assert data["value"]["totalAvailableGrantAmount"] == 40
        assert data["entitlement"]["subjectKey"] == "acme"
        sent = [body for eid, _, _, body in receiver.got if eid == half]
        assert sent and sent[0]["data"]["value"]["usage"] == 32
        assert all(valid for _, _, valid, _ in receiver.got)
        assert len(receiver.got) == 3  # one delivery each

        await om.notification_events.resend(min(expected), {})
        await eventually(lambda: _count(receiver), lambda n: n == 4)
        assert receiver.got[-1][0] == min(expected)

        await om.notification_rules.delete(rule_id)
        with pytest.raises(ResourceNotFoundError):
            await om.notification_rules.get(rule_id)
        await om.notification_channels.delete(channel["id"])
    assert worker.alerts is not None and worker.alerts.created == 3
    assert worker.stats.restarts == 0  # making alerts never failed a round


async def _count(r: Receiver) -> int:
    return len(r.got)


async def test_a_crash_before_the_alerts_are_made_reads_the_round_again(
    http: Http, worker: Worker, receiver: Receiver, nc: Client, settings: Settings
) -> None:
    """The worker fails after storing a round and before making its alerts: the round is read
    again from the checkpoint (the alert hook runs before it is written) and the alert is
    made then, once."""
    alerts = worker.alerts
    assert alerts is not None
    real = alerts.after_round
    failures = 0

    async def fail_once(touched: Mapping[str, Collection[str]]) -> None:
        nonlocal failures
        if failures == 0 and any(touched.values()):
            failures += 1
            raise RuntimeError("died between storing the round and making its alerts")
        await real(touched)

    alerts.after_round = fail_once  # type: ignore[method-assign]
    async with _sdk(http) as om:
        rule_id = await _setup(om, receiver, nc, settings, [Threshold("NUMBER", 10)], 100)
        await om.events.ingest_event(_event(1, "acme", 15))
        expected = _ids(rule_id, "acme", [Threshold("NUMBER", 10)])
        await eventually(receiver.delivered, lambda d: d == expected)
        assert failures == 1 and worker.stats.restarts >= 1
        assert (await om.notification_events.list())["totalCount"] == 1


async def test_a_reset_alerts_once_and_thresholds_start_over(
    http: Http, worker: Worker, receiver: Receiver, nc: Client, settings: Settings
) -> None:
    """A manual reset makes one entitlements.reset event (at the subject's next usage), and
    starts a new usage period whose thresholds alert again under new ids."""
    ten = [Threshold("NUMBER", 10)]
    async with _sdk(http) as om:
        rule_id = await _setup(om, receiver, nc, settings, ten, 100)
        channel_id = (await om.notification_channels.list())["items"][0]["id"]
        resets = await om.notification_rules.create(
            {
                "type": "entitlements.reset",
                "name": "resets",
                "channels": [channel_id],
                "features": ["tokens"],
            }
        )
        assert "thresholds" not in resets
        await om.events.ingest_event(_event(1, "acme", 15))
        before = _ids(rule_id, "acme", ten)
        await eventually(receiver.delivered, lambda d: d == before)

        store = EntitlementStore(nc.jetstream(), Layout(settings))
        ent = await store.entitlement("acme", "tokens")
        reset_at = datetime.now(UTC).replace(second=0, microsecond=0)  # on a minute
        await store.change_entitlement(
            ent,
            lambda e: msgspec.structs.replace(e, resets=[*e.resets, ResetRecord(at=reset_at)]),
        )
        await om.events.ingest_event(_event(2, "acme", 12))
        reset_id = reset_event_id(resets["id"], "acme", ent.id, reset_at)
        again = threshold_event_id(rule_id, "acme", reset_at, ten[0])
        await eventually(receiver.delivered, lambda d: d == before | {reset_id, again})
        got = await om.notification_events.get(reset_id)
        assert got["type"] == "entitlements.reset"
        assert got["payload"]["data"]["entitlement"]["id"] == ent.id
        assert "threshold" not in got["payload"]["data"]
        await om.events.ingest_event(_event(3, "acme", 1))
        await eventually(worker_rounds(worker), lambda n: n >= 3)
        assert (await om.notification_events.list())["totalCount"] == 3


def worker_rounds(worker: Worker) -> Any:
    async def rounds() -> int:
        return worker.stats.batches

    return rounds


async def _checkpointed(nc: Client) -> bool:
    """Whether the worker's checkpoint covers every stored event (so the alert check of
    the round holding the last one is done: it runs before the checkpoint)."""
    js = nc.jetstream()
    last = (await js.stream_info("meters")).state.last_seq
    offsets = await js.key_value("offsets")
    seqs = []
    for p in range(2):
        try:
            value = (await offsets.get(f"partition.{p}")).value
            seqs.append(int(msgspec.json.decode(value or b"{}")["seq"]))
        except Exception:
            return False
    return bool(min(seqs) >= last)


async def test_each_alert_once_through_worker_kills_failures_and_a_gateway_restart(
    nc: Client, settings: Settings, tmp_path: Path, receiver: Receiver
) -> None:
    """Usage crossing five thresholds while the worker is SIGKILLed three times and the
    receiver answers 500: five events, no more; after a gateway restart the retries deliver
    each, signed, under its one id."""
    receiver.failing = True
    gateway = _gateway(settings, nc)
    await gateway.start_server()
    rng = random.Random(19)
    env = {"NATS_URL": settings.nats_url, "METER_PARTITIONS": "2", "METER_BATCH_SIZE": "200"}
    log = tmp_path / "worker.log"
    worker = await WorkerProcess(env, log, "--partitions", "0,1").start()
    values = [Threshold("NUMBER", 100), Threshold("NUMBER", 200)] + [
        Threshold("PERCENT", p) for p in (60, 80, 100)
    ]
    try:
        async with _sdk(gateway) as om:
            rule_id = await _setup(om, receiver, nc, settings, values, grant=500)
            n = 0
            for step in range(6):
                await om.events.ingest_events([_event(n + i, "acme", 10) for i in range(10)])
                n += 10
                if step % 2 == 1:
                    await asyncio.sleep(rng.uniform(0.0, 1.2))  # a random crash point
                    await worker.kill()
                    worker = await WorkerProcess(env, log, "--partitions", "0,1").start()
            expected = _ids(rule_id, "acme", values)
            events = await eventually(
                om.notification_events.list, lambda p: p["totalCount"] == 5, timeout=30
            )
            assert {e["id"] for e in events["items"]} == expected
            await eventually(lambda: _count(receiver), lambda c: c >= 1, timeout=30)
        assert not receiver.ok()
        await gateway.close()  # mid-retry
        receiver.failing = False
        gateway = _gateway(settings, nc)
        await gateway.start_server()
        await eventually(receiver.delivered, lambda d: d == expected, timeout=30)
        assert {eid for eid, *_ in receiver.got} == expected  # repeats only of the same ids
        assert all(valid for _, _, valid, _ in receiver.got)
        async with _sdk(gateway) as om:
            events = await om.notification_events.list()
            assert events["totalCount"] == 5
            for e in events["items"]:
                (status,) = e["deliveryStatus"]
                assert status["state"] == "SUCCESS"
                assert status["attempts"][-1]["state"] == "SUCCESS"
            # A retried one shows its failed attempts first.
            assert any(
                a["state"] == "FAILED"
                for e in events["items"]
                for a in e["deliveryStatus"][0]["attempts"]
            )
            created = {e["id"]: (e["createdAt"], e["payload"]) for e in events["items"]}
            # A worker started afresh finds every threshold reached and its event there: it
            # makes none again, and changes none (create-if-absent).
            await worker.kill()
            worker = await WorkerProcess(env, log, "--partitions", "0,1").start()
            await om.events.ingest_events([_event(999, "acme", 1)])
            await eventually(lambda: _checkpointed(nc), bool, timeout=30)
            after = await om.notification_events.list()
            assert {e["id"]: (e["createdAt"], e["payload"]) for e in after["items"]} == created
        # The reading is exact through the kills: 601 tokens.
        kv = await nc.jetstream().key_value("readings")
        assert msgspec.json.decode((await kv.get("tokens.acme")).value or b"{}")["value"] == 601
    finally:
        await worker.stop()
        await gateway.close()
