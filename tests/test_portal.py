"""Portal tokens (issue 19, part 5): the pure decisions from tables, and the routes through the
official openmeter SDK against a live gateway, worker and nats-server: a portal token reads
only its subject's usage of its allowed meters, opens no other route, and stops working when
invalidated or expired."""

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from corehttp.exceptions import HttpResponseError, ResourceNotFoundError
from nats.aio.client import Client
from openmeter.aio import Client as OpenMeter

from kloudmeter_py.config import Settings
from kloudmeter_py.core.portal import (
    DEFAULT_LIFETIME,
    PortalTokenRecord,
    check_meter,
    expiry,
    usable,
)
from kloudmeter_py.errors import Forbidden, InvalidInput
from kloudmeter_py.gateway import create_app
from kloudmeter_py.store.kv import scan
from kloudmeter_py.store.layout import Layout
from kloudmeter_py.store.portal import PortalStore
from kloudmeter_py.worker import Worker
from tests.conftest import eventually
from tests.helpers import Http, readings, total_count

ADMIN_TOKEN = "admin-token-for-portal-tests-0123456"
NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)


def _client(http: Http, token: str | None = None) -> Any:
    """The SDK's client (typed Any: its shadowed operation classes confuse mypy)."""
    return OpenMeter(endpoint=str(http.make_url("")).rstrip("/"), token=token, retry_total=0)


def _problem(err: pytest.ExceptionInfo[Any]) -> dict[str, Any]:
    body: dict[str, Any] = err.value.response.json()
    return body


def _record(**kw: Any) -> PortalTokenRecord:
    base: dict[str, Any] = {
        "id": "t",
        "subject": "acme",
        "expiresAt": NOW + timedelta(hours=1),
        "createdAt": NOW,
        "tokenHash": "h",
    }
    return PortalTokenRecord(**{**base, **kw})


# -- pure decisions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("asked", "expires", "refused"),
    [
        (None, NOW + DEFAULT_LIFETIME, False),
        (NOW + timedelta(days=30), NOW + timedelta(days=30), False),
        (NOW, None, True),  # not in the future
        (NOW - timedelta(seconds=1), None, True),
        (NOW + timedelta(days=367), None, True),  # too far
    ],
)
def test_a_token_expires_when_asked_or_in_an_hour(
    asked: datetime | None, expires: datetime | None, refused: bool
) -> None:
    if refused:
        with pytest.raises(InvalidInput) as err:
            expiry(asked, NOW)
        assert err.value.field == "expiresAt"
    else:
        assert expiry(asked, NOW) == expires


@pytest.mark.parametrize(
    ("record", "at", "ok"),
    [
        (_record(), NOW, True),
        (_record(), NOW + timedelta(hours=1), False),  # expires at its expiresAt
        (_record(invalidatedAt=NOW), NOW, False),
    ],
)
def test_a_token_is_usable_until_it_expires_or_is_invalidated(
    record: PortalTokenRecord, at: datetime, ok: bool
) -> None:
    assert usable(record, at) is ok


def test_a_token_reads_only_its_allowed_meters() -> None:
    check_meter(_record(), "any")
    check_meter(_record(allowedMeterSlugs=["tokens"]), "tokens")
    with pytest.raises(Forbidden) as err:
        check_meter(_record(allowedMeterSlugs=["tokens"]), "calls")
    assert err.value.field == "meterSlug"


# -- through the SDK -------------------------------------------------------------------------


@pytest.fixture
async def secured(nc: Client, settings: Settings) -> AsyncIterator[Http]:
    """A gateway with API tokens on, on the test's NATS."""
    on = Settings(
        nats_url=settings.nats_url,
        partitions=settings.partitions,
        admin_token=ADMIN_TOKEN,
        summary_flush_ms=0,
    )
    async with TestClient(TestServer(create_app(on, nc))) as client:
        yield client


def _event(event_id: str, event_type: str, subject: str, t: datetime, n: int) -> dict[str, Any]:
    return {
        "id": event_id,
        "source": "tests",
        "specversion": "1.0",
        "type": event_type,
        "subject": subject,
        "time": t.isoformat().replace("+00:00", "Z"),
        "data": {"n": n},
    }


async def test_a_portal_token_reads_only_its_subject(
    http: Http, secured: Http, worker: Worker, nc: Client, settings: Settings
) -> None:
    """Its subject's rows of an allowed meter, whatever subject or customer it names; 403 on
    another meter; 401 on every other route; list, then invalidation by id: 401."""
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    span = {"from_parameter": hour, "to": hour + timedelta(hours=1)}
    async with _client(secured, ADMIN_TOKEN) as admin:
        for slug, event_type in (("tokens", "prompt"), ("calls", "call")):
            await admin.meters.create(
                {
                    "slug": slug,
                    "aggregation": "SUM",
                    "eventType": event_type,
                    "valueProperty": "$.n",
                }
            )
        globex = await admin.customers.create({"name": "Globex", "key": "globex"})
        await admin.events.ingest_events(
            [
                _event("1", "prompt", "acme", hour, 10),
                _event("2", "prompt", "acme", hour + timedelta(minutes=5), 5),
                _event("3", "prompt", "globex", hour, 100),
                _event("4", "call", "acme", hour, 1),
            ]
        )
        await eventually(lambda: readings(http), lambda r: total_count(r) == 4)
        made = await admin.portal.portal_tokens.create(
            {"subject": "acme", "allowedMeterSlugs": ["tokens"]}
        )
        assert made.subject == "acme" and made.allowed_meter_slugs == ["tokens"]
        assert made.token and made.expired is False
        assert made.expires_at - made.created_at == timedelta(hours=1)
        with pytest.raises(ResourceNotFoundError) as err:
            await admin.portal.portal_tokens.create({"subject": "a", "allowedMeterSlugs": ["no"]})
        assert _problem(err)["field"] == "allowedMeterSlugs"
        with pytest.raises(HttpResponseError) as bad:
            past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
            await admin.portal.portal_tokens.create({"subject": "a", "expiresAt": past})
        assert bad.value.status_code == 400 and _problem(bad)["field"] == "expiresAt"

    async with _client(secured, made.token) as portal:
        mine = await portal.portal.portal_meters.query_json("tokens", **span)
        assert [(r.subject, r.value) for r in mine.data] == [("acme", 15.0)]
        hourly = await portal.portal.portal_meters.query_json(
            "tokens", window_size="MINUTE", filter_customer_id=[globex.id], **span
        )
        assert [(r.subject, r.value) for r in hourly.data] == [("acme", 10.0), ("acme", 5.0)]
        with pytest.raises(HttpResponseError) as other_meter:
            await portal.portal.portal_meters.query_json("calls", **span)
        assert other_meter.value.status_code == 403
        assert _problem(other_meter)["field"] == "meterSlug"
        # Everything else: 401 (a portal token is no API token).
        for call in (
            portal.meters.query_json("tokens", **span),
            portal.meters.list(),
            portal.customers.list(),
            portal.portal.portal_tokens.list(),
            portal.events.list(),
        ):
            with pytest.raises(HttpResponseError) as refused:
                await call
            assert refused.value.status_code == 401
    portal_headers = {"Authorization": f"Bearer {made.token}"}
    params = {"from": hour.isoformat(), "to": (hour + timedelta(hours=1)).isoformat()}
    # Naming another subject is ignored, as OpenMeter ignores it: still acme's usage only.
    resp = await secured.get(
        "/api/v1/portal/meters/tokens/query",
        params={**params, "subject": "globex", "groupBy": "subject"},
        headers=portal_headers,
    )
    body = await resp.json()
    assert [(r["subject"], r["value"]) for r in body["data"]] == [("acme", 15)]
    resp = await secured.get("/api/readings", headers=portal_headers)
    assert resp.status == 401

    # API tokens are refused on the portal route: an admin's, a user's of the same tenant.
    resp = await secured.post(
        "/api/users", json={"tenant": "acme"}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    user_token = (await resp.json())["token"]
    for token in (ADMIN_TOKEN, user_token):
        resp = await secured.get(
            "/api/v1/portal/meters/tokens/query",
            params=params,
            headers={"Authorization": f"Bearer {token}"},
        )
        assert resp.status == 403

    # Only a hash is kept.
    stored = await scan(nc.jetstream(), Layout(settings).portal_bucket)
    assert stored and all(made.token.encode() not in v for _, v in stored)

    async with _client(secured, ADMIN_TOKEN) as admin:
        listed = await admin.portal.portal_tokens.list()
        assert [(t.id, t.subject, t.token, t.expired) for t in listed] == [
            (made.id, "acme", None, False)
        ]
        await admin.portal.portal_tokens.invalidate({"id": made.id})
        listed = await admin.portal.portal_tokens.list(limit=1)
        assert [(t.id, t.expired) for t in listed] == [(made.id, True)]
        with pytest.raises(ResourceNotFoundError):
            await admin.portal.portal_tokens.invalidate({"id": "01J000000000000000000000XX"})
    async with _client(secured, made.token) as portal:
        with pytest.raises(HttpResponseError) as gone:
            await portal.portal.portal_meters.query_json("tokens", **span)
        assert gone.value.status_code == 401


async def test_tokens_are_invalidated_by_subject_and_expire(
    http: Http, worker: Worker, nc: Client, settings: Settings
) -> None:
    """Invalidation by subject ends all its tokens (not others'); a token past its expiresAt
    answers 401; with API tokens off, the portal route still needs a portal token."""
    async with _client(http) as admin:
        await admin.meters.create({"slug": "tokens", "aggregation": "COUNT", "eventType": "p"})
        a1 = await admin.portal.portal_tokens.create({"subject": "a"})
        a2 = await admin.portal.portal_tokens.create({"subject": "a"})
        b = await admin.portal.portal_tokens.create({"subject": "b"})

        async def status(token: str | None) -> int:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            resp = await http.get("/api/v1/portal/meters/tokens/query", headers=headers)
            return resp.status

        assert [await status(t.token) for t in (a1, a2, b)] == [200, 200, 200]
        assert await status(None) == 401
        await admin.portal.portal_tokens.invalidate({"subject": "a"})
        assert [await status(t.token) for t in (a1, a2, b)] == [401, 401, 200]
        with pytest.raises(HttpResponseError) as bad:
            await admin.portal.portal_tokens.invalidate({})
        assert bad.value.status_code == 400

    store = PortalStore(nc.jetstream(), Layout(settings))
    _, soon = await store.create("c", None, datetime.now(UTC) + timedelta(seconds=1))
    assert await status(soon) == 200
    await eventually(lambda: status(soon), lambda s: s == 401, timeout=5)
