"""A customer's usage (issue 19, part 2): meter queries by filterCustomerId merge a customer's
subjects, and a user whose tenant is a customer's key reads and sends for every subject the
customer owns and nothing else; through the openmeter SDK against a live gateway, worker and
nats-server."""

import csv
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from corehttp.exceptions import HttpResponseError, ResourceNotFoundError
from nats.aio.client import Client
from openmeter.aio import Client as OpenMeter

from kloudmeter_py.config import Settings
from kloudmeter_py.gateway import create_app
from kloudmeter_py.worker import Worker
from tests.conftest import eventually
from tests.helpers import Http, readings, total_count

ADMIN_TOKEN = "admin-token-for-customer-usage-01234"


def _client(http: Http, token: str | None = None) -> Any:
    """The SDK's client (typed Any: its shadowed operation classes confuse mypy)."""
    return OpenMeter(endpoint=str(http.make_url("")).rstrip("/"), token=token, retry_total=0)


def _problem(err: pytest.ExceptionInfo[Any]) -> dict[str, Any]:
    response: Any = err.value.response
    body: dict[str, Any] = response.json()
    return body


def _event(event_id: str, subject: str, t: datetime, tokens: int, model: str) -> dict[str, Any]:
    return {
        "id": event_id,
        "source": "tests",
        "specversion": "1.0",
        "type": "prompt",
        "subject": subject,
        "time": t.isoformat().replace("+00:00", "Z"),
        "data": {"tokens": tokens, "model": model},
    }


async def _meters(om: Any) -> None:
    for slug, aggregation in (("tokens", "SUM"), ("tokens_avg", "AVG")):
        await om.meters.create(
            {
                "slug": slug,
                "aggregation": aggregation,
                "eventType": "prompt",
                "valueProperty": "$.tokens",
                "groupBy": {"model": "$.model"},
            }
        )


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


async def _user_token(http: Http, tenant: str) -> str:
    resp = await http.post(
        "/api/users", json={"tenant": tenant}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert resp.status == 201, await resp.text()
    token: str = (await resp.json())["token"]
    return token


async def test_filter_customer_id_merges_each_customers_subjects(
    http: Http, worker: Worker
) -> None:
    """One row per customer over all its subjects (its key included), with its customerId;
    split by subject, each row with its customer; an unknown customer: 404; CSV too."""
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    span = {"from_parameter": hour, "to": hour + timedelta(hours=1)}
    async with _client(http) as om:
        await _meters(om)
        acme = await om.customers.create(
            {"name": "ACME", "key": "acme", "usageAttribution": {"subjectKeys": ["a-web", "a-api"]}}
        )
        globex = await om.customers.create(
            {"name": "Globex", "usageAttribution": {"subjectKeys": ["gx"]}}
        )
        await om.events.ingest_events(
            [
                _event("1", "a-web", hour, 10, "gpt"),
                _event("2", "a-api", hour + timedelta(minutes=5), 5, "llama"),
                _event("3", "acme", hour + timedelta(minutes=9), 3, "gpt"),  # the key's
                _event("4", "gx", hour, 100, "gpt"),
                _event("5", "stray", hour, 7, "gpt"),  # nobody's
            ]
        )
        await eventually(lambda: readings(http, meter="tokens"), lambda r: total_count(r) == 5)

        one = await om.meters.query_json("tokens", filter_customer_id=[acme.id], **span)
        assert [(r.customer_id, r.subject, r.value) for r in one.data] == [(acme.id, None, 18.0)]
        avg = await om.meters.query_json("tokens_avg", filter_customer_id=["acme"], **span)
        assert [(r.customer_id, r.value) for r in avg.data] == [(acme.id, 6.0)]  # 18 / 3
        both = await om.meters.query_json(
            "tokens", filter_customer_id=[acme.id, globex.id], group_by=["customer_id"], **span
        )
        assert sorted((r.customer_id, r.value) for r in both.data) == sorted(
            [(acme.id, 18.0), (globex.id, 100.0)]
        )
        by_subject = await om.meters.query_json(
            "tokens", filter_customer_id=[acme.id], group_by=["subject"], **span
        )
        assert sorted((r.subject, r.customer_id, r.value) for r in by_subject.data) == [
            ("a-api", acme.id, 5.0),
            ("a-web", acme.id, 10.0),
            ("acme", acme.id, 3.0),
        ]
        by_model = await om.meters.query(
            "tokens",
            {
                "from": hour.isoformat(),
                "to": (hour + timedelta(hours=1)).isoformat(),
                "filterCustomerId": ["acme"],
                "groupBy": ["model"],
            },
        )
        assert sorted((r.group_by["model"], r.customer_id, r.value) for r in by_model.data) == [
            ("gpt", acme.id, 13.0),
            ("llama", acme.id, 5.0),
        ]
        # subject and filterCustomerId together: the subjects of both.
        narrowed = await om.meters.query_json(
            "tokens", filter_customer_id=[acme.id], subject=["a-web", "gx"], **span
        )
        assert [(r.subject, r.value) for r in narrowed.data] == [("a-web", 10.0)]
        disjoint = await om.meters.query_json(
            "tokens", filter_customer_id=[acme.id], subject=["gx"], **span
        )
        assert disjoint.data == []

        with pytest.raises(ResourceNotFoundError) as err:
            await om.meters.query_json("tokens", filter_customer_id=["nobody"], **span)
        assert _problem(err)["field"] == "filterCustomerId"
        with pytest.raises(HttpResponseError) as bad:
            await om.meters.query_json("tokens", group_by=["customer_id"], **span)
        assert bad.value.status_code == 400 and _problem(bad)["field"] == "groupBy"

    resp = await http.get(
        "/api/v1/meters/tokens/query",
        params={
            "from": hour.isoformat(),
            "to": (hour + timedelta(hours=1)).isoformat(),
            "filterCustomerId": globex.id,
        },
        headers={"Accept": "text/csv"},
    )
    rows = list(csv.reader(io.StringIO(await resp.text())))
    assert rows[0] == ["window_start", "window_end", "subject", "customer_id", "value"]
    assert [(r[3], r[4]) for r in rows[1:]] == [(globex.id, "100")]


async def test_a_customers_user_reads_and_sends_for_its_subjects_only(
    http: Http, secured: Http, worker: Worker
) -> None:
    """A user whose tenant is a customer's key: queries, readings, the event list and ingest
    cover every subject the customer owns; another subject - another customer's or nobody's -
    is never shown, and another customer answers like an unknown one."""
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    span = {"from_parameter": hour, "to": hour + timedelta(hours=1)}
    async with _client(secured, ADMIN_TOKEN) as admin:
        await _meters(admin)
        acme = await admin.customers.create(
            {"name": "ACME", "key": "acme", "usageAttribution": {"subjectKeys": ["a-web", "a-api"]}}
        )
        await admin.customers.create(
            {"name": "Globex", "key": "globex", "usageAttribution": {"subjectKeys": ["gx"]}}
        )
        await admin.events.ingest_events(
            [_event("g1", "gx", hour, 100, "gpt"), _event("s1", "stray", hour, 7, "gpt")]
        )
    token = await _user_token(secured, "acme")
    async with _client(secured, token) as user:
        await user.events.ingest_events(
            [_event("u1", "a-web", hour, 10, "gpt"), _event("u2", "a-api", hour, 5, "llama")]
        )
        for other in ("gx", "stray"):
            with pytest.raises(HttpResponseError) as err:
                await user.events.ingest_event(_event("x", other, hour, 1, "gpt"))
            assert err.value.status_code == 403 and _problem(err)["field"] == "subject"
        # KloudMeter's ingest: no subject is the tenant's own (the customer's key).
        resp = await secured.post(
            "/api/register-event",
            json={
                "id": "k1",
                "eventType": "prompt",
                "time": hour.isoformat(),
                "data": {"tokens": 3},
            },
            headers={"Authorization": f"Bearer {token}"},
        )
        assert resp.status == 202, await resp.text()
        await eventually(lambda: readings(http, meter="tokens"), lambda r: total_count(r) == 5)

        mine = await user.meters.query_json("tokens", **span)
        assert sorted((r.subject, r.value) for r in mine.data) == [
            ("a-api", 5.0),
            ("a-web", 10.0),
            ("acme", 3.0),
        ]
        asked = await user.meters.query_json("tokens", subject=["gx", "stray", "a-web"], **span)
        assert [(r.subject, r.value) for r in asked.data] == [("a-web", 10.0)]
        none = await user.meters.query_json("tokens", subject=["gx"], **span)
        assert none.data == []  # the negative: another customer's subject is not read
        merged = await user.meters.query_json("tokens", filter_customer_id=["acme"], **span)
        assert [(r.customer_id, r.value) for r in merged.data] == [(acme.id, 18.0)]
        answers = []
        for named in ("globex", "nobody"):
            with pytest.raises(ResourceNotFoundError) as err:
                await user.meters.query_json("tokens", filter_customer_id=[named], **span)
            answers.append(_problem(err)["detail"].replace(named, "?"))
        assert answers[0] == answers[1]  # another tenant's customer: like an unknown one
        assert sorted(await user.meters.list_subjects("tokens")) == ["a-api", "a-web", "acme"]
        listed = await user.events.list(from_parameter=hour - timedelta(hours=1))
        assert sorted(e.event.subject for e in listed) == ["a-api", "a-web", "acme"]
        with pytest.raises(HttpResponseError) as forbidden:
            await user.customers.list()
        assert forbidden.value.status_code == 403

    headers = {"Authorization": f"Bearer {token}"}
    resp = await secured.get("/api/readings", params={"meter": "tokens"}, headers=headers)
    rs = await resp.json()
    assert sorted(r["subject"] for r in rs) == ["a-api", "a-web", "acme"]
    resp = await secured.get("/api/readings", params={"subject": "gx"}, headers=headers)
    assert await resp.json() == []
    resp = await secured.get("/api/readings", params={"meter": "tokens"})
    assert resp.status == 401

    # A user whose tenant is a subject, not a customer's key: that subject alone.
    gx = await _user_token(secured, "gx")
    async with _client(secured, gx) as user:
        only = await user.meters.query_json("tokens", **span)
        assert [(r.subject, r.value) for r in only.data] == [("gx", 100.0)]
        with pytest.raises(ResourceNotFoundError):
            await user.meters.query_json("tokens", filter_customer_id=["globex"], **span)
