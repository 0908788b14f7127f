"""The gateway's event publishing (store.ingest) against a real nats-server: acks in order,
duplicates, error answers raised as nats-py raises them, nothing published for a bad id, and
503 from the ingest routes once NATS is gone."""

from typing import Any

import msgspec
import pytest
from nats.aio.client import Client
from nats.js.api import StreamConfig
from nats.js.errors import BadRequestError

from kloudmeter_py.errors import InvalidInput
from kloudmeter_py.store.ingest import publish_events
from kloudmeter_py.store.server import NatsServer
from kloudmeter_py.store.wire import Wire, WireError
from tests.conftest import eventually
from tests.helpers import Http


async def _wire_and_stream(server: NatsServer, nc: Client, **limits: Any) -> Wire:
    await nc.jetstream().add_stream(StreamConfig(name="T", subjects=["t.>"], **limits))
    return await Wire.connect(server.url, name="test")


async def test_acks_come_back_in_order_with_duplicates_marked(
    nats_server: NatsServer, nc: Client
) -> None:
    wire = await _wire_and_stream(nats_server, nc)
    try:
        events = [(f"t.s{n % 7}", f"id-{n}", b'{"n": %d}' % n) for n in range(600)]
        acks = await publish_events(wire, events)
        assert [a.seq for a in acks] == list(range(1, 601))
        assert not any(a.duplicate for a in acks) and {a.stream for a in acks} == {"T"}
        again = await publish_events(wire, [events[3], ("t.new", "id-new", b"{}")])
        assert [(a.seq, a.duplicate) for a in again] == [(4, True), (601, False)]
        info = await nc.jetstream().stream_info("T")
        assert info.state.messages == 601
        msg = await nc.jetstream().get_msg("T", 10)
        assert msg.data == b'{"n": 9}' and msg.headers == {"Nats-Msg-Id": "id-9"}
    finally:
        await wire.close()


async def test_an_error_answer_raises_as_nats_py_does(nats_server: NatsServer, nc: Client) -> None:
    wire = await _wire_and_stream(nats_server, nc, max_msg_size=64)
    try:
        with pytest.raises(BadRequestError) as caught:
            await publish_events(wire, [("t.a", "small", b"{}"), ("t.a", "big", b"x" * 100)])
        assert caught.value.err_code == 10054  # message size exceeds maximum allowed
        # No stream takes the subject: no responders.
        with pytest.raises(WireError, match="no responders"):
            await publish_events(wire, [("elsewhere.a", "x", b"{}")])
    finally:
        await wire.close()


async def test_a_line_break_in_an_id_publishes_nothing(nats_server: NatsServer, nc: Client) -> None:
    wire = await _wire_and_stream(nats_server, nc)
    try:
        with pytest.raises(InvalidInput, match="line break") as caught:
            await publish_events(wire, [("t.a", "fine", b"{}"), ("t.a", "bad\r\nX: y", b"{}")])
        assert caught.value.field == "id"
        assert (await nc.jetstream().stream_info("T")).state.messages == 0
    finally:
        await wire.close()


async def test_a_batch_with_a_bad_source_stores_none_of_it(http: Http, nc: Client) -> None:
    good = {"specversion": "1.0", "type": "t", "subject": "s", "source": "src", "data": {}}
    batch = [{**good, "id": "1"}, {**good, "id": "2"}, {**good, "id": "3", "source": "a\nb"}]
    resp = await http.post(
        "/api/v1/events",
        data=msgspec.json.encode(batch),
        headers={"Content-Type": "application/cloudevents-batch+json"},
    )
    assert resp.status == 400
    problem = await resp.json()
    assert problem["field"] == "source" and "line break" in problem["detail"]
    assert (await nc.jetstream().stream_info("meters")).state.messages == 0
    resp = await http.post(
        "/api/v1/events",
        data=msgspec.json.encode(batch[:2]),
        headers={"Content-Type": "application/cloudevents-batch+json"},
    )
    assert resp.status == 204
    assert (await nc.jetstream().stream_info("meters")).state.messages == 2


async def test_ingest_answers_503_while_nats_is_gone_and_recovers_after(
    http: Http, nats_server: NatsServer, nc: Client
) -> None:
    """No publish waits on a lost connection: 503 while the server is down; the next
    request after it is back connects again and is stored."""
    event = {"id": "1", "eventType": "t", "subject": "s"}
    resp = await http.post("/api/register-event", json=event)
    assert resp.status == 202 and "duplicate" not in await resp.json()
    resp = await http.post("/api/register-event", json=event)
    assert (await resp.json())["duplicate"] is True
    port = nats_server.port
    await nats_server.stop()

    async def post(event_id: str) -> tuple[int, str]:
        resp = await http.post("/api/register-event", json={**event, "id": event_id})
        return resp.status, (await resp.json()).get("message", "")

    code, message = await eventually(lambda: post("2"), lambda r: r[0] != 202)
    assert code == 503 and "NATS is unavailable" in message
    restarted = await NatsServer(nats_server.store_dir, port=port).start()
    try:
        code, _ = await eventually(lambda: post("3"), lambda r: r[0] == 202, timeout=20)
        js = nc.jetstream()

        async def stored() -> int:
            try:
                return int((await js.stream_info("meters")).state.messages)
            except Exception:  # nats-py still reconnecting
                return -1

        assert await eventually(stored, lambda n: n == 2, timeout=20) == 2  # ids 1 and 3
    finally:
        await restarted.stop()
