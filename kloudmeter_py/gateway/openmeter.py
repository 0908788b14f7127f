"""OpenMeter-compatible v1 subset: CloudEvents ingest, meters, queries, subjects.

One set of meters serves both APIs: KloudMeter's ``id`` is OpenMeter's ``slug`` (and ``id``),
and aggregation names map both ways (``unique`` <-> ``UNIQUE_COUNT``).
"""

import asyncio
from datetime import datetime
from typing import Annotated, Any

import msgspec
from aiohttp import web
from msgspec import Meta

from kloudmeter_py.core.budget import ReadBudget
from kloudmeter_py.core.keys import encode_token, event_subject
from kloudmeter_py.core.models import (
    CloudEvent,
    Meter,
    MeterId,
    MeterIn,
    Name,
    cloud_event_decoder,
    cloud_event_id,
    encoder,
    reading_decoder,
)
from kloudmeter_py.errors import InvalidInput
from kloudmeter_py.gateway.corrections import refuse_correction
from kloudmeter_py.gateway.helpers import decode_body, json_response, read_budget
from kloudmeter_py.gateway.keys import JS, LAYOUT, METERS
from kloudmeter_py.gateway.kloudmeter import Aggregation, JsonPath
from kloudmeter_py.gateway.query import (
    METER_PATH,
    QUERY_PARAMS,
    QueryBody,
    _build,
    body_from_params,
    execute,
)
from kloudmeter_py.gateway.routes import (
    ADMIN,
    CALLER,
    NO_TENANT_DATA,
    USER,
    Op,
    Routes,
    own_tenant,
    tenant_of,
)
from kloudmeter_py.gateway.schemas import STR, array, ref
from kloudmeter_py.store.kv import scan

routes = Routes()
_TO_OPENMETER = {"unique": "UNIQUE_COUNT"}
_batch_decoder = msgspec.json.Decoder(list[CloudEvent])
_any_decoder = msgspec.json.Decoder(CloudEvent | list[CloudEvent])


class OpenMeterMeterIn(msgspec.Struct):
    """Body of POST /api/v1/meters: checked as POST /api/create-meter's (unknown fields are
    ignored, as OpenMeter's clients send more)."""

    slug: MeterId
    aggregation: Aggregation
    eventType: Name
    name: str | None = None
    description: str | None = None
    valueProperty: JsonPath | None = None
    groupBy: dict[Annotated[str, Meta(min_length=1, max_length=64)], JsonPath] = {}
    metadata: dict[str, str] | None = None
    eventFrom: str | None = None


_meter_decoder = msgspec.json.Decoder(OpenMeterMeterIn)


class OpenMeterQueryIn(msgspec.Struct, rename={"start": "from", "end": "to"}):
    """Body of POST /api/v1/meters/{id}/query; unknown fields are ignored, null is absent."""

    start: str | None = None
    end: str | None = None
    windowSize: str | None = None
    windowTimeZone: str | None = None
    subject: list[str] | None = None
    groupBy: list[str] | None = None
    filterGroupBy: (
        dict[str, str | Annotated[list[str], Meta(min_length=1, max_length=1)]] | None
    ) = None


_query_decoder = msgspec.json.Decoder(OpenMeterQueryIn)
_object_decoder = msgspec.json.Decoder(dict[str, Any])


class OpenMeterMeter(msgspec.Struct):
    """A meter in OpenMeter's shape (slug = id; aggregation in OpenMeter's names)."""

    id: str
    slug: str
    name: str
    description: str | None
    aggregation: str
    eventType: str
    valueProperty: str | None
    groupBy: dict[str, str]
    createdAt: datetime
    updatedAt: datetime


def openmeter_meter(meter: Meter) -> OpenMeterMeter:
    return OpenMeterMeter(
        id=meter.id,
        slug=meter.id,
        name=meter.name or meter.id,
        description=meter.description or None,
        aggregation=_TO_OPENMETER.get(meter.aggregation, meter.aggregation.upper()),
        eventType=meter.eventType,
        valueProperty=meter.valueProperty,
        groupBy=meter.groupBy,
        createdAt=meter.createdAt,
        updatedAt=meter.createdAt,
    )


@routes.post(
    "/api/v1/events",
    access=USER,
    tenant=CALLER,
    ingests=True,
    op=Op(
        "Ingest CloudEvents (OpenMeter)",
        "openmeter",
        status=204,
        bodies=(
            ("application/cloudevents+json", ref("CloudEvent")),
            ("application/cloudevents-batch+json", {**array(ref("CloudEvent")), "minItems": 1}),
            (
                "application/json",
                {"anyOf": [ref("CloudEvent"), {**array(ref("CloudEvent")), "minItems": 1}]},
            ),
        ),
        errors=(400,),
    ),
)
async def ingest(request: web.Request) -> web.Response:
    """POST /api/v1/events: one CloudEvent, a batch, or either as application/json -> 204."""
    raw = await request.read()
    refuse_correction(raw)
    ctype = request.content_type
    events: list[CloudEvent]
    if ctype == "application/cloudevents+json":
        events = [decode_body(raw, cloud_event_decoder)]
    elif ctype == "application/cloudevents-batch+json":
        events = decode_body(raw, _batch_decoder)
    elif ctype == "application/json":
        parsed = decode_body(raw, _any_decoder)
        events = parsed if isinstance(parsed, list) else [parsed]
    else:
        raise InvalidInput(
            f"unsupported Content-Type {ctype!r}: use application/cloudevents+json, "
            "application/cloudevents-batch+json or application/json",
            field="Content-Type",
        )
    if not events:
        raise InvalidInput("the batch holds no events", field="body")
    for e in events:
        own_tenant(request, e.subject, "subject")
    js = request.app[JS]
    stream = request.app[LAYOUT].stream
    await asyncio.gather(
        *(
            js.publish(
                event_subject(stream, e.type, e.subject),
                encoder.encode(e),
                headers={"Nats-Msg-Id": cloud_event_id(e.source, e.id)},
            )
            for e in events
        )
    )
    return web.Response(status=204)


@routes.get(
    "/api/v1/meters",
    access=USER,
    tenant=NO_TENANT_DATA,
    op=Op("List meters (OpenMeter)", "openmeter", response=array(ref("OpenMeterMeter"))),
)
async def list_meters(request: web.Request) -> web.Response:
    return json_response([openmeter_meter(m) for m in await request.app[METERS].list()])


@routes.post(
    "/api/v1/meters",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Create a meter (OpenMeter)",
        "openmeter",
        status=201,
        response=ref("OpenMeterMeter"),
        body=ref("OpenMeterMeterIn"),
        errors=(400, 409),
    ),
)
async def create_meter(request: web.Request) -> web.Response:
    body = decode_body(await request.read(), _meter_decoder)
    meter_in = MeterIn(
        id=body.slug,
        eventType=body.eventType,
        aggregation=body.aggregation,
        description=body.description or "",
        name=body.name or "",
        valueProperty=body.valueProperty,
        groupBy=body.groupBy,
    )
    try:
        msgspec.convert(msgspec.to_builtins(meter_in), MeterIn)
    except msgspec.ValidationError as exc:
        text = str(exc).replace("`$.id`", "`$.slug`")
        field = "slug" if "$.slug" in text else None
        raise InvalidInput(f"invalid meter: {text}", field=field) from None
    meter = await request.app[METERS].create(meter_in)
    return json_response(openmeter_meter(meter), status=201)


@routes.get(
    "/api/v1/meters/{meter}",
    access=USER,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Get a meter (OpenMeter)",
        "openmeter",
        response=ref("OpenMeterMeter"),
        path=METER_PATH,
        errors=(404,),
    ),
)
async def get_meter(request: web.Request) -> web.Response:
    return json_response(
        openmeter_meter(await request.app[METERS].get(request.match_info["meter"]))
    )


@routes.delete(
    "/api/v1/meters/{meter}",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op("Delete a meter (OpenMeter)", "openmeter", status=204, path=METER_PATH, errors=(404,)),
)
async def delete_meter(request: web.Request) -> web.Response:
    await request.app[METERS].delete(request.match_info["meter"])
    return web.Response(status=204)


@routes.get(
    "/api/v1/meters/{meter}/query",
    access=USER,
    tenant=CALLER,
    op=Op(
        "Query a meter (OpenMeter)",
        "openmeter",
        response=ref("QueryResult"),
        path=METER_PATH,
        query=QUERY_PARAMS,
        errors=(400, 404),
    ),
)
@routes.post(
    "/api/v1/meters/{meter}/query",
    access=USER,
    tenant=CALLER,
    op=Op(
        "Query a meter (OpenMeter)",
        "openmeter",
        response=ref("QueryResult"),
        path=METER_PATH,
        body=ref("OpenMeterQueryIn"),
        body_required=False,
        errors=(400, 404),
    ),
)
async def query_meter(request: web.Request) -> web.Response:
    meter = await request.app[METERS].get(request.match_info["meter"])
    if request.method == "POST":
        raw = decode_body(await request.read() or b"{}", _query_decoder)
        filters: dict[str, str] = {}
        for group, wanted in (raw.filterGroupBy or {}).items():
            if isinstance(wanted, list):
                if len(wanted) != 1:
                    raise InvalidInput(
                        "filterGroupBy: one value per group is supported", field="filterGroupBy"
                    )
                wanted = wanted[0]
            filters[group] = wanted
        body = QueryBody(
            start=raw.start,
            end=raw.end,
            windowSize=raw.windowSize,
            windowTimeZone=raw.windowTimeZone,
            subject=raw.subject or [],
            groupBy=raw.groupBy or [],
            filterGroupBy=filters,
        )
    else:
        body = body_from_params(request)
    # OpenMeter lets "subject" be a group: it splits the rows by subject.
    by_subject = "subject" in body.groupBy
    body.groupBy = [g for g in body.groupBy if g != "subject"]
    query = _build(request, meter, body)
    # Every subject's rows come from one read of the subjects' pages (store.query).
    query.by_subject = by_subject
    result = await execute(request, meter, query, read_budget(request))
    return json_response(msgspec.structs.replace(result, windowTimeZone=None))  # not OpenMeter's


async def _subjects(request: web.Request, meter: Meter, budget: ReadBudget) -> list[str]:
    subjects = set()
    for _, value in await scan(
        request.app[JS],
        request.app[LAYOUT].readings_bucket,
        f"{encode_token(meter.id)}.>",
        budget=budget,
    ):
        await budget.tick()
        reading = reading_decoder.decode(value)
        if reading.meterStartSeq == meter.startSeq:
            subjects.add(reading.subject)
    return sorted(subjects)


@routes.get(
    "/api/v1/meters/{meter}/subjects",
    access=USER,
    tenant=CALLER,
    op=Op(
        "Subjects with readings (OpenMeter)",
        "openmeter",
        response=array(STR),
        path=METER_PATH,
        errors=(404,),
    ),
)
async def list_subjects(request: web.Request) -> web.Response:
    meter = await request.app[METERS].get(request.match_info["meter"])
    subjects = await _subjects(request, meter, read_budget(request))
    scope = tenant_of(request)
    if scope is not None:
        subjects = [s for s in subjects if s == scope]
    return json_response(subjects)
