"""KloudMeter's REST API: events, meters, readings, health, dead letters."""

import re
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web
from msgspec import Meta

from kloudmeter_py.core.aggregate import AGGREGATIONS
from kloudmeter_py.core.keys import encode_token, event_subject
from kloudmeter_py.core.models import (
    InvalidField,
    Meter,
    MeterIn,
    Reading,
    encoder,
    event_decoder,
    normalize_aggregation,
    reading_decoder,
)
from kloudmeter_py.errors import InvalidInput, NotFound
from kloudmeter_py.gateway.corrections import refuse_correction
from kloudmeter_py.gateway.helpers import (
    decode_body,
    error_response,
    json_response,
    read_budget,
)
from kloudmeter_py.gateway.keys import JS, LAYOUT, LEAN, METERS, NC, SETTINGS
from kloudmeter_py.gateway.routes import (
    ADMIN,
    CALLER,
    NO_TENANT_DATA,
    OPEN,
    USER,
    Op,
    Param,
    Routes,
    own_subject,
    tenant_of,
    tenant_subjects,
)
from kloudmeter_py.gateway.schemas import PLAIN_PATH, any_case, array, ref
from kloudmeter_py.store import deadletters
from kloudmeter_py.store.ingest import publish_events
from kloudmeter_py.store.kv import get_with_revision, scan

routes = Routes()


def _aggregation_names() -> list[str]:
    """Every aggregation name validate_meter takes (OpenMeter's too), as it says."""
    names = []
    for name in (*sorted(AGGREGATIONS), "average", "unique_count", "uniquecount"):
        try:
            normalize_aggregation(name)
        except InvalidField:
            continue
        names.append(name)
    return names


# Every aggregation name the server takes, in any case.
AGGREGATION_PATTERN = any_case(*_aggregation_names())
# Documented, not enforced here: validate_meter compiles each path and names it when it fails.
JsonPath = Annotated[str, Meta(extra_json_schema={"pattern": PLAIN_PATH})]
Aggregation = Annotated[str, Meta(extra_json_schema={"pattern": AGGREGATION_PATTERN})]


class MeterBody(MeterIn, forbid_unknown_fields=True):
    """Body of POST /api/create-meter: a MeterIn whose schema says what validate_meter
    checks of each field (it still does the checking, so errors name the field as before).
    Paths are documented as plain key chains; other JSONPath that jsonpath-ng compiles is
    accepted too."""

    aggregation: Aggregation
    valueProperty: JsonPath | None = None
    groupBy: dict[Annotated[str, Meta(min_length=1, max_length=64)], JsonPath] = msgspec.field(
        default_factory=dict
    )
    resourceProperty: JsonPath | None = None
    actionProperty: JsonPath | None = None
    actions: (
        dict[
            str,
            Annotated[str, Meta(extra_json_schema={"enum": ["start", "change", "stop", "end"]})],
        ]
        | None
    ) = None


_meter_body = msgspec.json.Decoder(MeterBody)


class Accepted(msgspec.Struct, omit_defaults=True):
    """An event stored by JetStream; duplicate when its id was stored already."""

    status: Literal["ok"]
    duplicate: bool = False


class Health(msgspec.Struct):
    status: Literal["ok"]


class DeadLetterCounts(msgspec.Struct):
    total: int
    byMeter: dict[str, int]


_KEY_RE = re.compile(r"[-/_=.a-zA-Z0-9]{1,1024}")
_KEY = Param("key", {"type": "string", "minLength": 1}, "the meter id", required=True)
_READING_KEY = Param(
    "key",
    # What get_reading accepts: KV key characters, no empty token.
    {"type": "string", "pattern": r"^(?!\.)(?!.*\.\.)(?!.*\.$)[-/_=.a-zA-Z0-9]{1,1024}$"},
    "the reading's KV key",
    required=True,
)


_object_decoder = msgspec.json.Decoder(dict[str, Any])


async def stamp_tenant(request: web.Request, raw: bytes) -> bytes:
    """A user's events are its tenant's: the subject is set to the tenant when absent, and
    must be one of the tenant's subjects (routes.own_subject: a customer's) otherwise."""
    if tenant_of(request) is None:
        return raw
    body = decode_body(raw, _object_decoder)
    subject = body.get("subject")
    body["subject"] = await own_subject(
        request, None if subject is None else str(subject), "subject"
    )
    return encoder.encode(body)


@routes.post(
    "/api/register-event",
    access=USER,
    tenant=CALLER,
    ingests=True,
    op=Op(
        "Record a usage event",
        "events",
        status=202,
        response=ref("Accepted"),
        body=ref("Event"),
        errors=(400,),
        description="Answers after JetStream stored it; duplicate: true for an id already "
        "stored within METER_DEDUP_WINDOW. A body with specversion is read as a CloudEvent. "
        "A user's events are its tenant's: a missing subject becomes the tenant. "
        "A correction attribute, or an id in the corrections' id space (kloudmeter-correction#"
        "...), is refused with 400: see POST /api/events/{id}/cancel and /amend.",
    ),
)
async def register_event(request: web.Request) -> web.Response:
    raw = await stamp_tenant(request, await request.read())
    refuse_correction(raw)
    event = decode_body(raw, event_decoder)
    layout = request.app[LAYOUT]
    subject = event_subject(layout.stream, event.eventType, event.subject)
    (ack,) = await publish_events(await request.app[LEAN].wire(), [(subject, event.id, raw)])
    return json_response(Accepted(status="ok", duplicate=ack.duplicate), status=202)


@routes.post(
    "/api/create-meter",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Create a meter",
        "meters",
        status=201,
        response=ref("Meter"),
        body=ref("MeterBody"),
        errors=(400, 409),
    ),
)
async def create_meter(request: web.Request) -> web.Response:
    body = decode_body(await request.read(), _meter_body)
    meter = await request.app[METERS].create(body)
    return json_response(meter, status=201)


@routes.get(
    "/api/meters",
    access=USER,
    tenant=NO_TENANT_DATA,
    op=Op("List meters", "meters", response=array(ref("Meter"))),
)
async def list_meters(request: web.Request) -> web.Response:
    return json_response(await request.app[METERS].list())


def _key_param(request: web.Request) -> str:
    key = request.query.get("key")
    if not key:
        raise InvalidInput("query parameter 'key' is required", field="key")
    return key


@routes.get(
    "/api/meter",
    "/api/meter/",
    access=USER,
    tenant=NO_TENANT_DATA,
    op=Op("Get a meter", "meters", response=ref("Meter"), query=(_KEY,), errors=(400, 404)),
)
async def get_meter(request: web.Request) -> web.Response:
    return json_response(await request.app[METERS].get(_key_param(request)))


@routes.delete(
    "/api/meter",
    "/api/meter/",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Delete a meter and its readings", "meters", status=204, query=(_KEY,), errors=(400, 404)
    ),
)
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


@routes.get(
    "/api/readings",
    access=USER,
    tenant=CALLER,
    op=Op(
        "List readings",
        "readings",
        response=array(ref("ReadingView")),
        query=(Param("meter", description="meter id"), Param("subject")),
    ),
)
async def list_readings(request: web.Request) -> web.Response:
    meter_id = request.query.get("meter")
    subject = request.query.get("subject")
    # A user's: its tenant's subjects only (several for a customer's tenant).
    scope = await tenant_subjects(request)
    subjects: list[str | None] = [subject]
    if scope is not None:
        if subject is not None and subject not in scope:
            return json_response([])
        subjects = [subject] if subject is not None else list(scope)
    meters = {m.id: m for m in await request.app[METERS].list()}
    if meter_id is not None and meter_id not in meters:
        return json_response([])
    m_tok = encode_token(meter_id) if meter_id is not None else "*"
    patterns = []
    for one in subjects:
        s_tok = encode_token(one) if one is not None else "*"
        if meter_id is not None:
            groups = len(meters[meter_id].groupBy)
            patterns.append(".".join([m_tok, s_tok, *["*"] * groups]))
        elif one is not None:
            patterns += [f"*.{s_tok}", f"*.{s_tok}.>"]
        else:
            patterns.append(">")
    out = []
    js = request.app[JS]
    bucket = request.app[LAYOUT].readings_bucket
    budget = read_budget(request)
    for pattern in patterns:
        for key, value in await scan(js, bucket, pattern, budget=budget):
            await budget.tick()
            reading = reading_decoder.decode(value)
            if _current(reading, meters):
                out.append(reading_view(key, reading))
    return json_response(out)


@routes.get(
    "/api/reading",
    "/api/reading/",
    access=USER,
    tenant=CALLER,
    op=Op(
        "Get a reading by its key",
        "readings",
        response=ref("ReadingView"),
        query=(_READING_KEY,),
        errors=(400, 404),
    ),
)
async def get_reading(request: web.Request) -> web.Response:
    key = _key_param(request)
    if not _KEY_RE.fullmatch(key) or ".." in key or key.startswith(".") or key.endswith("."):
        raise InvalidInput(f"not a reading key: {key!r}", field="key")
    kv = await request.app[JS].key_value(request.app[LAYOUT].readings_bucket)
    value, _ = await get_with_revision(kv, key)
    if value is None:
        raise NotFound(f"reading {key!r} not found", field="key")
    reading = reading_decoder.decode(value)
    scope = await tenant_subjects(request)
    if scope is not None and reading.subject not in scope:
        raise NotFound(f"reading {key!r} not found", field="key")
    meters = request.app[METERS]
    try:
        meter = await meters.get(reading.meterId)
    except NotFound:
        raise NotFound(f"reading {key!r} not found", field="key") from None
    if meter.startSeq != reading.meterStartSeq:
        raise NotFound(f"reading {key!r} not found", field="key")
    return json_response(reading_view(key, reading))


@routes.get(
    "/healthy",
    access=OPEN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Health: NATS answers",
        "health",
        response=ref("Health"),
        description="503 with the error envelope when NATS does not answer.",
    ),
)
async def healthy(request: web.Request) -> web.Response:
    nc = request.app[NC]
    if not nc.is_connected:
        return error_response(503, "NATS is not connected")
    try:
        await request.app[JS].stream_info(request.app[LAYOUT].stream)
    except Exception as exc:
        return error_response(503, f"NATS: {type(exc).__name__}")
    return json_response(Health(status="ok"))


@routes.get(
    "/api/dead-letters",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op("Dead-letter counts per meter", "dead letters", response=ref("DeadLetterCounts")),
)
async def dead_letter_counts(request: web.Request) -> web.Response:
    """Dead-letter counts per meter (``_event`` for events no meter could read)."""
    counts = await deadletters.counts(request.app[JS], request.app[LAYOUT])
    return json_response(msgspec.convert(counts, DeadLetterCounts))


@routes.get(
    "/api/dead-letters/list",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "List dead letters, oldest first",
        "dead letters",
        response=array(ref("DeadLetter")),
        query=(
            Param("meter"),
            Param("limit", {"type": "integer", "minimum": 1, "maximum": 10000, "default": 100}),
        ),
        errors=(400,),
    ),
)
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


@routes.post(
    "/api/dead-letters/replay",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Replay dead letters into readings",
        "dead letters",
        response=ref("ReplayReport"),
        query=(Param("meter"),),
    ),
)
async def dead_letter_replay(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    report = await deadletters.replay(
        request.app[JS],
        request.app[LAYOUT],
        request.query.get("meter"),
        unique_limit=settings.unique_limit,
    )
    return json_response(report)
