"""Every registered route, walked with each kind of token: access and tenant answers hold for
all of them, so a route added later is checked without anyone remembering to."""

import re
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from nats.aio.client import Client

from kloudmeter_py.config import Settings
from kloudmeter_py.gateway import create_app
from kloudmeter_py.gateway.routes import (
    ADMIN,
    OPEN,
    PORTAL,
    USER,
    Access,
    RouteSpec,
    check_declared,
    declared_routes,
    permissions,
)
from kloudmeter_py.metrics import METRICS
from kloudmeter_py.store.server import NatsServer
from kloudmeter_py.worker import Worker
from tests.conftest import eventually
from tests.helpers import Http

ADMIN_TOKEN = "admin-token-for-route-walk-0123456789"
OTHER = "zz-tenant-two"  # the other tenant; its names all start with zz-
STREAM = "/api/stream/readings"  # endless: only its status is looked at
START = "2026-01-01T00:00:00Z"

# User routes that show or write no tenant's data (meter definitions). A new user route must
# either declare a tenant scope or be added here on purpose.
NO_TENANT_USER_ROUTES = {
    ("GET", "/api/meters"),
    ("GET", "/api/meter"),
    ("GET", "/api/meter/"),
    ("GET", "/api/v1/meters"),
    ("GET", "/api/v1/meters/{meter}"),
    ("GET", "/api/v1/features"),
    ("GET", "/api/v1/features/{featureId}"),
}
# User routes that write: what each is sent to write for the other tenant (a 403 each).
WRITES_FOR_OTHER: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {
    ("POST", "/api/register-event"): (
        "/api/register-event",
        {"json": {"id": "w1", "eventType": "t", "subject": OTHER}},
    ),
    ("POST", "/api/v1/events"): (
        "/api/v1/events",
        {
            "json": {
                "id": "w2",
                "source": "s",
                "specversion": "1.0",
                "type": "t",
                "subject": OTHER,
            },
            "headers": {"Content-Type": "application/cloudevents+json"},
        },
    ),
    ("POST", "/api/perf/{host}/{epoch}"): (
        f"/api/perf/web/1700000000?tenant={OTHER}",
        {"json": {"cpu": 1}},
    ),
}
# Bodies and parameters that make a read route answer with data rather than a 400.
READ_ARGS: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/api/meters/{meter}/query"): {"json": {}},
    ("POST", "/api/v1/meters/{meter}/query"): {"json": {}},
    ("GET", "/api/meters/{meter}/export"): {
        "params": {"from": START, "to": "2030-01-01T00:00:00Z", "format": "csv"}
    },
    ("POST", "/charging"): {"json": {"start": START, "end": "2030-01-01T00:00:00Z"}},
    ("GET", "/api/usage"): {"params": {"start": START}},
    ("GET", "/api/reading"): {"params": {"key": f"m.{OTHER}"}},
    ("GET", "/api/reading/"): {"params": {"key": f"m.{OTHER}"}},
    ("POST", "/api/events/{id}/amend"): {"json": {"data": {"n": 1}}},
}
# Path parameters: the other tenant's names (t1 has data under other names).
PATH_VALUES = {
    "meter": "m",
    "host": "zz-host",
    "epoch": "1700000000",
    "label": "cpu",
    "resource_id": "zz-vm",
    "id": "zz-id",
    "name": "app.js",
    "groupByKey": "zz-key",
    "channel": "zz-channel",
    "rule": "zz-rule",
    "event": "zz-event",
    "customerIdOrKey": "zz-customer",
    "meterSlug": "m",
    # Entitlements: the other tenant's subject (a user token: 404 as for an unknown one).
    "featureId": "zz-feature",
    "subjectIdOrKey": OTHER,
    "entitlementId": "zz-entitlement",
    "entitlementIdOrFeatureKey": "zz-feature",
    "grantId": "zz-grant",
}


@pytest.fixture
def settings(nats_server: NatsServer) -> Settings:
    return Settings(
        nats_url=nats_server.url, partitions=2, admin_token=ADMIN_TOKEN, summary_flush_ms=0
    )


@pytest.fixture
async def http(nc: Client, settings: Settings) -> AsyncIterator[Http]:
    async with TestClient(TestServer(create_app(settings, nc))) as client:
        yield client


def _h(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _path(canonical: str) -> str:
    return re.sub(r"\{([^}:]+)(?::[^}]*)?\}", lambda m: PATH_VALUES[m.group(1)], canonical)


def _routes(http: Http) -> list[tuple[str, str, RouteSpec]]:
    out = []
    for method, canonical, spec in declared_routes(http.server.app):
        assert spec is not None, f"{method} {canonical} has no declaration"
        out.append((method, canonical, spec))
    return out


async def _user(http: Http, tenant: str) -> tuple[str, str]:
    resp = await http.post("/api/users", json={"tenant": tenant}, headers=_h(ADMIN_TOKEN))
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    return body["id"], body["token"]


async def _status(http: Http, method: str, path: str, headers: dict[str, str]) -> int:
    resp = await http.request(method, path, headers=headers)
    status = resp.status
    resp.close()  # the event stream never ends
    return status


_VOLATILE = re.compile(r'\d{4}-\d\d-\d\dT[\d:.]+(?:Z|[+-]\d\d:\d\d)?|"end":\d+|"start":\d+')


async def _answer(http: Http, method: str, path: str, headers: dict[str, str], **kw: Any) -> str:
    """Status and body, with times that move on their own (now, windows' ends) blanked."""
    extra = kw.pop("headers", {})
    resp = await http.request(method, path, headers={**headers, **extra}, **kw)
    text = await resp.text()
    return f"{resp.status} {_VOLATILE.sub('T', text)}"


async def _seed(http: Http, tenant: str, headers: dict[str, str], prefix: str) -> None:
    """Readings, a host and a resource of ``tenant`` (sent by its own user)."""
    now = int(time.time())
    for i in range(2):
        resp = await http.post(
            "/api/register-event",
            json={"id": f"{prefix}-e{i}", "eventType": "t", "subject": tenant},
            headers=headers,
        )
        assert resp.status == 202, await resp.text()
    # An event named like the path parameter "id" (zz-id: the other tenant's), which no
    # meter reads: the corrections routes must not find it for another tenant.
    resp = await http.post(
        "/api/register-event", json={"id": f"{prefix}-id", "eventType": "u"}, headers=headers
    )
    assert resp.status == 202, await resp.text()
    for host in ("web", f"{prefix}-host"):
        resp = await http.post(f"/api/perf/{host}/{now}", json={"cpu": 50}, headers=headers)
        assert resp.status == 202, await resp.text()
    # A resource that ran for an hour (a finished one: its cost does not grow while we look).
    for kind, at in (("create", "2026-06-01T00:00:00Z"), ("delete", "2026-06-01T01:00:00Z")):
        resp = await http.post(
            "/api/register-event",
            json={
                "id": f"{prefix}-vm-{kind}",
                "eventType": "instance",
                "time": at,
                "data": {"event_type": kind, "resource_id": f"{prefix}-vm"},
            },
            headers=headers,
        )
        assert resp.status == 202, await resp.text()


async def _applied(http: Http, tenant: str) -> None:
    admin = _h(ADMIN_TOKEN)

    async def seen() -> tuple[int, int, int, int, int]:
        rs = await (await http.get(f"/api/readings?subject={tenant}", headers=admin)).json()
        hosts = await (await http.get(f"/api/perf?tenant={tenant}", headers=admin)).json()
        res = await (await http.get(f"/v1/resources?tenant={tenant}", headers=admin)).json()
        ended = [r for r in res if r["status"] == "deleted"]

        def count(meter: str) -> int:
            return sum(r["count"] for r in rs if r["meterId"] == meter)

        # Every reading the seed makes, not only the resource's state: the duration meter's
        # reading is written after it (a fresh-clone CI run compared before it was).
        return count("m"), count("vm"), count("perf-hosts"), len(hosts), len(ended)

    await eventually(seen, lambda s: s == (2, 2, 2, 2, 1))


async def test_every_route_declares_access_tenant_and_operation(http: Http) -> None:
    """No route without a declaration; the permission table is the declarations'; a user
    route either acts for a tenant or is one of the few that show no tenant's data."""
    routes = _routes(http)
    assert len(routes) > 40
    table = permissions(http.server.app)
    assert {(m, p) for m, p, _ in routes} == set(table)
    assert table[("GET", "/healthy")] is OPEN and table[("POST", "/api/users")] is ADMIN
    assert table[("GET", "/api/perf/{host}")] is USER
    # What the metrics count as ingest routes comes from the declarations too.
    assert http.server.app[METRICS].ingest_routes == {
        ("POST", "/api/register-event"),
        ("POST", "/api/v1/events"),
        ("POST", "/api/perf/{host}/{epoch}"),
    }
    for method, canonical, spec in routes:
        assert isinstance(spec.access, Access) and spec.op.summary, (method, canonical)
        if spec.access is USER and not spec.tenant.data:
            assert (method, canonical) in NO_TENANT_USER_ROUTES, (method, canonical)
        if spec.access is OPEN:
            assert not spec.tenant.data, (method, canonical)


async def test_every_route_answers_each_token_kind_as_declared(http: Http, worker: Worker) -> None:
    """No token, a garbage one or a revoked one: 401 on every route but the open ones. A user:
    403 on admin routes and never on its own tenant's; an admin: never 401 or 403."""
    revoked_id, revoked = await _user(http, "t1")
    resp = await http.delete(f"/api/users/{revoked_id}", headers=_h(ADMIN_TOKEN))
    assert resp.status == 204
    _, user = await _user(http, "t1")
    resp = await http.post("/api/v1/portal/tokens", json={"subject": "t1"}, headers=_h(ADMIN_TOKEN))
    assert resp.status == 200, await resp.text()
    portal = (await resp.json())["token"]
    refused = ({}, _h("km_garbage"), _h(revoked), {"Authorization": "Basic eDp5"})
    routes = _routes(http)
    assert any(spec.access is PORTAL for _, _, spec in routes)
    for method, canonical, spec in routes:
        path = _path(canonical)
        for headers in refused:
            status = await _status(http, method, path, headers)
            if spec.access is OPEN:
                assert status not in (401, 403), (method, canonical, headers, status)
            else:
                assert status == 401, (method, canonical, headers, status)
        status = await _status(http, method, path, _h(user))
        if spec.access in (ADMIN, PORTAL):
            assert status == 403, (method, canonical, status)
        else:
            assert status not in (401, 403), (method, canonical, status)
        # A portal token opens its portal routes and nothing else (it is no API token).
        status = await _status(http, method, path, _h(portal))
        if spec.access is PORTAL:
            assert status not in (401, 403), (method, canonical, status)
        elif spec.access is not OPEN:
            assert status == 401, (method, canonical, status)
    for method, canonical, spec in routes:  # last: admins may delete what others read
        status = await _status(http, method, _path(canonical), _h(ADMIN_TOKEN))
        if spec.access is PORTAL:
            assert status == 403, (method, canonical, status)
        else:
            assert status not in (401, 403), (method, canonical, status)


async def test_another_tenants_data_answers_exactly_like_none(http: Http, worker: Worker) -> None:
    """Every read a user may make answers the same before and after another tenant stored
    readings, hosts (one named like the user's) and resources under the names it asks for;
    naming the other tenant, or writing for it, is refused on every route that could."""
    admin = _h(ADMIN_TOKEN)
    for meter in (
        {"id": "m", "eventType": "t", "aggregation": "count"},
        {"id": "vm", "eventType": "instance", "aggregation": "duration"},
    ):
        resp = await http.post("/api/create-meter", json=meter, headers=admin)
        assert resp.status == 201, await resp.text()
    t1 = _h((await _user(http, "t1"))[1])
    other = _h((await _user(http, OTHER))[1])
    await _seed(http, "t1", t1, "t1")
    await _applied(http, "t1")

    reads = [
        (method, canonical, spec)
        for method, canonical, spec in _routes(http)
        if spec.access is USER
        and spec.tenant.data
        and canonical != STREAM
        and (method, canonical) not in WRITES_FOR_OTHER
    ]
    assert len(reads) >= 14

    async def answers() -> dict[str, str]:
        return {
            f"{method} {canonical}": await _answer(
                http, method, _path(canonical), t1, **READ_ARGS.get((method, canonical), {})
            )
            for method, canonical, _ in reads
        }

    before = await answers()
    await _seed(http, OTHER, other, "zz")
    await _applied(http, OTHER)
    after = await answers()
    assert after == before
    # t1's own data is in those answers (they are not all empty or errors).
    assert "t1-host" in before["GET /api/perf"] and "t1-vm" in before["GET /v1/resources"]
    assert before["GET /api/perf/{host}"].startswith("404")  # zz-host: the other tenant's
    assert before["GET /api/events/{id}"].startswith("404")  # zz-id: the other tenant's

    # Writes for the other tenant, and naming it where a route takes a tenant parameter.
    writes = {
        (m, c) for m, c, s in _routes(http) if s.access is USER and m != "GET" and s.tenant.data
    }
    assert writes - {(m, c) for m, c, _ in reads} == set(WRITES_FOR_OTHER)
    for path, kw in WRITES_FOR_OTHER.values():
        extra = kw.get("headers", {})
        resp = await http.post(path, json=kw["json"], headers={**t1, **extra})
        assert resp.status == 403, (path, await resp.text())
    for method, canonical, spec in _routes(http):
        if spec.access is USER and spec.tenant.param is not None:
            params = {**READ_ARGS.get((method, canonical), {}).get("params", {})}
            params[spec.tenant.param] = OTHER
            resp = await http.request(method, _path(canonical), params=params, headers=t1)
            assert resp.status == 403, (method, canonical, resp.status)
    resp = await http.post("/charging", json={"tenant": OTHER, "start": START, "end": START})
    assert resp.status == 401


async def test_an_undeclared_route_is_refused(nc: Client, settings: Settings) -> None:
    """A route added without a declaration has no access rule: the app is refused."""
    app = create_app(settings, nc)

    async def sneaky(request: web.Request) -> web.Response:
        return web.Response(text="everyone's data")

    app.router.add_get("/api/sneaky", sneaky)
    with pytest.raises(RuntimeError, match="GET /api/sneaky"):
        check_declared(app)
