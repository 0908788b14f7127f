"""Access control: tokens, roles, tenant isolation over HTTP, and NATS publish permissions."""

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from aiohttp.test_utils import TestClient, TestServer
from nats.aio.client import Client

from kloudmeter_py.config import Settings
from kloudmeter_py.errors import ConfigError
from kloudmeter_py.gateway import create_app
from kloudmeter_py.store.server import NatsServer
from kloudmeter_py.worker import Worker
from tests.conftest import eventually
from tests.helpers import Http, lifecycle_folded

ADMIN = "admin-token-for-tests-0123456789"


@pytest.fixture
def settings(nats_server: NatsServer) -> Settings:
    return Settings(nats_url=nats_server.url, partitions=2, admin_token=ADMIN, summary_flush_ms=0)


@pytest.fixture
async def http(nc: Client, settings: Settings) -> AsyncIterator[Http]:
    async with TestClient(TestServer(create_app(settings, nc))) as client:
        yield client


def _h(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _user(http: Http, tenant: str, role: str = "user") -> dict[str, Any]:
    resp = await http.post("/api/users", json={"tenant": tenant, "role": role}, headers=_h(ADMIN))
    assert resp.status == 201, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


def _routes(http: Http) -> list[tuple[str, str]]:
    out = []
    for route in http.server.app.router.routes():
        canonical = route.resource.canonical if route.resource else ""
        if route.method == "HEAD" or canonical in ("/healthy", "/", "/static/{name}"):
            continue
        path = re.sub(
            r"\{[^}]+\}",
            "x",
            canonical.replace("{meter}", "m").replace("{label}", "cpu").replace("{epoch}", "1"),
        )
        out.append((route.method, path))
    return out


async def test_every_endpoint_refuses_missing_wrong_and_revoked_tokens(http: Http) -> None:
    """401 without a token, with a wrong one and with a revoked one, on every route."""
    user = await _user(http, "acme")
    resp = await http.delete(f"/api/users/{user['id']}", headers=_h(ADMIN))
    assert resp.status == 204
    routes = _routes(http)
    assert len(routes) > 20
    for method, path in routes:
        for headers in ({}, _h("km_wrong"), _h(user["token"]), {"Authorization": "Basic x"}):
            resp = await http.request(method, path, headers=headers)
            assert resp.status == 401, (method, path, headers)
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await http.get("/healthy")).status == 200


async def test_user_tokens_cannot_manage(http: Http) -> None:
    """A user token may not create or delete meters, manage users or touch dead letters."""
    token = (await _user(http, "acme"))["token"]
    meter = {"id": "m", "eventType": "t", "aggregation": "count"}
    for method, path, body in (
        ("POST", "/api/create-meter", meter),
        ("POST", "/api/v1/meters", {"slug": "m", "eventType": "t", "aggregation": "COUNT"}),
        ("DELETE", "/api/meter?key=m", None),
        ("POST", "/api/users", {"tenant": "acme", "role": "admin"}),
        ("GET", "/api/users", None),
        ("GET", "/api/dead-letters", None),
        ("POST", "/api/dead-letters/replay", None),
    ):
        resp = await http.request(method, path, json=body, headers=_h(token))
        assert resp.status == 403, (method, path)
    resp = await http.post("/api/create-meter", json=meter, headers=_h(ADMIN))
    assert resp.status == 201


async def test_tenants_see_only_their_own_data(http: Http, worker: Worker) -> None:
    """A user's events are stamped with its tenant; every read endpoint shows it only its own
    tenant, and another tenant's reading is a plain 404."""
    admin = _h(ADMIN)
    await http.post(
        "/api/create-meter",
        json={"id": "m", "eventType": "t", "aggregation": "count"},
        headers=admin,
    )
    acme = _h((await _user(http, "acme"))["token"])
    globex = _h((await _user(http, "globex"))["token"])
    resp = await http.post("/api/register-event", json={"id": "a1", "eventType": "t"}, headers=acme)
    assert resp.status == 202
    resp = await http.post(
        "/api/register-event",
        json={"id": "g1", "eventType": "t", "subject": "globex"},
        headers=globex,
    )
    assert resp.status == 202
    resp = await http.post(
        "/api/register-event",
        json={"id": "x", "eventType": "t", "subject": "globex"},
        headers=acme,
    )
    assert resp.status == 403

    async def all_readings() -> list[dict[str, Any]]:
        resp = await http.get("/api/readings", headers=admin)
        out: list[dict[str, Any]] = await resp.json()
        return out

    await eventually(all_readings, lambda rs: len(rs) == 2)
    rs = await (await http.get("/api/readings", headers=acme)).json()
    assert [(r["subject"], r["count"]) for r in rs] == [("acme", 1)]
    assert await (await http.get("/api/readings?subject=globex", headers=acme)).json() == []
    assert (await http.get("/api/reading/?key=m.globex", headers=acme)).status == 404
    assert (await http.get("/api/reading/?key=m.acme", headers=acme)).status == 200
    for path in ("/api/meters/m/query", "/api/v1/meters/m/query"):
        body = await (await http.get(path, headers=acme)).json()
        assert [r["value"] for r in body["data"]] == [1], path
        body = await (await http.get(path + "?subject=globex", headers=acme)).json()
        assert body["data"] == [], path
        body = await (await http.get(path, headers=admin)).json()
        assert [r["value"] for r in body["data"]] == [2], path
    assert await (await http.get("/api/v1/meters/m/subjects", headers=acme)).json() == ["acme"]
    resp = await http.post(
        "/api/v1/events",
        json={"id": "c", "source": "s", "specversion": "1.0", "type": "t", "subject": "globex"},
        headers={**acme, "Content-Type": "application/cloudevents+json"},
    )
    assert resp.status == 403
    assert (await http.get("/api/meters", headers=acme)).status == 200


async def test_users_are_listed_without_tokens(http: Http) -> None:
    """GET /api/users shows users but never a token or its hash."""
    await _user(http, "acme")
    users = await (await http.get("/api/users", headers=_h(ADMIN))).json()
    assert [u["tenant"] for u in users] == ["acme"]
    assert "token" not in users[0] and "tokenHash" not in users[0]
    resp = await http.post("/api/users", json={"tenant": "a b"}, headers=_h(ADMIN))
    assert resp.status == 400 and (await resp.json())["field"] == "tenant"


def test_serving_without_tokens_off_loopback_is_refused() -> None:
    """0.0.0.0 without tokens is refused unless explicitly allowed."""
    with pytest.raises(ConfigError, match="HTTP_SERVER_HOST"):
        Settings(http_host="0.0.0.0").check_exposure()
    Settings(http_host="0.0.0.0", allow_no_auth=True).check_exposure()
    Settings(http_host="0.0.0.0", admin_token=ADMIN).check_exposure()
    Settings().check_exposure()


async def test_nats_refuses_a_tenant_publishing_for_another(tmp_path: Path) -> None:
    """With nats/tenants.conf, acme's credentials may publish acme's events and not globex's."""
    conf = Path(__file__).parent.parent / "nats" / "tenants.conf"
    text = conf.read_text().replace("listen: 127.0.0.1:4222", "")
    text = text.replace('  store_dir: ".kloudmeter/nats"\n', "")  # the fixture passes -sd
    local = tmp_path / "tenants.conf"
    local.write_text(text)
    async with NatsServer(tmp_path / "js", config_file=str(local)) as server:
        port = server.port
        service = await nats.connect(f"nats://kloudmeter:change-me@127.0.0.1:{port}")
        from kloudmeter_py.store.provision import provision

        await provision(service.jetstream(), Settings(nats_url=server.url))
        errors: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            errors.append(exc)

        acme = await nats.connect(f"nats://acme:acme-secret@127.0.0.1:{port}", error_cb=on_error)
        js = acme.jetstream(timeout=2)
        ack = await js.publish(
            "meters.events.t.acme", b'{"id":"1","eventType":"t","subject":"acme"}'
        )
        assert ack.seq == 1
        with pytest.raises((nats.errors.TimeoutError, asyncio.TimeoutError)):
            await js.publish(
                "meters.events.t.globex", b'{"id":"2","eventType":"t","subject":"globex"}'
            )
        await eventually(
            lambda: _value(errors),
            lambda e: any("permissions violation" in str(x).lower() for x in e),
        )
        info = await service.jetstream().stream_info("meters")
        assert info.state.messages == 1
        await acme.close()
        await service.close()


async def _value(errors: list[Exception]) -> list[Exception]:
    return list(errors)


async def test_usage_hours_per_location_match_a_hand_computed_case(
    http: Http, nc: Client, worker: Worker
) -> None:
    """CREATED/DESTROYED events (sent out of order) give hours per location between two dates;
    a user sees its own tenant only."""
    admin = _h(ADMIN)
    events = [
        # vm-1 in eu: 10:00 -> 12:30 = 2.5 h
        ("vm-1", "DESTROYED", "2026-11-20T12:30:00Z", "eu"),
        ("vm-1", "CREATED", "2026-11-20T10:00:00Z", "eu"),
        # vm-2 in us: created 08:00 (before start), still running at end 14:00 -> 5 h in window
        ("vm-2", "CREATED", "2026-11-20T08:00:00Z", "us"),
        # vm-3 in eu: 13:00 -> 13:15 = 0.25 h
        ("vm-3", "CREATED", "2026-11-20T13:00:00Z", "eu"),
        ("vm-3", "DESTROYED", "2026-11-20T13:15:00Z", "eu"),
    ]
    for i, (resource, kind, at, location) in enumerate(events):
        resp = await http.post(
            "/api/register-event",
            json={
                "id": f"l{i}",
                "eventType": "lifecycle",
                "subject": "acme",
                "time": at,
                "data": {"event": kind, "resource": resource, "location": location},
            },
            headers=admin,
        )
        assert resp.status == 202
    await lifecycle_folded(nc)
    params = {"tenant": "acme", "start": "2026-11-20T09:00:00Z", "end": "2026-11-20T14:00:00Z"}
    body = await (await http.get("/api/usage", params=params, headers=admin)).json()
    assert body["usage"] == [{"location": "eu", "hours": 2.75}, {"location": "us", "hours": 5.0}]
    globex = _h((await _user(http, "globex"))["token"])
    assert (await http.get("/api/usage", params=params, headers=globex)).status == 403
    acme = _h((await _user(http, "acme"))["token"])
    resp = await http.get(
        "/api/usage", params={"start": params["start"], "end": params["end"]}, headers=acme
    )
    assert (await resp.json())["usage"][0] == {"location": "eu", "hours": 2.75}
    resp = await http.get("/api/usage", params={"tenant": "acme", "start": "x"}, headers=admin)
    assert resp.status == 400 and (await resp.json())["field"] == "start"


async def test_tenants_cannot_see_each_others_resources_records_or_charges(
    http: Http, nc: Client, worker: Worker
) -> None:
    """Rating endpoints are narrowed to the user's tenant too: resources, records, charging."""
    admin = _h(ADMIN)
    resp = await http.post(
        "/api/create-meter",
        json={"id": "vm", "eventType": "instance", "aggregation": "duration"},
        headers=admin,
    )
    assert resp.status == 201
    for tenant, resource in (("acme", "vm-a"), ("globex", "vm-g")):
        resp = await http.post(
            "/api/register-event",
            json={
                "id": f"c-{resource}",
                "eventType": "instance",
                "subject": tenant,
                "time": "2026-11-20T10:00:00Z",
                "data": {"event_type": "create", "resource_id": resource},
            },
            headers=admin,
        )
        assert resp.status == 202
    await lifecycle_folded(nc)
    acme = _h((await _user(http, "acme"))["token"])
    resources = await (await http.get("/v1/resources", headers=acme)).json()
    assert [r["resource_id"] for r in resources] == ["vm-a"]
    # Naming another tenant is refused, whichever it is (nothing said of whether it exists).
    for other in ("globex", "nobody"):
        resp = await http.get(f"/v1/resources?tenant={other}", headers=acme)
        assert (resp.status, (await resp.json())["field"]) == (403, "tenant")
    assert (await http.get("/v1/records/vm-g", headers=acme)).status == 404
    assert (await http.get("/v1/records/vm-a", headers=acme)).status == 200
    period = {"start": "2026-11-20T00:00:00Z", "end": "2026-11-21T00:00:00Z"}
    resp = await http.post("/charging", json={"tenant": "globex", **period}, headers=acme)
    assert resp.status == 403
    body = await (await http.post("/charging", json=period, headers=acme)).json()
    assert {i["resource_id"] for i in body["items"]} <= {"vm-a"} and body["tenant"] == "acme"
    admin_view = await (await http.get("/v1/resources", headers=admin)).json()
    assert sorted(r["resource_id"] for r in admin_view) == ["vm-a", "vm-g"]
    assert (await http.post("/v1/prices", json={}, headers=acme)).status == 403
