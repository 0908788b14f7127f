"""Corrections over HTTP (issue 18): cancel, amend and look up stored events by id, against a
real nats-server; what the routes store is read back from the stream. No worker is needed:
applying corrections is the worker's part."""

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any
from urllib.parse import quote

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from nats.aio.client import Client

from kloudmeter_py.config import Settings
from kloudmeter_py.core.corrections import correction_id
from kloudmeter_py.gateway import create_app
from kloudmeter_py.store.events import Stored, find_events, stored_event
from tests.helpers import Http, post_event, publish_event

STREAM = "meters"
T0 = "2026-11-22T10:00:00Z"
ADMIN_TOKEN = "admin-token-for-corrections-0123456789"


async def _original(nc: Client, event_id: str) -> Stored:
    found = await find_events(nc.jetstream(), STREAM, f"{STREAM}.events.>", event_id)
    assert len(found.events) == 1, found
    return found.events[0]


async def _last(nc: Client) -> Stored:
    """The message stored last in the events stream, decoded."""
    js = nc.jetstream()
    seq = (await js.stream_info(STREAM)).state.last_seq
    stored = await stored_event(js, STREAM, seq)
    assert stored is not None
    return stored


async def _json(resp: Any, status: int) -> Any:
    assert resp.status == status, await resp.text()
    return await resp.json()


async def _cloud(http: Http, event_id: str, source: str, subject: str, **data: Any) -> None:
    resp = await http.post(
        "/api/v1/events",
        json={
            "id": event_id,
            "source": source,
            "specversion": "1.0",
            "type": "api-calls",
            "subject": subject,
            "time": T0,
            "data": data,
        },
        headers={"Content-Type": "application/cloudevents+json"},
    )
    assert resp.status == 204, await resp.text()


async def test_cancel_stores_a_correction_on_the_originals_subject(http: Http, nc: Client) -> None:
    """A cancel is stored on the original's subject (same partition), with the correction id
    as its id and Nats-Msg-Id, the original's seq, empty data and no time."""
    await post_event(
        http, id="evt-1", eventType="api-calls", subject="acme", time=T0, data={"tokens": 5}
    )
    original = await _original(nc, "evt-1")
    body = await _json(await http.post("/api/events/evt-1/cancel"), 202)
    cid = correction_id(original.seq, "cancel", None, None)
    assert body == {
        "status": "ok",
        "duplicate": False,
        "correctionId": cid,
        "of": {"id": "evt-1", "seq": original.seq, "subject": "acme", "eventType": "api-calls"},
    }
    stored = await _last(nc)
    assert stored.subject == original.subject  # meters.events.<same partition>.api-calls.acme
    assert stored.event.id == cid and stored.event.correction is not None
    assert msgspec.json.decode(stored.raw) == {
        "id": cid,
        "eventType": "api-calls",
        "subject": "acme",
        "data": {},
        "correction": {"action": "cancel", "of": "evt-1", "seq": original.seq},
    }
    msg = await nc.jetstream().get_msg(STREAM, seq=stored.seq)
    assert msg.headers is not None and msg.headers["Nats-Msg-Id"] == cid


async def test_a_retried_correction_is_a_duplicate(http: Http, nc: Client) -> None:
    """The same cancel or amend again answers duplicate: true and stores nothing more."""
    await post_event(http, id="evt-1", eventType="api-calls", subject="acme", time=T0)
    first = await _json(await http.post("/api/events/evt-1/cancel", json={}), 202)
    last_seq = (await _last(nc)).seq
    again = await _json(await http.post("/api/events/evt-1/cancel"), 202)
    assert again == {**first, "duplicate": True}
    amend = {"data": {"tokens": 9}}
    first = await _json(await http.post("/api/events/evt-1/amend", json=amend), 202)
    assert first["duplicate"] is False and first["correctionId"] != again["correctionId"]
    again = await _json(await http.post("/api/events/evt-1/amend", json=amend), 202)
    assert again == {**first, "duplicate": True}
    assert (await _last(nc)).seq == last_seq + 1


async def test_amend_keeps_what_it_does_not_change(http: Http, nc: Client) -> None:
    """Amending data keeps the original's time; amending the time keeps its data; an event
    stored without a time keeps its stored time."""
    await post_event(
        http, id="evt-1", eventType="api-calls", subject="acme", time=T0, data={"tokens": 5}
    )
    await post_event(http, id="evt-2", eventType="api-calls", subject="acme", data={"n": 1})
    original = await _original(nc, "evt-1")

    body = await _json(await http.post("/api/events/evt-1/amend", json={"data": {"t": 7}}), 202)
    stored = await _last(nc)
    assert stored.event.id == body["correctionId"]
    assert stored.event.data == {"t": 7} and stored.event.time == original.event.time
    assert stored.event.correction is not None
    assert (stored.event.correction.action, stored.event.correction.of) == ("amend", "evt-1")
    assert stored.event.correction.seq == original.seq
    assert body["correctionId"] == correction_id(
        original.seq, "amend", {"t": 7}, original.event.time
    )

    new_time = "2026-11-23T08:30:00+02:00"
    await _json(await http.post("/api/events/evt-1/amend", json={"time": new_time}), 202)
    stored = await _last(nc)
    assert stored.event.data == {"tokens": 5}
    assert stored.event.time is not None and stored.event.time.isoformat() == (
        "2026-11-23T08:30:00+02:00"
    )

    timeless = await _original(nc, "evt-2")
    await _json(await http.post("/api/events/evt-2/amend", json={"data": {"n": 2}}), 202)
    stored = await _last(nc)
    assert stored.event.time == timeless.time  # the stored time of the original


async def test_get_shows_corrections_in_order_and_what_the_event_counts_as(
    http: Http, nc: Client
) -> None:
    """GET: the event, its corrections in stream order, and current: null while cancelled,
    the last amendment after a cancel then an amend."""
    await post_event(
        http, id="evt-1", eventType="api-calls", subject="acme", time=T0, data={"tokens": 5}
    )
    view = await _json(await http.get("/api/events/evt-1"), 200)
    original = await _original(nc, "evt-1")
    assert view["seq"] == original.seq and view["corrections"] == []
    assert (view["eventType"], view["subject"]) == ("api-calls", "acme")
    assert view["data"] == {"tokens": 5}
    assert datetime.fromisoformat(view["storedAt"]) == original.time
    assert view["time"] == view["current"]["time"] == T0
    assert view["current"]["data"] == {"tokens": 5}

    cancel = await _json(await http.post("/api/events/evt-1/cancel"), 202)
    view = await _json(await http.get("/api/events/evt-1"), 200)
    assert view["current"] is None
    assert [c["action"] for c in view["corrections"]] == ["cancel"]
    assert view["corrections"][0]["id"] == cancel["correctionId"]

    amend = await _json(await http.post("/api/events/evt-1/amend", json={"data": {"t": 1}}), 202)
    view = await _json(await http.get("/api/events/evt-1"), 200)
    assert [(c["id"], c["action"]) for c in view["corrections"]] == [
        (cancel["correctionId"], "cancel"),
        (amend["correctionId"], "amend"),
    ]
    seqs = [c["seq"] for c in view["corrections"]]
    assert original.seq < seqs[0] < seqs[1]
    assert view["current"] == {"time": T0, "data": {"t": 1}}


async def test_cancel_amend_cancel_are_three_corrections_and_a_retry_is_one(http: Http) -> None:
    """Cancel, amend, cancel again: the second cancel has an id of its own (it names the
    correction it follows), so it is stored; the same request again is a duplicate."""
    await post_event(http, id="evt-1", eventType="api-calls", subject="acme", time=T0)
    first = await _json(await http.post("/api/events/evt-1/cancel"), 202)
    await _json(await http.post("/api/events/evt-1/amend", json={"data": {"t": 1}}), 202)
    again = await _json(await http.post("/api/events/evt-1/cancel"), 202)
    assert again["duplicate"] is False and again["correctionId"] != first["correctionId"]
    retry = await _json(await http.post("/api/events/evt-1/cancel"), 202)
    assert retry["duplicate"] is True and retry["correctionId"] == again["correctionId"]
    view = await _json(await http.get("/api/events/evt-1"), 200)
    assert [c["action"] for c in view["corrections"]] == ["cancel", "amend", "cancel"]
    assert view["current"] is None


async def test_a_nats_producers_correction_without_seq_is_shown(http: Http, nc: Client) -> None:
    """A correction published straight to NATS without the original's seq still names the
    original by id: GET shows it."""
    await post_event(http, id="evt-1", eventType="api-calls", subject="acme", time=T0)
    await publish_event(
        nc,
        id="kloudmeter-correction#by-hand",
        eventType="api-calls",
        subject="acme",
        time=T0,
        data={"tokens": 3},
        correction={"action": "amend", "of": "evt-1"},
    )
    view = await _json(await http.get("/api/events/evt-1"), 200)
    assert [c["id"] for c in view["corrections"]] == ["kloudmeter-correction#by-hand"]
    assert view["current"] == {"time": T0, "data": {"tokens": 3}}


async def test_cloud_events_by_id_and_by_source(http: Http, nc: Client) -> None:
    """A CloudEvent is found by its id or by <source>#<id>; the same id from two sources
    answers 409 naming both, and ?source= picks one."""
    await _cloud(http, "ce-1", "app", "acme", tokens=4)
    body = await _json(await http.post("/api/events/ce-1/cancel"), 202)
    assert body["of"]["id"] == "app#ce-1"
    stored = await _last(nc)
    assert stored.event.correction is not None and stored.event.correction.of == "app#ce-1"
    view = await _json(await http.get("/api/events/app%23ce-1"), 200)
    assert view["source"] == "app" and view["current"] is None

    await _cloud(http, "ce-1", "//billing/v2", "acme", tokens=8)
    body = await _json(await http.get("/api/events/ce-1"), 409)
    assert body["field"] == "source"
    assert "'//billing/v2'" in body["message"] and "'app'" in body["message"]
    assert "?source=" in body["message"]
    view = await _json(await http.get("/api/events/ce-1", params={"source": "//billing/v2"}), 200)
    assert view["id"] == "//billing/v2#ce-1" and view["data"] == {"tokens": 8}
    assert view["corrections"] == []
    path = "/api/events/%2F%2Fbilling%2Fv2%23ce-1/amend"
    body = await _json(await http.post(path, json={"data": {"tokens": 1}}), 202)
    assert body["of"]["id"] == "//billing/v2#ce-1"


async def test_lookup_errors_name_the_problem(http: Http, nc: Client) -> None:
    """Unknown id 404; a correction's id 400; an invalid amend body 400 naming the field; an
    event type no meter reads can still be corrected."""
    body = await _json(await http.get("/api/events/nope"), 404)
    assert body == {"status": "error", "message": "event 'nope' not found", "field": "id"}
    await _json(await http.post("/api/events/nope/cancel"), 404)
    await post_event(http, id="evt-1", eventType="no-meter-reads-this", subject="acme")
    cancel = await _json(await http.post("/api/events/evt-1/cancel"), 202)
    cid = quote(cancel["correctionId"], safe="")
    for method, path in (
        ("GET", f"/api/events/{cid}"),
        ("POST", f"/api/events/{cid}/cancel"),
        ("POST", f"/api/events/{cid}/amend"),
    ):
        kw = {"json": {"data": {}}} if path.endswith("amend") else {}
        body = await _json(await http.request(method, path, **kw), 400)
        assert body["message"] == "a correction cannot be corrected" and body["field"] == "id"
    for amend, field in (
        ({}, "data"),
        ({"data": 3}, "data"),
        ({"data": None}, "data"),
        ({"time": "yesterday"}, "time"),
        ({"time": "2026-11-22T10:00:00"}, "time"),  # no offset
        ({"data": {}, "tokens": 3}, "tokens"),
    ):
        body = await _json(await http.post("/api/events/evt-1/amend", json=amend), 400)
        assert body["field"] == field, (amend, body)
    body = await _json(await http.post("/api/events/evt-1/cancel", json={"why": "x"}), 400)
    assert body["field"] == "why"


async def test_an_id_not_found_after_retention_dropped_events_is_a_conflict(
    http: Http, nc: Client
) -> None:
    """Once the stream lost its first events, an id not found may have left retention: 409
    naming the first retained event's stored time."""
    await post_event(http, id="old", eventType="api-calls", subject="acme")
    await post_event(http, id="kept", eventType="api-calls", subject="acme")
    js = nc.jetstream()
    assert await js.delete_msg(STREAM, 1)
    kept = await _original(nc, "kept")
    body = await _json(await http.post("/api/events/old/cancel"), 409)
    assert body["field"] == "id"
    assert "may have left retention" in body["message"]
    assert kept.time.isoformat() in body["message"]
    await _json(await http.get("/api/events/kept"), 200)


async def test_ingest_refuses_the_correction_id_space(http: Http) -> None:
    """Producers may not send corrections through ingest, nor use their ids or source."""
    correction = {"action": "cancel", "of": "evt-1"}
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("/api/register-event", {"id": "e", "eventType": "t", "subject": "s",
                                 "correction": correction}, "correction"),
        ("/api/register-event", {"id": "kloudmeter-correction#1.cancel", "eventType": "t",
                                 "subject": "s"}, "id"),
        ("/api/register-event", {"id": "kloudmeter-correction#1.cancel", "eventType": "t",
                                 "subject": "s", "correction": correction}, "correction"),
        ("/api/register-event", {"id": "1", "source": "kloudmeter-correction",
                                 "specversion": "1.0", "type": "t", "subject": "s"}, "source"),
        ("/api/v1/events", {"id": "1", "source": "kloudmeter-correction",
                            "specversion": "1.0", "type": "t", "subject": "s"}, "source"),
        ("/api/v1/events", {"id": "1", "source": "app", "specversion": "1.0", "type": "t",
                            "subject": "s", "correction": correction}, "correction"),
    ]  # fmt: skip
    for path, event, field in cases:
        for body in (event, [event]) if path.endswith("v1/events") else (event,):
            resp = await http.post(path, json=body)
            answer = await _json(resp, 400)
            assert answer["field"] == field, (path, body, answer)
            text = answer.get("message") or answer.get("detail")
            assert "/api/events/{id}/cancel" in text, text
    # An escaped spelling of the attribute is refused too.
    raw = b'{"id":"e","eventType":"t","subject":"s","\\u0063orrection":{"action":"cancel"}}'
    resp = await http.post(
        "/api/register-event", data=raw, headers={"Content-Type": "application/json"}
    )
    assert (await _json(resp, 400))["field"] == "correction"


# -- tenants ------------------------------------------------------------------------------


@pytest.fixture
async def secured_http(nc: Client, settings: Settings) -> AsyncIterator[Http]:
    app = create_app(msgspec.structs.replace(settings, admin_token=ADMIN_TOKEN), nc)
    async with TestClient(TestServer(app)) as client:
        yield client


def _h(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _token(http: Http, tenant: str) -> dict[str, str]:
    resp = await http.post("/api/users", json={"tenant": tenant}, headers=_h(ADMIN_TOKEN))
    return _h((await _json(resp, 201))["token"])


async def test_another_tenants_event_answers_exactly_like_an_unknown_one(
    secured_http: Http, nc: Client
) -> None:
    """A user finds only its own tenant's events: another tenant's id answers as an unknown
    one did before it was stored, on every route; naming the other tenant is 403."""
    http = secured_http
    acme, globex = await _token(http, "acme"), await _token(http, "globex")
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/api/events/g-1", {}),
        ("POST", "/api/events/g-1/cancel", {}),
        ("POST", "/api/events/g-1/amend", {"json": {"data": {"n": 1}}}),
    ]

    async def answers() -> list[tuple[int, str]]:
        out = []
        for method, path, kw in calls:
            resp = await http.request(method, path, headers=acme, **kw)
            out.append((resp.status, await resp.text()))
        return out

    before = await answers()
    assert [status for status, _ in before] == [404, 404, 404]
    resp = await http.post(
        "/api/register-event",
        json={"id": "g-1", "eventType": "api-calls", "data": {"n": 5}},
        headers=globex,
    )
    await _json(resp, 202)
    assert await answers() == before
    resp = await http.get("/api/events/g-1", params={"subject": "globex"}, headers=acme)
    assert (await _json(resp, 403))["field"] == "subject"
    # Its own tenant's user and the admin find it.
    view = await _json(await http.get("/api/events/g-1", headers=globex), 200)
    assert view["subject"] == "globex"
    await _json(await http.get("/api/events/g-1", headers=_h(ADMIN_TOKEN)), 200)
    body = await _json(await http.post("/api/events/g-1/cancel", headers=globex), 202)
    assert body["of"]["subject"] == "globex"


async def test_an_admin_narrows_the_scan_with_subject(secured_http: Http, nc: Client) -> None:
    """?subject= scans that subject's events only: another subject's event is not found."""
    http = secured_http
    admin = _h(ADMIN_TOKEN)
    await _json(
        await http.post(
            "/api/register-event",
            json={"id": "a-1", "eventType": "api-calls", "subject": "acme"},
            headers=admin,
        ),
        202,
    )
    found = await _json(
        await http.get("/api/events/a-1", params={"subject": "acme"}, headers=admin), 200
    )
    assert found["subject"] == "acme"
    resp = await http.get("/api/events/a-1", params={"subject": "globex"}, headers=admin)
    assert (await _json(resp, 404))["field"] == "id"
    resp = await http.post("/api/events/a-1/cancel", params={"subject": "acme"}, headers=admin)
    assert (await _json(resp, 202))["of"]["subject"] == "acme"


async def test_an_id_stored_twice_is_a_conflict_naming_how_to_pick(http: Http, nc: Client) -> None:
    """Events that share an id (published without a Nats-Msg-Id, so not deduplicated): 409
    naming the subjects (?subject= picks one), or the stream sequences within one subject."""
    js = nc.jetstream()
    for subject in ("acme", "acme", "globex"):
        body = {"id": "twice", "eventType": "api-calls", "subject": subject}
        await js.publish(f"{STREAM}.events.api-calls.{subject}", msgspec.json.encode(body))
    body = await _json(await http.get("/api/events/twice"), 409)
    assert body["field"] == "subject" and "'acme', 'globex'" in body["message"]
    view = await _json(await http.get("/api/events/twice", params={"subject": "globex"}), 200)
    assert view["subject"] == "globex"
    body = await _json(await http.post("/api/events/twice/cancel?subject=acme"), 409)
    assert body["field"] == "id" and "sequences 1, 2" in body["message"]


async def test_a_scan_leaves_no_consumer_behind(http: Http, nc: Client) -> None:
    """The ephemeral consumer of each lookup is deleted when it ends, found or not."""
    await post_event(http, id="evt-1", eventType="api-calls", subject="acme")
    await _json(await http.get("/api/events/evt-1"), 200)
    await _json(await http.get("/api/events/nope"), 404)
    await _json(await http.post("/api/events/evt-1/cancel"), 202)
    assert await nc.jetstream().consumers_info(STREAM) == []


async def test_a_lookup_past_the_read_deadline_answers_503(nc: Client, settings: Settings) -> None:
    """A scan longer than METER_READ_TIMEOUT_MS stops with 503 and deletes its consumer.

    30,000 events: more than one pull request of the scan (store.events._BATCH), and the
    deadline is looked at as each begins, after the first has taken well over 1 ms. With
    10,000 (one request) a fast machine delivered them all inside the first 50 ms slice of
    waiting, before the deadline was looked at again, and the lookup answered 404."""
    js = nc.jetstream()
    body = msgspec.json.encode({"id": "bulk", "eventType": "api-calls", "subject": "acme"})
    for _ in range(30):
        await asyncio.gather(
            *(js.publish(f"{STREAM}.events.api-calls.acme", body) for _ in range(1000))
        )
    app = create_app(msgspec.structs.replace(settings, read_timeout_ms=1), nc)
    async with TestClient(TestServer(app)) as http:
        answer = await _json(await http.get("/api/events/nope"), 503)
    assert "METER_READ_TIMEOUT_MS" in answer["message"]
    assert await js.consumers_info(STREAM) == []
