"""A customer's entitlements through the openmeter SDK's customer operations (the paths SDK
1.0.0b236 documents), against a live gateway, worker and nats-server: the usage of every
subject the customer owns counts."""

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from corehttp.exceptions import ResourceNotFoundError
from nats.aio.client import Client
from openmeter.aio import Client as OpenMeter

from kloudmeter_py.config import Settings
from kloudmeter_py.gateway import create_app
from kloudmeter_py.store.server import NatsServer
from kloudmeter_py.worker import Worker
from tests.conftest import eventually
from tests.helpers import Http, readings, total_count


def _iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def _event(i: str, subject: str, tokens: int, t: datetime) -> dict[str, Any]:
    return {
        "id": i,
        "source": "tests",
        "specversion": "1.0",
        "type": "prompt",
        "subject": subject,
        "time": _iso(t),
        "data": {"tokens": tokens},
    }


async def test_customer_entitlement_counts_all_its_subjects(http: Http, worker: Worker) -> None:
    """A customer owning two subjects, a monthly metered entitlement with two grants: the
    balance before and after both subjects' usage, after a reset and after an override, all
    through the SDK's customer entitlement operations (v2, and v1's value)."""
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    base = now - timedelta(minutes=30)
    endpoint = str(http.make_url("")).rstrip("/")
    async with OpenMeter(endpoint=endpoint, retry_total=0) as om:
        await om.meters.create(
            {
                "slug": "tokens",
                "aggregation": "SUM",
                "eventType": "prompt",
                "valueProperty": "$.tokens",
            }
        )
        await om.features.create({"key": "gpt_tokens", "name": "GPT", "meterSlug": "tokens"})
        acme = await om.customers.create(
            {"name": "ACME", "key": "acme", "usageAttribution": {"subjectKeys": ["acme-web"]}}
        )
        ent = await om.customer_entitlements_v2.post(
            "acme",
            {
                "type": "metered",
                "featureKey": "gpt_tokens",
                "usagePeriod": {"interval": "MONTH", "anchor": _iso(base)},
                "measureUsageFrom": _iso(base),
            },
        )
        assert ent["customerId"] == acme.id  # type: ignore[index]
        ent_id = ent["id"]  # type: ignore[index]
        for amount, priority, rollover in ((100, 1, 100), (50, 2, 0)):
            await om.customer_entitlement_v2.create_customer_entitlement_grant(
                acme.id,
                "gpt_tokens",
                {
                    "amount": amount,
                    "priority": priority,
                    "effectiveAt": _iso(base),
                    "expiration": {"duration": "YEAR", "count": 1},
                    "minRolloverAmount": rollover,
                    "maxRolloverAmount": rollover,
                },
            )
        grants = await om.customer_entitlement_v2.get_grants("acme", "gpt_tokens")
        assert grants.total_count == 2

        value = await om.customer_entitlement_v2.get_customer_entitlement_value("acme", ent_id)
        assert (value.has_access, value.balance, value.usage) == (True, 150, 0)

        await om.events.ingest_events(
            [
                _event("w1", "acme", 30, base + timedelta(minutes=5)),  # the key is a subject
                _event("w2", "acme-web", 90, base + timedelta(minutes=10)),
                _event("x1", "other", 1000, base + timedelta(minutes=10)),
            ]
        )
        await eventually(lambda: readings(http, meter="tokens"), lambda r: total_count(r) == 3)
        value = await om.customer_entitlement_v2.get_customer_entitlement_value(
            "acme", "gpt_tokens"
        )
        assert (value.balance, value.usage, value.overage) == (30, 120, 0)
        v1 = await om.customer_entitlement.get_customer_entitlement_value(acme.id, "gpt_tokens")
        assert (v1.balance, v1.usage) == (30, 120)
        history = await om.customer_entitlement_v2.get_customer_entitlement_history(
            "acme", ent_id, window_size="DAY", from_parameter=base, to=now
        )
        assert sum(w.usage for w in history.windowed_history) == 120

        await om.customer_entitlement_v2.reset_customer_entitlement(
            "acme", ent_id, {"effectiveAt": _iso(now)}
        )
        value = await om.customer_entitlement_v2.get_customer_entitlement_value("acme", ent_id)
        assert (value.balance, value.usage) == (100, 0)

        replaced = await om.customer_entitlements_v2.override(
            "acme",
            "gpt_tokens",
            {
                "type": "metered",
                "featureKey": "gpt_tokens",
                "usagePeriod": {"interval": "MONTH"},
                "measureUsageFrom": _iso(base),
                "issue": {"amount": 500},
            },
        )
        assert replaced["id"] != ent_id  # type: ignore[index]
        value = await om.customer_entitlement_v2.get_customer_entitlement_value(
            "acme", "gpt_tokens"
        )
        assert (value.balance, value.usage) == (380, 120)

        listed = await om.customer_entitlements_v2.list("acme")
        assert [e["id"] for e in listed.items_property] == [replaced["id"]]  # type: ignore[index]
        everyone = await om.entitlements_v2.list(customer_keys=["acme"])
        assert everyone.total_count == 1
        assert (await om.grants_v2.list(customer=["acme"])).total_count == 0
        await om.customer_entitlements_v2.delete("acme", "gpt_tokens")
        with pytest.raises(ResourceNotFoundError):
            await om.customer_entitlements_v2.get("acme", "gpt_tokens")


ADMIN_TOKEN = "admin-token-for-customer-entitlements-0123"


async def test_a_customers_user_reads_only_its_own(nc: Client, nats_server: NatsServer) -> None:
    """A user whose tenant is a customer's key reads that customer's entitlement (and one of
    its subjects'), and gets 404 for another customer's, as for an unknown one."""
    settings = Settings(nats_url=nats_server.url, partitions=2, admin_token=ADMIN_TOKEN)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with TestClient(TestServer(create_app(settings, nc))) as http:
        for path, body in (
            ("/api/v1/meters", {"slug": "m", "aggregation": "COUNT", "eventType": "t"}),
            ("/api/v1/features", {"key": "calls", "name": "Calls", "meterSlug": "m"}),
            (
                "/api/v1/customers",
                {"name": "A", "key": "acme", "usageAttribution": {"subjectKeys": ["acme-web"]}},
            ),
            ("/api/v1/customers", {"name": "G", "key": "globex"}),
        ):
            resp = await http.post(path, json=body, headers=admin)
            assert resp.status in (200, 201), await resp.text()
        for key in ("acme", "globex"):
            resp = await http.post(
                f"/api/v2/customers/{key}/entitlements",
                json={
                    "type": "metered",
                    "featureKey": "calls",
                    "usagePeriod": {"interval": "DAY"},
                    "issueAfterReset": 10,
                },
                headers=admin,
            )
            assert resp.status == 201, await resp.text()
        resp = await http.post("/api/users", json={"tenant": "acme"}, headers=admin)
        user = {"Authorization": f"Bearer {(await resp.json())['token']}"}
        for path in (
            "/api/v2/customers/acme/entitlements/calls/value",
            "/api/v1/customers/acme/entitlements/calls/value",
            "/api/v1/subjects/acme/entitlements/calls/value",
        ):
            resp = await http.get(path, headers=user)
            assert resp.status == 200, (path, await resp.text())
        for path in (
            "/api/v2/customers/globex/entitlements/calls/value",
            "/api/v2/customers/nobody/entitlements/calls/value",
            "/api/v1/customers/globex/entitlements/calls/value",
            "/api/v2/customers/globex/entitlements",
        ):
            resp = await http.get(path, headers=user)
            assert resp.status == 404, (path, resp.status)
        page = await (await http.get("/api/v2/entitlements", headers=user)).json()
        assert [e["customerKey"] for e in page["items"]] == ["acme"]
