"""KloudMeter's REST API: events, meters, readings, health, dead letters."""

import re
from typing import Any

import msgspec
from aiohttp import web

from kloudmeter_py.core.keys import encode_token, event_subject
from kloudmeter_py.core.models import (
    Meter,
    Reading,
    encoder,
    event_decoder,
    meter_in_decoder,
    reading_decoder,
)
from kloudmeter_py.errors import Forbidden, InvalidInput, NotFound
from kloudmeter_py.gateway.auth import tenant_scope
from kloudmeter_py.gateway.helpers import decode_body, json_response
from kloudmeter_py.gateway.keys import JS, LAYOUT, METERS, NC, SETTINGS
from kloudmeter_py.store import deadletters
from kloudmeter_py.store.kv import get_with_revision, scan

_KEY = re.compile(r"[-/_=.a-zA-Z0-9]{1,1024}")


_object_decoder = msgspec.json.Decoder(dict[str, Any])


def stamp_tenant(request: web.Request, raw: bytes) -> bytes:
    """A user's events are its tenant's: the subject is set to the tenant (or must be it)."""
    scope = tenant_scope(request)
    if scope is None:
        return raw
    body = decode_body(raw, _object_decoder)
    subject = body.get("subject")
    if subject is not None and subject != scope:
        raise Forbidden(f"this token may only record usage for tenant {scope!r}", field="subject")
    body["subject"] = scope
    return encoder.encode(body)


async def register_event(request: web.Request) -> web.Response:
    raw = stamp_tenant(request, await request.read())
    event = decode_body(raw, event_decoder)
    layout = request.app[LAYOUT]
    subject = event_subject(layout.stream, event.eventType, event.subject)
    ack = await request.app[JS].publish(subject, raw, headers={"Nats-Msg-Id": event.id})
    body: dict[str, Any] = {"status": "ok"}
    if ack.duplicate:
        body["duplicate"] = True
    return json_response(body, status=202)


async def create_meter(request: web.Request) -> web.Response:
    body = decode_body(await request.read(), meter_in_decoder)
    meter = await request.app[METERS].create(body)
    return json_response(meter, status=201)


async def list_meters(request: web.Request) -> web.Response:
    return json_response(await request.app[METERS].list())


def _key_param(request: web.Request) -> str:
    key = request.query.get("key")
    if not key:
        raise InvalidInput("query parameter 'key' is required", field="key")
    return key


async def get_meter(request: web.Request) -> web.Response:
    return json_response(await request.app[METERS].get(_key_param(request)))


async def delete_meter(request: web.Request) -> web.Response:
    await request.app[METERS].delete(_key_param(request))
    return web.Response(status=204)


def reading_view(key: str, reading: Reading) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(reading)
    out.pop("distinct", None)
    out["key"] = key
    return out


def _current(reading: Reading, meters: dict[str, Meter]) -> bool:
    meter = meters.get(reading.meterId)
    return meter is not None and meter.startSeq == reading.meterStartSeq


async def list_readings(request: web.Request) -> web.Response:
    meter_id = request.query.get("meter")
    subject = request.query.get("subject")
    scope = tenant_scope(request)
    if scope is not None:
        if subject is not None and subject != scope:
            return json_response([])
        subject = scope
    meters = {m.id: m for m in await request.app[METERS].list()}
    if meter_id is not None and meter_id not in meters:
        return json_response([])
    m_tok = encode_token(meter_id) if meter_id is not None else "*"
    s_tok = encode_token(subject) if subject is not None else "*"
    if meter_id is not None:
        groups = len(meters[meter_id].groupBy)
        patterns = [".".join([m_tok, s_tok, *["*"] * groups])]
    elif subject is not None:
        patterns = [f"*.{s_tok}", f"*.{s_tok}.>"]
    else:
        patterns = [">"]
    out = []
    js = request.app[JS]
    bucket = request.app[LAYOUT].readings_bucket
    for pattern in patterns:
        for key, value in await scan(js, bucket, pattern):
            reading = reading_decoder.decode(value)
            if _current(reading, meters):
                out.append(reading_view(key, reading))
    return json_response(out)


async def get_reading(request: web.Request) -> web.Response:
    key = _key_param(request)
    if not _KEY.fullmatch(key) or ".." in key or key.startswith(".") or key.endswith("."):
        raise InvalidInput(f"not a reading key: {key!r}", field="key")
    kv = await request.app[JS].key_value(request.app[LAYOUT].readings_bucket)
    value, _ = await get_with_revision(kv, key)
    if value is None:
        raise NotFound(f"reading {key!r} not found", field="key")
    reading = reading_decoder.decode(value)
    scope = tenant_scope(request)
    if scope is not None and reading.subject != scope:
        raise NotFound(f"reading {key!r} not found", field="key")
    meters = request.app[METERS]
    try:
        meter = await meters.get(reading.meterId)
    except NotFound:
        raise NotFound(f"reading {key!r} not found", field="key") from None
    if meter.startSeq != reading.meterStartSeq:
        raise NotFound(f"reading {key!r} not found", field="key")
    return json_response(reading_view(key, reading))


async def healthy(request: web.Request) -> web.Response:
    nc = request.app[NC]
    if not nc.is_connected:
        return json_response({"status": "error", "message": "NATS is not connected"}, status=503)
    try:
        await request.app[JS].stream_info(request.app[LAYOUT].stream)
    except Exception as exc:
        return json_response(
            {"status": "error", "message": f"NATS: {type(exc).__name__}"}, status=503
        )
    return json_response({"status": "ok"})


async def dead_letter_counts(request: web.Request) -> web.Response:
    """Dead-letter counts per meter (``_event`` for events no meter could read)."""
    return json_response(await deadletters.counts(request.app[JS], request.app[LAYOUT]))


async def dead_letter_list(request: web.Request) -> web.Response:
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise InvalidInput("limit must be an integer", field="limit") from None
    if not 1 <= limit <= 10_000:
        raise InvalidInput("limit must be 1..10000", field="limit")
    letters = await deadletters.iterate(
        request.app[JS], request.app[LAYOUT], request.query.get("meter"), limit=limit
    )
    return json_response(letters)


async def dead_letter_replay(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    report = await deadletters.replay(
        request.app[JS],
        request.app[LAYOUT],
        request.query.get("meter"),
        unique_limit=settings.unique_limit,
    )
    return json_response(report)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/api/register-event", register_event)
    r.add_post("/api/create-meter", create_meter)
    r.add_get("/api/meters", list_meters)
    for path in ("/api/meter", "/api/meter/"):
        r.add_get(path, get_meter)
        r.add_delete(path, delete_meter)
    r.add_get("/api/readings", list_readings)
    r.add_get("/api/reading", get_reading)
    r.add_get("/api/reading/", get_reading)
    r.add_get("/api/dead-letters", dead_letter_counts)
    r.add_get("/api/dead-letters/list", dead_letter_list)
    r.add_post("/api/dead-letters/replay", dead_letter_replay)
    r.add_get("/healthy", healthy)
