"""Features, subject entitlements and grants through the official openmeter SDK, unchanged,
against a live gateway, worker and nats-server.

SDK 1.0.0b236 shadows its subject-entitlement operations class (``client.subjects`` is the
subjects one), so those calls are made with the SDK's own request builders for those paths,
sent through the SDK client's pipeline; features, ``entitlements.list/get`` and
``grants.list/delete`` are the SDK's operations.
"""

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from corehttp.exceptions import HttpResponseError, ResourceNotFoundError
from corehttp.rest import HttpRequest
from nats.aio.client import Client
from openmeter._generated.operations import _operations as ops
from openmeter.aio import Client as OpenMeter
from openmeter.models import EntitlementGrant, EntitlementMetered, EntitlementValue

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


class Sdk:
    """The SDK client, and its request builders for the shadowed subject operations."""

    def __init__(self, om: OpenMeter) -> None:
        self.om = om

    async def send(self, request: HttpRequest, status: int) -> Any:
        resp = await self.om.send_request(request)
        if resp.status_code == 204 == status:
            return None
        await resp.read()
        assert resp.status_code == status, resp.text()
        return resp.json()

    async def value(self, subject: str, ent: str, at: datetime | None = None) -> EntitlementValue:
        req = ops.build_subjects_get_entitlement_value_request(subject, ent, time=at)
        return EntitlementValue(await self.send(req, 200))


async def test_monthly_limit_with_two_grants_through_the_sdk(http: Http, worker: Worker) -> None:
    """A metered entitlement with a monthly usage period and two grants: the balance before
    and after usage, after a reset (one grant rolls over), and after an override."""
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    base = now - timedelta(minutes=30)
    endpoint = str(http.make_url("")).rstrip("/")
    async with OpenMeter(endpoint=endpoint, retry_total=0) as om:
        sdk = Sdk(om)
        await om.meters.create(
            {
                "slug": "tokens",
                "aggregation": "SUM",
                "eventType": "prompt",
                "valueProperty": "$.tokens",
            }
        )
        feature = await om.features.create(
            {"key": "gpt_tokens", "name": "GPT tokens", "meterSlug": "tokens"}
        )
        assert (await om.features.get("gpt_tokens")).id == feature.id
        assert [f["key"] for f in await om.features.list()] == ["gpt_tokens"]  # type: ignore[index]

        created = await sdk.send(
            ops.build_subjects_post_request(
                "acme",
                json={
                    "type": "metered",
                    "featureKey": "gpt_tokens",
                    "usagePeriod": {"interval": "MONTH", "anchor": _iso(base)},
                    "measureUsageFrom": _iso(base),
                },
            ),
            201,
        )
        ent = EntitlementMetered(created)
        assert (ent.type, ent.subject_key, ent.feature_key) == ("metered", "acme", "gpt_tokens")
        assert ent.current_usage_period.from_property == base
        assert ent.measure_usage_from == base
        # The SDK's own entitlement operations see it.
        got = await om.entitlements.get(ent.id)
        assert got["id"] == ent.id  # type: ignore[index]
        listed = await om.entitlements.list(subject=["acme"])
        assert [e["id"] for e in listed] == [ent.id]  # type: ignore[index]

        grants = {}
        for name, amount, priority, rollover in (("main", 100, 1, 100), ("extra", 50, 2, 0)):
            body = {
                "amount": amount,
                "priority": priority,
                "effectiveAt": _iso(base),
                "expiration": {"duration": "YEAR", "count": 1},
                "minRolloverAmount": rollover,
                "maxRolloverAmount": rollover,
            }
            req = ops.build_subjects_create_grant_request("acme", "gpt_tokens", json=body)
            grants[name] = EntitlementGrant(await sdk.send(req, 201))
        assert grants["main"].expires_at == datetime(
            base.year + 1, base.month, base.day, base.hour, base.minute, tzinfo=UTC
        )

        before = await sdk.value("acme", "gpt_tokens")
        assert (before.has_access, before.balance, before.usage, before.overage) == (
            True,
            150,
            0,
            0,
        )

        # 30 then 90 tokens: the first grant (priority 1) burns first, then the second.
        await om.events.ingest_events(
            [
                _event("u1", "acme", 30, base + timedelta(minutes=5)),
                _event("u2", "acme", 90, base + timedelta(minutes=10)),
                _event("g1", "globex", 1000, base + timedelta(minutes=10)),  # not acme's
            ]
        )
        await eventually(lambda: readings(http, meter="tokens"), lambda r: total_count(r) == 3)
        after = await sdk.value("acme", ent.id)
        assert (after.has_access, after.balance, after.usage, after.overage) == (True, 30, 120, 0)
        earlier = await sdk.value("acme", ent.id, base + timedelta(minutes=7))
        assert (earlier.balance, earlier.usage) == (120, 30)

        history = await sdk.send(
            ops.build_subjects_get_entitlement_history_request(
                "acme", ent.id, window_size="HOUR", from_parameter=base, to=now
            ),
            200,
        )
        assert sum(w["usage"] for w in history["windowedHistory"]) == 120
        assert history["windowedHistory"][0]["balanceAtStart"] == 150
        # Per grant over the segments (how many segments there are depends on the edges of
        # the history's windows and of the summaries it reads, so on the time of day).
        burnt: dict[str, float] = {}
        for segment in history["burndownHistory"]:
            for u in segment["grantUsages"]:
                burnt[u["grantId"]] = burnt.get(u["grantId"], 0) + u["usage"]
        assert burnt == {grants["main"].id: 100, grants["extra"].id: 20}

        # A reset: usage starts again; "main" rolls over to its 100, "extra" is lost.
        await sdk.send(
            ops.build_subjects_reset_request("acme", ent.id, json={"effectiveAt": _iso(now)}),
            204,
        )
        reset = await sdk.value("acme", ent.id)
        assert (reset.balance, reset.usage, reset.overage) == (100, 0, 0)
        await om.events.ingest_event(_event("u3", "acme", 7, now))
        await eventually(lambda: readings(http, meter="tokens"), lambda r: total_count(r) == 4)
        assert (await sdk.value("acme", ent.id)).balance == 93

        # An override: a new entitlement with 500 issued each period; the old grants go.
        override = await sdk.send(
            ops.build_subjects_override_request(
                "acme",
                "gpt_tokens",
                json={
                    "type": "metered",
                    "featureKey": "gpt_tokens",
                    "usagePeriod": {"interval": "MONTH"},
                    "measureUsageFrom": _iso(now),
                    "issueAfterReset": 500,
                },
            ),
            201,
        )
        assert override["id"] != ent.id
        # No anchor given: the periods run from measureUsageFrom.
        assert override["usagePeriod"]["anchor"] == _iso(now)
        replaced = await sdk.value("acme", "gpt_tokens")
        assert (replaced.balance, replaced.usage) == (493, 7)
        with pytest.raises(ResourceNotFoundError):
            await om.entitlements.get(ent.id)

        # Grants: listed and voided through the SDK's grants operations.
        extra = {
            "amount": 10,
            "effectiveAt": _iso(now),
            "expiration": {"duration": "DAY", "count": 1},
        }
        req = ops.build_subjects_create_grant_request("acme", "gpt_tokens", json=extra)
        grant = EntitlementGrant(await sdk.send(req, 201))
        assert [g["id"] for g in await om.grants.list(subject=["acme"])] == [grant.id]  # type: ignore[index]
        await om.grants.delete(grant.id)
        assert await om.grants.list(subject=["acme"]) == []
        voided = await om.grants.list(subject=["acme"], include_deleted=True)
        assert [g["voidedAt"] is not None for g in voided] == [True]  # type: ignore[index]

        # Boolean and static entitlements; a second one per feature is a conflict.
        await om.features.create({"key": "sso", "name": "SSO"})
        await sdk.send(
            ops.build_subjects_post_request("acme", json={"type": "boolean", "featureKey": "sso"}),
            201,
        )
        assert (await sdk.value("acme", "sso")).has_access is True
        conflict = await om.send_request(
            ops.build_subjects_post_request("acme", json={"type": "boolean", "featureKey": "sso"})
        )
        assert conflict.status_code == 409
        await om.features.create({"key": "plan", "name": "Plan"})
        await sdk.send(
            ops.build_subjects_post_request(
                "globex", json={"type": "static", "featureKey": "plan", "config": '{"seats": 5}'}
            ),
            201,
        )
        static = await sdk.value("globex", "plan")
        assert (static.has_access, static.config) == (True, '{"seats": 5}')
        with pytest.raises(HttpResponseError) as err:
            await om.features.create({"key": "Bad Key", "name": "x"})
        assert err.value.status_code == 400


async def test_bad_entitlement_input_names_the_field(http: Http) -> None:
    """Each refusal is a 400 naming the field."""
    await http.post(
        "/api/v1/meters",
        json={"slug": "m", "aggregation": "MAX", "eventType": "t", "valueProperty": "$.v"},
    )
    await http.post("/api/v1/features", json={"key": "f", "name": "F", "meterSlug": "m"})
    await http.post("/api/v1/features", json={"key": "b", "name": "B"})
    cases: list[tuple[str, dict[str, Any], str]] = [
        (
            "/api/v1/subjects/s/entitlements",
            {"type": "metered", "featureKey": "nope", "usagePeriod": {"interval": "DAY"}},
            "featureKey",
        ),
        ("/api/v1/subjects/s/entitlements", {"type": "metered", "featureKey": "b"}, "usagePeriod"),
        (
            "/api/v1/subjects/s/entitlements",
            {"type": "metered", "featureKey": "f", "usagePeriod": {"interval": "DAY"}},
            "featureKey",
        ),
        (
            "/api/v1/subjects/s/entitlements",
            {"type": "static", "featureKey": "b", "config": "{nope"},
            "config",
        ),
        (
            "/api/v1/subjects/s/entitlements",
            {"type": "metered", "featureKey": "b", "usagePeriod": {"interval": "HOUR"}},
            "usagePeriod.interval",
        ),
        ("/api/v1/features", {"key": "g", "name": "G", "meterSlug": "nope"}, "meterSlug"),
        (
            "/api/v1/features",
            {"key": "g", "name": "G", "meterSlug": "m", "meterGroupByFilters": {"x": "1"}},
            "meterGroupByFilters",
        ),
    ]
    for path, body, field in cases:
        resp = await http.post(path, json=body)
        text = await resp.text()
        assert resp.status == 400, (body, text)
        assert (await resp.json())["field"] == field, (body, text)
    resp = await http.post(
        "/api/v1/subjects/s/entitlements", json={"type": "boolean", "featureKey": "b"}
    )
    assert resp.status == 201
    resp = await http.post(
        "/api/v1/subjects/s/entitlements/b/grants",
        json={"amount": 1, "effectiveAt": "2026-01-01T00:00:00Z"},
    )
    assert (resp.status, (await resp.json())["field"]) == (400, "entitlementIdOrFeatureKey")
    for path in (
        "/api/v1/subjects/s/entitlements/zz/value",
        "/api/v1/subjects/other/entitlements/b/value",
        "/api/v1/entitlements/zz",
        "/api/v1/features/zz",
    ):
        assert (await http.get(path)).status == 404, path


ADMIN_TOKEN = "admin-token-for-entitlements-0123456789"


async def test_a_user_reads_only_its_own_subjects_entitlements(
    nc: Client, nats_server: NatsServer
) -> None:
    """With tokens on: an admin manages; a user reads its own subject's entitlements, grants,
    value and history, and gets 404 for another subject's, exactly as for an unknown one."""
    settings = Settings(nats_url=nats_server.url, partitions=2, admin_token=ADMIN_TOKEN)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with TestClient(TestServer(create_app(settings, nc))) as http:
        for path, body in (
            ("/api/v1/meters", {"slug": "m", "aggregation": "COUNT", "eventType": "t"}),
            ("/api/v1/features", {"key": "calls", "name": "Calls", "meterSlug": "m"}),
        ):
            resp = await http.post(path, json=body, headers=admin)
            assert resp.status == 201, await resp.text()
        ids = {}
        for subject in ("acme", "globex"):
            resp = await http.post(
                f"/api/v1/subjects/{subject}/entitlements",
                json={
                    "type": "metered",
                    "featureKey": "calls",
                    "usagePeriod": {"interval": "DAY"},
                    "issueAfterReset": 10,
                },
                headers=admin,
            )
            assert resp.status == 201, await resp.text()
            ids[subject] = (await resp.json())["id"]
        resp = await http.post("/api/users", json={"tenant": "acme"}, headers=admin)
        user = {"Authorization": f"Bearer {(await resp.json())['token']}"}

        own = "/api/v1/subjects/acme/entitlements"
        for path in (
            own,
            f"{own}/calls",
            f"{own}/calls/value",
            f"{own}/calls/grants",
            f"{own}/{ids['acme']}/history?windowSize=DAY",
            f"/api/v1/entitlements/{ids['acme']}",
        ):
            resp = await http.get(path, headers=user)
            assert resp.status == 200, (path, await resp.text())
        assert (await (await http.get(f"{own}/calls/value", headers=user)).json())["balance"] == 10
        listed = await (await http.get("/api/v1/entitlements", headers=user)).json()
        assert [e["subjectKey"] for e in listed] == ["acme"]
        for subject, ent in (("globex", ids["globex"]), ("nobody", "01NOSUCHENTITLEMENT0000000")):
            for path in (
                f"/api/v1/subjects/{subject}/entitlements",
                f"/api/v1/subjects/{subject}/entitlements/calls/value",
                f"/api/v1/entitlements/{ent}",
            ):
                resp = await http.get(path, headers=user)
                assert resp.status == 404, (path, resp.status)
        for method, path in (
            ("POST", f"{own}/calls/grants"),
            ("POST", f"{own}/{ids['acme']}/reset"),
            ("DELETE", f"{own}/{ids['acme']}"),
            ("POST", "/api/v1/features"),
        ):
            resp = await http.request(method, path, json={}, headers=user)
            assert resp.status == 403, (method, path, resp.status)


async def test_v2_issue_and_grants_come_with_the_entitlement(http: Http) -> None:
    """An entitlement created with v2's ``issue`` and ``grants`` holds both at once."""
    await http.post("/api/v1/meters", json={"slug": "m", "aggregation": "COUNT", "eventType": "t"})
    await http.post("/api/v1/features", json={"key": "calls", "name": "C", "meterSlug": "m"})
    now = _iso(datetime.now(UTC).replace(second=0, microsecond=0))
    resp = await http.post(
        "/api/v1/subjects/acme/entitlements",
        json={
            "type": "metered",
            "featureKey": "calls",
            "usagePeriod": {"interval": "WEEK"},
            "issue": {"amount": 5, "priority": 3},
            "grants": [{"amount": 7, "effectiveAt": now}, {"amount": 1, "effectiveAt": now}],
        },
    )
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["issueAfterResetPriority"] == 3
    grants = await (await http.get("/api/v1/subjects/acme/entitlements/calls/grants")).json()
    assert sorted(g["amount"] for g in grants) == [1, 7]
    value = await (await http.get("/api/v1/subjects/acme/entitlements/calls/value")).json()
    assert value["balance"] == 13
