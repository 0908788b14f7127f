"""store.events against a real nats-server: events by stream sequence and by id, as the
corrections routes and the worker look them up."""

import msgspec
from nats.aio.client import Client

from kloudmeter_py.store.events import find_events, stored_event

STREAM = "meters"
ALL = f"{STREAM}.events.>"


async def _pub(nc: Client, subject: str, body: object) -> int:
    raw = body if isinstance(body, bytes) else msgspec.json.encode(body)
    ack = await nc.jetstream().publish(f"{STREAM}.events.api-calls.{subject}", raw)
    return int(ack.seq)


def _ce(event_id: str, source: str, subject: str = "acme") -> dict[str, object]:
    return {"id": event_id, "source": source, "specversion": "1.0", "type": "api-calls",
            "subject": subject}  # fmt: skip


async def test_stored_event_by_sequence(nc: Client) -> None:
    """The event at a sequence with its stored subject and time; None once it is gone, past
    the end, or when the message is no event."""
    js = nc.jetstream()
    seq = await _pub(nc, "acme", {"id": "e1", "eventType": "api-calls", "subject": "acme"})
    junk = await _pub(nc, "acme", b"not json")
    stored = await stored_event(js, STREAM, seq)
    assert stored is not None and stored.event.id == "e1" and stored.seq == seq
    assert stored.subject.endswith(".api-calls.acme") and stored.time.tzinfo is not None
    assert await stored_event(js, STREAM, junk) is None
    assert await stored_event(js, STREAM, junk + 1) is None
    assert await js.delete_msg(STREAM, seq)
    assert await stored_event(js, STREAM, seq) is None


async def test_find_events_by_id_cloud_id_and_corrections(nc: Client) -> None:
    """By Event.id or a CloudEvent's own id (any source); corrections of what was found only;
    messages that hold the id but are no event are skipped."""
    js = nc.jetstream()
    a = await _pub(nc, "acme", _ce("x-1", "app"))
    b = await _pub(nc, "acme", _ce("x-1", "//billing/v2"))
    await _pub(nc, "acme", {"id": "x-10", "eventType": "api-calls", "subject": "acme"})
    await _pub(nc, "acme", b'{"id":"x-1", broken')
    await _pub(nc, "acme", _ce("x-1", "kloudmeter-correction"))  # no event: a reserved id
    fix = await _pub(nc, "acme", {
        "id": "kloudmeter-correction#1.cancel", "eventType": "api-calls", "subject": "acme",
        "correction": {"action": "cancel", "of": "app#x-1", "seq": a},
    })  # fmt: skip
    await _pub(nc, "acme", {
        "id": "kloudmeter-correction#3.cancel", "eventType": "api-calls", "subject": "acme",
        "correction": {"action": "cancel", "of": "x-10"},
    })  # fmt: skip
    found = await find_events(js, STREAM, ALL, "x-1")
    assert [(s.seq, s.event.id, s.source) for s in found.events] == [
        (a, "app#x-1", "app"),
        (b, "//billing/v2#x-1", "//billing/v2"),
    ]
    assert [s.seq for s in found.corrections] == [fix]
    found = await find_events(js, STREAM, ALL, "//billing/v2#x-1")
    assert [s.seq for s in found.events] == [b] and found.corrections == []
    found = await find_events(js, STREAM, ALL, "x-1", before_seq=b)
    assert [s.seq for s in found.events] == [a] and found.corrections == []


async def test_find_events_narrows_by_subject_and_reads_escaped_ids(nc: Client) -> None:
    """The filter decides what is read; an id written with JSON escapes is still found."""
    js = nc.jetstream()
    await _pub(nc, "acme", {"id": "é/1", "eventType": "api-calls", "subject": "acme"})
    escaped = b'{"id":"\\u00e9\\/1","eventType":"api-calls","subject":"globex"}'
    other = await _pub(nc, "globex", escaped)
    found = await find_events(js, STREAM, ALL, "é/1")
    assert len(found.events) == 2
    found = await find_events(js, STREAM, f"{STREAM}.events.*.*.globex", "é/1")
    assert [s.seq for s in found.events] == [other]
    assert (await find_events(js, STREAM, ALL, "nope")).events == []
