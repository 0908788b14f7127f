"""Host metrics with tokens on: a host belongs to a tenant, and no tenant sees another's."""

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from nats.aio.client import Client

from kloudmeter_py.config import Settings
from kloudmeter_py.gateway import create_app
from kloudmeter_py.store.server import NatsServer
from kloudmeter_py.worker import Worker
from tests.conftest import eventually
from tests.helpers import Http

ADMIN = "admin-token-for-perf-tests-0123456"
CPU = "summary:by-minute:cpu"


@pytest.fixture
def settings(nats_server: NatsServer) -> Settings:
    return Settings(nats_url=nats_server.url, partitions=2, admin_token=ADMIN, summary_flush_ms=0)


@pytest.fixture
async def http(nc: Client, settings: Settings) -> AsyncIterator[Http]:
    async with TestClient(TestServer(create_app(settings, nc))) as client:
        yield client


def _h(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _user(http: Http, tenant: str) -> dict[str, str]:
    resp = await http.post("/api/users", json={"tenant": tenant}, headers=_h(ADMIN))
    assert resp.status == 201, await resp.text()
    return _h((await resp.json())["token"])


async def _get(http: Http, path: str, headers: dict[str, str]) -> tuple[int, Any]:
    resp = await http.get(path, headers=headers)
    return resp.status, await resp.json()


async def _avg(http: Http, path: str, headers: dict[str, str]) -> float | None:
    status, body = await _get(http, path, headers)
    if status != 200 or CPU not in body:
        return None
    (point,) = body[CPU]["averages"]
    avg: float = point["avg"]
    return avg


async def test_a_tenant_sees_lists_and_writes_only_its_own_hosts(
    http: Http, worker: Worker
) -> None:
    """Two tenants with a host of the same name do not mix; another tenant's host answers
    exactly like an unknown one, and a user's post never lands in another tenant's host."""
    t1, t2 = await _user(http, "t1"), await _user(http, "t2")
    epoch = int(time.time())
    # Before t2 has data: what t1 gets for hosts that exist nowhere.
    unknown = {
        path: await _get(http, path, t1)
        for path in ("/api/perf/only-t2", "/api/perf/only-t2/by-minute:cpu")
    }
    assert all(status == 404 for status, _ in unknown.values())
    for headers, host, cpu in ((t1, "web", 10), (t2, "web", 77.5), (t2, "only-t2", 5)):
        resp = await http.post(f"/api/perf/{host}/{epoch}", json={"cpu": cpu}, headers=headers)
        assert resp.status == 202, await resp.text()
        assert await resp.json() == {"status": "ok", "events": 1}  # never a duplicate
    assert await eventually(lambda: _avg(http, "/api/perf/web", t2), lambda a: a is not None)
    assert await _avg(http, "/api/perf/web", t2) == 77.5
    await eventually(lambda: _avg(http, "/api/perf/only-t2", t2), lambda a: a == 5)
    assert await eventually(lambda: _avg(http, "/api/perf/web", t1), lambda a: a == 10)

    assert await _get(http, "/api/perf", t1) == (200, ["web"])
    assert await _get(http, "/api/perf", t2) == (200, ["only-t2", "web"])
    for path, answer in unknown.items():
        assert await _get(http, path, t1) == answer, path

    # t1 posts into "its" only-t2 and web: t2's numbers stay as they were.
    for host in ("only-t2", "web"):
        resp = await http.post(
            f"/api/perf/{host}/{epoch}",
            json={"cpu": 100000},
            headers={**t1, "Idempotency-Key": "second"},
        )
        assert await resp.json() == {"status": "ok", "events": 1}
    await eventually(lambda: _avg(http, "/api/perf/only-t2", t1), lambda a: a == 100000)
    await eventually(lambda: _avg(http, "/api/perf/web", t1), lambda a: a == 50005)
    assert await _avg(http, "/api/perf/web", t2) == 77.5
    assert await _avg(http, "/api/perf/only-t2/by-minute:cpu", t2) == 5

    # Asking for another tenant by name is refused, whatever the tenant.
    for path in ("/api/perf?tenant=t2", "/api/perf/web?tenant=t2", "/api/perf/web?tenant=zz"):
        status, body = await _get(http, path, t1)
        assert (status, body["field"]) == (403, "tenant"), path
    resp = await http.post(f"/api/perf/web/{epoch}?tenant=t2", json={"cpu": 1}, headers=t1)
    assert resp.status == 403
    assert await _get(http, "/api/perf?tenant=t1", t1) == (200, ["only-t2", "web"])


async def test_an_admin_names_the_tenant_and_otherwise_sees_hosts_without_one(
    http: Http, worker: Worker
) -> None:
    """An admin reads and writes a tenant's hosts with ?tenant=; without it, the hosts
    posted without a tenant, which no user sees."""
    admin, t1 = _h(ADMIN), await _user(http, "t1")
    epoch = int(time.time())
    resp = await http.post(f"/api/perf/shared/{epoch}", json={"cpu": 1}, headers=admin)
    assert resp.status == 202
    resp = await http.post(f"/api/perf/box/{epoch}?tenant=t1", json={"cpu": 2}, headers=admin)
    assert resp.status == 202
    await eventually(lambda: _avg(http, "/api/perf/box", t1), lambda a: a == 2)
    await eventually(lambda: _avg(http, "/api/perf/shared", admin), lambda a: a == 1)
    assert await _get(http, "/api/perf", admin) == (200, ["shared"])
    assert await _get(http, "/api/perf?tenant=t1", admin) == (200, ["box"])
    assert await _avg(http, "/api/perf/box?tenant=t1", admin) == 2
    assert await _get(http, "/api/perf", t1) == (200, ["box"])
    assert (await _get(http, "/api/perf/shared", t1))[0] == 404
    status, body = await _get(http, "/api/perf?tenant=a.b", admin)
    assert (status, body["field"]) == (400, "tenant")


async def test_samples_stored_before_tenants_are_read_as_hosts_without_a_tenant(
    http: Http, worker: Worker
) -> None:
    """The old `perf` meter's windows are shown as hosts without a tenant, merged exactly
    with new samples of the same host; a `perf` event sent after the upgrade is not."""
    admin, t1 = _h(ADMIN), await _user(http, "t1")
    resp = await http.post(
        "/api/create-meter",
        json={
            "id": "perf",
            "eventType": "perf",
            "aggregation": "avg",
            "valueProperty": "$.value",
            "groupBy": {"label": "$.label"},
        },
        headers=admin,
    )
    assert resp.status == 201
    epoch = int(time.time())
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    for i, value in enumerate((10, 20)):  # as the gateway published them before tenants
        event = {
            "id": f"old-{i}",
            "eventType": "perf",
            "subject": "legacy-host",
            "time": at,
            "data": {"label": "cpu", "value": value},
        }
        assert (await http.post("/api/register-event", json=event, headers=admin)).status == 202
    await eventually(lambda: _avg(http, "/api/perf/legacy-host", admin), lambda a: a == 15)
    resp = await http.post(f"/api/perf/legacy-host/{epoch}", json={"cpu": 60}, headers=admin)
    assert resp.status == 202
    _, body = await eventually(
        lambda: _get(http, "/api/perf/legacy-host", admin),
        lambda r: r[0] == 200 and r[1][CPU]["averages"][0]["num-samples"] == 3,
    )
    assert body[CPU]["averages"][0]["avg"] == 30
    assert await _get(http, "/api/perf", admin) == (200, ["legacy-host"])
    assert await _get(http, "/api/perf", t1) == (200, [])
    # A user's perf event after the upgrade (subject stamped t1) lands in the old meter's
    # window of "host" t1: not shown, for it could come from anyone.
    event = {"id": "late", "eventType": "perf", "time": at, "data": {"label": "cpu", "value": 1}}
    assert (await http.post("/api/register-event", json=event, headers=t1)).status == 202

    async def old_readings() -> list[dict[str, Any]]:
        resp = await http.get("/api/readings?meter=perf", headers=admin)
        out: list[dict[str, Any]] = await resp.json()
        return out

    await eventually(old_readings, lambda rs: {r["subject"] for r in rs} == {"legacy-host", "t1"})
    assert await _get(http, "/api/perf", admin) == (200, ["legacy-host"])
    assert (await _get(http, "/api/perf/t1", admin))[0] == 404
