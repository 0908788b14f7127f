"""Corrections (issue 18): cancel or amend a stored event by its id, and look one up.

``POST /api/events/{id}/cancel`` and ``POST /api/events/{id}/amend`` publish a correction
event (``core.corrections``) to the original's producer subject; the worker applies it.
``GET /api/events/{id}`` shows the stored event, its corrections and what it counts as now.

The event is found by id among the stored events (``store.events.find_events``): a user's own
subject's events only (another tenant's event answers 404 exactly like an unknown id); for an
admin the subject named by ``?subject=``, else the whole stream. ``?source=`` picks among
CloudEvents that share an id. Ingest refuses the correction id space from producers
(:func:`refuse_correction`), so a correction can only be made here or by a NATS producer that
means it.
"""

from datetime import datetime
from typing import Any, Literal, NoReturn

import msgspec
from aiohttp import web

from kloudmeter_py.core.corrections import (
    CORRECTION_PREFIX,
    Action,
    correction_id,
    reserved_id,
)
from kloudmeter_py.core.keys import encode_token, event_subject
from kloudmeter_py.core.models import (
    AwareTime,
    Correction,
    Event,
    check_event_time,
    cloud_event_id,
    encoder,
)
from kloudmeter_py.errors import Conflict, InvalidInput, NotFound
from kloudmeter_py.gateway.helpers import decode_body, json_response, read_budget
from kloudmeter_py.gateway.keys import JS, LAYOUT
from kloudmeter_py.gateway.routes import CALLER, USER, Op, Param, Routes, own_tenant
from kloudmeter_py.gateway.schemas import ref
from kloudmeter_py.store.events import Stored, find_events, first_retained

routes = Routes()

CORRECT_WITH = "use POST /api/events/{id}/cancel or /api/events/{id}/amend"


class CancelIn(msgspec.Struct, forbid_unknown_fields=True):
    """Body of POST /api/events/{id}/cancel: none, or an empty object."""


class AmendIn(msgspec.Struct, forbid_unknown_fields=True):
    """Body of POST /api/events/{id}/amend: the new data, the new time, or both (what is
    not given stays the original's)."""

    data: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET
    time: AwareTime | msgspec.UnsetType = msgspec.UNSET

    def __post_init__(self) -> None:
        if not isinstance(self.time, msgspec.UnsetType):
            check_event_time(self.time)


_cancel_in = msgspec.json.Decoder(CancelIn)
_amend_in = msgspec.json.Decoder(AmendIn)
_any_decoder = msgspec.json.Decoder()


class CorrectedEvent(msgspec.Struct):
    """The stored event a correction corrects."""

    id: str
    seq: int
    subject: str
    eventType: str


class CorrectionAccepted(msgspec.Struct):
    """A correction stored by JetStream; duplicate when the same correction was stored
    already (a retry)."""

    status: Literal["ok"]
    duplicate: bool
    correctionId: str
    of: CorrectedEvent


class CorrectionView(msgspec.Struct):
    """One correction of an event, as stored."""

    id: str
    seq: int
    action: Literal["cancel", "amend"]
    time: datetime | None
    data: dict[str, Any]


class Version(msgspec.Struct):
    """What an event counts as: its time (its stored time when it had none) and data."""

    time: datetime
    data: dict[str, Any]


class EventView(msgspec.Struct):
    """A stored event, its corrections in stream order, and what it counts as now
    (``current``: null when cancelled)."""

    id: str
    seq: int
    storedAt: datetime
    eventType: str
    subject: str
    time: datetime | None
    data: dict[str, Any]
    corrections: list[CorrectionView]
    current: Version | None
    source: str | None = None


# -- ingest: producers may not use the correction id space -------------------------------------


def refuse_correction(raw: bytes) -> None:
    """Refuse (400, naming the field) a body of one event or a batch that carries a
    ``correction`` attribute or an id or CloudEvent source of the corrections' id space.

    Only bodies that could hold one are parsed again: with the word ``correction`` in the
    bytes, or a ``\\u`` escape (the only way JSON can spell its letters, ``-`` or ``#``
    otherwise)."""
    if b"correction" not in raw and b"\\u" not in raw:
        return
    try:
        body = _any_decoder.decode(raw)
    except msgspec.DecodeError:
        return  # the body's own decoding says what is wrong with it
    for item in body if isinstance(body, list) else [body]:
        if not isinstance(item, dict):
            continue
        if "correction" in item:
            raise InvalidInput(
                f"an event may not carry a correction attribute: {CORRECT_WITH}",
                field="correction",
            )
        event_id, source = item.get("id"), item.get("source")
        if "specversion" in item and isinstance(event_id, str) and isinstance(source, str):
            if reserved_id(cloud_event_id(source, event_id)):
                raise InvalidInput(
                    f"source {source!r} is reserved for corrections: {CORRECT_WITH}",
                    field="source",
                )
        elif isinstance(event_id, str) and reserved_id(event_id):
            raise InvalidInput(
                f"ids starting with {CORRECTION_PREFIX!r} are reserved for corrections: "
                f"{CORRECT_WITH}",
                field="id",
            )


# -- finding the event --------------------------------------------------------------------


_ID_PATH = ("the event's id (a CloudEvent's id, or <source>#<id>), percent-encoded",)
_SUBJECT = Param(
    "subject",
    {"type": "string", "minLength": 1},
    "the event's subject, to scan its events only (admin; a user token: its own only, "
    "the default); absent: the whole stream",
)
_SOURCE = Param(
    "source",
    {"type": "string", "minLength": 1},
    "the CloudEvent source, when events of several sources have this id",
)


async def _find(request: web.Request) -> tuple[Stored, list[Stored]]:
    """The one stored event ``{id}`` names, in the request's scope, and its corrections."""
    event_id = request.match_info["id"]
    if reserved_id(event_id):
        raise InvalidInput("a correction cannot be corrected", field="id")
    named = request.query.get("subject")
    if named == "":
        raise InvalidInput("subject must not be empty", field="subject")
    source = request.query.get("source")
    if source == "":
        raise InvalidInput("source must not be empty", field="source")
    subject = own_tenant(request, named, "subject")
    js = request.app[JS]
    layout = request.app[LAYOUT]
    if subject is None:
        pattern = f"{layout.stream}.events.>"
    else:
        pattern = layout.stored_subject("*", encode_token(subject))
    found = await find_events(js, layout.stream, pattern, event_id, budget=read_budget(request))
    events = [s for s in found.events if subject is None or s.event.subject == subject]
    if source is not None:
        events = [s for s in events if s.source == source]
    if not events:
        await _not_found(request, event_id)
    if len(events) > 1:
        _ambiguous(event_id, events, subject_given=subject is not None)
    original = events[0]
    corrections = [
        c
        for c in found.corrections
        if c.seq > original.seq
        and c.event.correction is not None
        and c.event.correction.of == original.event.id
        and c.event.subject == original.event.subject
        and c.event.eventType == original.event.eventType
        and c.event.correction.seq in (None, original.seq)
    ]
    return original, corrections


def _ambiguous(event_id: str, events: list[Stored], *, subject_given: bool) -> NoReturn:
    """409 for an id that several stored events have: how to name one, when there is a way."""
    sources = sorted({s.source for s in events if s.source is not None})
    if len(sources) > 1:
        raise Conflict(
            f"{len(events)} events have the id {event_id!r}, from the sources "
            f"{', '.join(repr(s) for s in sources)}: name one with ?source=",
            field="source",
        )
    subjects = sorted({s.event.subject for s in events})
    if len(subjects) > 1 and not subject_given:
        raise Conflict(
            f"{len(events)} events have the id {event_id!r}, of the subjects "
            f"{', '.join(repr(s) for s in subjects)}: name one with ?subject=",
            field="subject",
        )
    seqs = ", ".join(str(s.seq) for s in events)
    raise Conflict(
        f"the event {event_id!r} was stored {len(events)} times (stream sequences {seqs}, "
        "outside the duplicate window): it cannot be corrected by id",
        field="id",
    )


async def _not_found(request: web.Request, event_id: str) -> NoReturn:
    """404, or 409 when the stream no longer holds everything it stored (the event may have
    left retention). The same for an id of another tenant's event as for an unknown one."""
    js = request.app[JS]
    stream = request.app[LAYOUT].stream
    first = await first_retained(js, stream)
    if first is not None:
        seq, when = first
        since = f"stored at {when.isoformat()}" if when is not None else "no longer held"
        raise Conflict(
            f"event {event_id!r} not found; the stream {stream!r} no longer holds its events "
            f"before sequence {seq} (the first retained one {since}): the event may have "
            "left retention",
            field="id",
        )
    raise NotFound(f"event {event_id!r} not found", field="id")


def _effective_time(stored: Stored) -> datetime:
    return stored.event.time if stored.event.time is not None else stored.time


def _current(original: Stored, corrections: list[Stored]) -> Version | None:
    version: Version | None = Version(time=_effective_time(original), data=original.event.data)
    for c in corrections:
        if c.event.correction is not None and c.event.correction.action == "cancel":
            version = None
        else:  # an amendment without a time (a NATS producer's) keeps the original's
            when = c.event.time if c.event.time is not None else _effective_time(original)
            version = Version(time=when, data=c.event.data)
    return version


def _event_view(original: Stored, corrections: list[Stored]) -> EventView:
    ev = original.event
    return EventView(
        id=ev.id,
        seq=original.seq,
        storedAt=original.time,
        eventType=ev.eventType,
        subject=ev.subject,
        time=ev.time,
        data=ev.data,
        corrections=[
            CorrectionView(
                id=c.event.id,
                seq=c.seq,
                action=c.event.correction.action,
                time=c.event.time,
                data=c.event.data,
            )
            for c in corrections
            if c.event.correction is not None
        ],
        current=_current(original, corrections),
        source=original.source,
    )


# -- the routes ---------------------------------------------------------------------------


def _same(last: Stored, action: Action, data: dict[str, Any], time: datetime | None) -> bool:
    """Whether the stored correction ``last`` is this one (same action, and for an amendment
    the same time and data)."""
    corr = last.event.correction
    if corr is None or corr.action != action:
        return False
    return action == "cancel" or (last.event.data == data and last.event.time == time)


async def _publish(
    request: web.Request,
    original: Stored,
    corrections: list[Stored],
    action: Action,
    time: datetime | None,
    data: dict[str, Any],
) -> web.Response:
    ev = original.event
    of = CorrectedEvent(id=ev.id, seq=original.seq, subject=ev.subject, eventType=ev.eventType)
    last = corrections[-1] if corrections else None
    if last is not None and _same(last, action, data, time):
        # The event's last correction is this one (a retry, even past the duplicate window):
        # it stands, nothing is stored again.
        return json_response(
            CorrectionAccepted(status="ok", duplicate=True, correctionId=last.event.id, of=of),
            status=202,
        )
    cid = correction_id(
        original.seq,
        action,
        data if action == "amend" else None,
        time,
        after=last.seq if last is not None else 0,
    )
    correction = Event(
        id=cid,
        eventType=ev.eventType,
        subject=ev.subject,
        time=time,
        data=data,
        correction=Correction(action=action, of=ev.id, seq=original.seq),
    )
    body: dict[str, Any] = msgspec.to_builtins(correction)
    if time is None:
        del body["time"]
    subject = event_subject(request.app[LAYOUT].stream, ev.eventType, ev.subject)
    ack = await request.app[JS].publish(subject, encoder.encode(body), headers={"Nats-Msg-Id": cid})
    accepted = CorrectionAccepted(
        status="ok", duplicate=bool(ack.duplicate), correctionId=cid, of=of
    )
    return json_response(accepted, status=202)


_ERRORS = (400, 404, 409)
_DESCRIPTION = (
    "404 for an unknown id (and for another tenant's event); 400 for a correction's id; 409 "
    "when the id is not found and the stream has lost events to retention, or when several "
    "events have the id (name the CloudEvent source with ?source=). A retried correction "
    "answers duplicate: true."
)


@routes.post(
    "/api/events/{id}/cancel",
    access=USER,
    tenant=CALLER,
    op=Op(
        "Cancel a stored event",
        "events",
        status=202,
        response=ref("CorrectionAccepted"),
        path=_ID_PATH,
        query=(_SUBJECT, _SOURCE),
        body=ref("CancelIn"),
        body_required=False,
        errors=_ERRORS,
        description="Publishes a cancel correction of the event; the worker takes it out of "
        "its count, sum and avg meters. " + _DESCRIPTION,
    ),
)
async def cancel_event(request: web.Request) -> web.Response:
    raw = await request.read()
    if raw.strip():
        decode_body(raw, _cancel_in)
    original, corrections = await _find(request)
    return await _publish(request, original, corrections, "cancel", None, {})


@routes.post(
    "/api/events/{id}/amend",
    access=USER,
    tenant=CALLER,
    op=Op(
        "Amend a stored event's data or time",
        "events",
        status=202,
        response=ref("CorrectionAccepted"),
        path=_ID_PATH,
        query=(_SUBJECT, _SOURCE),
        body=ref("AmendIn"),
        errors=_ERRORS,
        description="Publishes an amend correction: the event counts with the new data and "
        "time (what is not given stays the original's) in its count, sum and avg meters. "
        + _DESCRIPTION,
    ),
)
async def amend_event(request: web.Request) -> web.Response:
    body = decode_body(await request.read(), _amend_in)
    if isinstance(body.data, msgspec.UnsetType) and isinstance(body.time, msgspec.UnsetType):
        raise InvalidInput("give data, time or both", field="data")
    original, corrections = await _find(request)
    time = body.time if not isinstance(body.time, msgspec.UnsetType) else None
    data = body.data if not isinstance(body.data, msgspec.UnsetType) else None
    new_time = time if time is not None else _effective_time(original)
    new_data = data if data is not None else original.event.data
    return await _publish(request, original, corrections, "amend", new_time, new_data)


@routes.get(
    "/api/events/{id}",
    access=USER,
    tenant=CALLER,
    op=Op(
        "A stored event, its corrections and what it counts as now",
        "events",
        response=ref("EventView"),
        path=_ID_PATH,
        query=(_SUBJECT, _SOURCE),
        errors=_ERRORS,
        description=_DESCRIPTION.replace(" A retried correction answers duplicate: true.", ""),
    ),
)
async def get_event(request: web.Request) -> web.Response:
    original, corrections = await _find(request)
    return json_response(_event_view(original, corrections))
