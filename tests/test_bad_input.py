"""Bad input gets a clear error naming the field, and is never silently lost."""

from typing import Any

import msgspec
import pytest
from nats.aio.client import Client

from kloudmeter_py.config import Settings
from kloudmeter_py.core.models import encoder, meter_in_decoder, reading_decoder, validate_meter
from kloudmeter_py.store.kv import scan
from kloudmeter_py.worker import Worker
from tests.conftest import eventually
from tests.helpers import Http, create_meter, post_event, publish_event, readings, total_count

GOOD_EVENT = {"id": "1", "eventType": "t", "subject": "s", "data": {"v": 1}}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"eventType": "t", "subject": "s"}, "id"),
        ({"id": "1", "subject": "s"}, "eventType"),
        ({"id": "1", "eventType": "t"}, "subject"),
        ({"id": 1, "eventType": "t", "subject": "s"}, "id"),
        ({"id": "1", "eventType": "t", "subject": "s", "data": [1]}, "data"),
        ({"id": "1", "eventType": "t", "subject": "s", "time": "yesterday"}, "time"),
        ({"id": "1", "eventType": "t", "subject": "s", "time": "2026-01-01T00:00:00"}, "time"),
        ({"id": "", "eventType": "t", "subject": "s"}, "id"),
        ({"id": "a\r\nX: b", "eventType": "t", "subject": "s"}, "id"),
    ],
)
async def test_bad_events_get_400_naming_the_field(
    http: Http, body: dict[str, Any], field: str
) -> None:
    """Missing or wrong-typed event fields answer 400 with the field."""
    resp = await http.post("/api/register-event", json=body)
    assert resp.status == 400
    err = await resp.json()
    assert err["status"] == "error" and err["field"] == field and field in err["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[]", b"null"])
async def test_invalid_json_gets_400(http: Http, raw: bytes) -> None:
    """Bodies that are not a JSON object answer 400 with a message."""
    resp = await http.post("/api/register-event", data=raw)
    assert resp.status == 400
    assert (await resp.json())["status"] == "error"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"id": "m", "eventType": "t", "aggregation": "median"}, "aggregation"),
        ({"id": "m", "eventType": "t", "aggregation": "sum"}, "valueProperty"),
        (
            {"id": "m", "eventType": "t", "aggregation": "sum", "valueProperty": "$.a["},
            "valueProperty",
        ),
        (
            {"id": "m", "eventType": "t", "aggregation": "count", "groupBy": {"g": "nope"}},
            "groupBy.g",
        ),
        ({"id": "m", "eventType": "t", "aggregation": 3}, "aggregation"),
        ({"eventType": "t", "aggregation": "count"}, "id"),
        ({"id": "m", "eventType": "t", "aggregation": "count", "colour": 1}, "colour"),
    ],
)
async def test_bad_meters_get_400_naming_the_field(
    http: Http, body: dict[str, Any], field: str
) -> None:
    """Unknown aggregation, bad JSONPath, missing fields: 400 naming the field."""
    resp = await http.post("/api/create-meter", json=body)
    assert resp.status == 400, await resp.text()
    err = await resp.json()
    assert err["field"] == field, err


async def test_existing_meter_id_gets_409(http: Http) -> None:
    """Creating a meter twice answers 409."""
    await create_meter(http, id="m", eventType="t", aggregation="count")
    resp = await http.post(
        "/api/create-meter", json={"id": "m", "eventType": "t", "aggregation": "count"}
    )
    assert resp.status == 409 and "already exists" in (await resp.json())["message"]


async def test_unknown_keys_get_404_and_missing_keys_400(http: Http) -> None:
    """Unknown meter or reading keys are 404; a missing or illegal key is 400."""
    assert (await http.get("/api/meter/", params={"key": "nope"})).status == 404
    assert (await http.delete("/api/meter", params={"key": "nope"})).status == 404
    assert (await http.get("/api/reading/", params={"key": "a.b"})).status == 404
    assert (await http.get("/api/meter/")).status == 400
    assert (await http.get("/api/reading/", params={"key": "a..b"})).status == 400
    resp = await http.get("/api/nothing-here")
    assert resp.status == 404 and (await resp.json())["status"] == "error"


async def test_oversized_body_gets_413_in_the_envelope(nc: Client, settings: Settings) -> None:
    """A body over the configured limit answers 413 with the JSON envelope."""
    from aiohttp.test_utils import TestClient, TestServer

    from kloudmeter_py.gateway import create_app

    small = msgspec.structs.replace(settings, max_body_bytes=2048)
    async with TestClient(TestServer(create_app(small, nc))) as client:
        event = dict(GOOD_EVENT, data={"blob": "x" * 5000})
        resp = await client.post("/api/register-event", json=event)
        assert resp.status == 413
        err = await resp.json()
        assert err["status"] == "error" and "2048" in err["message"]


async def _dead_letters(nc: Client) -> list[tuple[str, dict[str, str], bytes]]:
    js = nc.jetstream()
    info = await js.stream_info("meters_errors")
    out: list[tuple[str, dict[str, str], bytes]] = []
    if not info.state.messages:
        return out
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg("meters_errors", seq)
        out.append((msg.subject, dict(msg.headers or {}), msg.data or b""))
    return out


async def test_unusable_nats_events_are_dead_lettered_with_reasons(
    http: Http, nc: Client, worker: Worker
) -> None:
    """Not JSON, missing fields, a wrong-typed value, a mismatched subject: each dead-lettered
    with its reason; good events around them are counted."""
    await create_meter(http, id="total", eventType="t", aggregation="sum", valueProperty="$.v")
    js = nc.jetstream()
    await publish_event(nc, id="g1", eventType="t", subject="s", data={"v": 2})
    await js.publish("meters.events.t.s", b"\xff not json", headers={"Nats-Msg-Id": "b1"})
    await js.publish("meters.events.t.s", b'{"id":"b2","eventType":"t"}')
    await publish_event(nc, id="b3", eventType="t", subject="s", data={"v": "many"})
    await publish_event(nc, id="b4", eventType="t", subject="s", data={})
    await js.publish(
        "meters.events.t.s",
        msgspec.json.encode({"id": "b5", "eventType": "t", "subject": "other", "data": {"v": 1}}),
    )
    await publish_event(nc, id="g2", eventType="t", subject="s", data={"v": 3})
    rs = await eventually(lambda: readings(http, meter="total"), lambda rs: total_count(rs) == 2)
    assert rs[0]["value"] == 5
    dead = await eventually(lambda: _dead_letters(nc), lambda d: len(d) == 5)
    reasons = [h["Kloudmeter-Error"] for _, h, _ in dead]
    assert "invalid event" in reasons[0] and "JSON" in reasons[0]
    assert "subject" in reasons[1]  # missing required field `subject`
    assert "many" in reasons[2] and dead[2][1]["Kloudmeter-Meter"] == "total"
    assert "no value" in reasons[3]
    assert "do not match" in reasons[4]
    assert dead[0][2] == b"\xff not json"  # the original payload is kept
    assert {s for s, _, _ in dead} == {"meters.event-errors._event", "meters.event-errors.total"}
    resp = await http.get("/api/dead-letters")
    assert await resp.json() == {"total": 5, "byMeter": {"_event": 3, "total": 2}}


async def test_event_failing_one_meter_still_counts_for_the_others(
    http: Http, worker: Worker, nc: Client
) -> None:
    """One event, two meters, bad for one: applied to the other, dead letter names the meter."""
    await create_meter(http, id="calls", eventType="t", aggregation="count")
    await create_meter(http, id="bytes", eventType="t", aggregation="sum", valueProperty="$.b")
    await post_event(http, id="x", eventType="t", subject="s", data={"b": "lots"})
    await post_event(http, id="y", eventType="t", subject="s", data={"b": 10})
    await eventually(lambda: readings(http, meter="calls"), lambda rs: total_count(rs) == 2)
    rs = await eventually(lambda: readings(http, meter="bytes"), lambda rs: total_count(rs) == 1)
    assert rs[0]["value"] == 10
    dead = await eventually(lambda: _dead_letters(nc), lambda d: len(d) == 1)
    subject, headers, _ = dead[0]
    assert subject == "meters.event-errors.bytes" and headers["Kloudmeter-Meter"] == "bytes"


async def test_healthy_reports_nats_state(http: Http, nats_server: Any) -> None:
    """/healthy is 200 with NATS up and 503 once it is gone."""
    resp = await http.get("/healthy")
    assert resp.status == 200 and (await resp.json())["status"] == "ok"
    await nats_server.stop()

    async def status() -> int:
        return (await http.get("/healthy")).status

    await eventually(status, lambda s: s == 503)


async def test_event_count_is_unchanged_by_bad_http_events(http: Http, worker: Worker) -> None:
    """Rejected HTTP events never reach the stream."""
    await create_meter(http, id="m", eventType="t", aggregation="count")
    await http.post("/api/register-event", json={"id": "1", "eventType": "t"})
    await post_event(http, id="2", eventType="t", subject="s")
    rs = await eventually(lambda: readings(http, meter="m"), lambda rs: total_count(rs) >= 1)
    assert total_count(rs) == 1


async def test_bad_events_among_many_of_one_subject_are_the_only_ones_dead_lettered(
    nc: Client, settings: Settings
) -> None:
    """150 events of one subject, waiting before the worker starts, are folded together; two
    do not fit the sum meter: exactly those two are dead-lettered for it, and every event
    still counts for the count meter."""
    meters = await nc.jetstream().key_value("meters")
    for body in (
        {"id": "calls", "eventType": "t", "aggregation": "count"},
        {
            "id": "total",
            "eventType": "t",
            "aggregation": "sum",
            "valueProperty": "$.v",
            "groupBy": {"r": "$.r"},
        },
    ):
        meter = validate_meter(meter_in_decoder.decode(msgspec.json.encode(body)))
        await meters.put(meter.id, encoder.encode(meter))
    expected = {"eu": 0, "us": 0}
    for i in range(150):
        data: dict[str, Any] = {"v": i, "r": "eu" if i % 2 else "us"}
        if i == 37:
            data["v"] = "lots"
        elif i == 120:
            del data["v"]
        else:
            expected[data["r"]] += i
        await publish_event(nc, id=f"e{i}", eventType="t", subject="s", data=data)
    w = Worker(nc, settings, partitions=[0, 1])
    await w.start()
    try:

        async def values() -> dict[tuple[str, str], Any]:
            out = {}
            for _, raw in await scan(nc.jetstream(), "readings", ">"):
                r = reading_decoder.decode(raw)
                out[(r.meterId, r.groupBy.get("r") or "")] = r.value
            return out

        got = await eventually(values, lambda v: len(v) == 3 and v[("calls", "")] == 150)
        assert got == {
            ("calls", ""): 150,
            ("total", "eu"): expected["eu"],
            ("total", "us"): expected["us"],
        }
        dead = await eventually(lambda: _dead_letters(nc), lambda d: len(d) == 2)
        assert [msgspec.json.decode(body)["id"] for _, _, body in dead] == ["e37", "e120"]
        assert {headers["Kloudmeter-Meter"] for _, headers, _ in dead} == {"total"}
    finally:
        await w.stop()
