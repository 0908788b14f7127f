"""OpenMeter-compatible v1 subset: CloudEvents ingest and listing, meters (with updates),
queries (JSON or CSV), subjects and group-by values.

One set of meters serves both APIs: KloudMeter's ``id`` is OpenMeter's ``slug`` (and ``id``),
and aggregation names map both ways (``unique`` <-> ``UNIQUE_COUNT``).
"""

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import msgspec
from aiohttp import web
from msgspec import Meta

from kloudmeter_py.core.budget import ReadBudget
from kloudmeter_py.core.customers import subjects_of
from kloudmeter_py.core.export import openmeter_csv
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
from kloudmeter_py.core.models import update_meter as update_meter_fields
from kloudmeter_py.core.query import parse_time
from kloudmeter_py.core.windows import QueryError
from kloudmeter_py.errors import InvalidInput, NotFound
from kloudmeter_py.gateway.corrections import refuse_correction
from kloudmeter_py.gateway.helpers import decode_body, json_response, read_budget
from kloudmeter_py.gateway.keys import CUSTOMERS, JS, LAYOUT, LEAN, METERS
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
    Param,
    Routes,
    own_subject,
    tenant_of,
    tenant_subjects,
)
from kloudmeter_py.gateway.schemas import STR, TIME, array, ref
from kloudmeter_py.store.events import Stored, newest_events
from kloudmeter_py.store.ingest import check_msg_id, publish_events
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


class OpenMeterMeterUpdate(msgspec.Struct):
    """Body of PUT /api/v1/meters/{idOrSlug} (OpenMeter's MeterUpdate): a new name,
    description, or group-by keys added (``groupBy`` is the whole new set: every existing key
    with its path, and the new ones). What a meter cannot change may be sent as it is (a
    whole meter sent back); a different value is refused. Absent or null: unchanged."""

    name: str | None = None
    description: str | None = None
    groupBy: dict[Annotated[str, Meta(min_length=1, max_length=64)], JsonPath] | None = None
    metadata: dict[str, str] | None = None
    slug: str | None = None
    eventType: str | None = None
    aggregation: str | None = None
    valueProperty: str | None = None


_update_decoder = msgspec.json.Decoder(OpenMeterMeterUpdate)


MAX_CUSTOMERS = 100  # filterCustomerId values of one query (OpenMeter's maximum)


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
    filterCustomerId: Annotated[list[str], Meta(max_length=MAX_CUSTOMERS)] | None = None


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
        updatedAt=meter.updatedAt or meter.createdAt,
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
        # A user's: only its tenant's subjects (a customer's: any it owns; 403 otherwise).
        await own_subject(request, e.subject, "subject")
        check_msg_id(e.source, "source")
        check_msg_id(e.id, "id")
    stream = request.app[LAYOUT].stream
    await publish_events(
        await request.app[LEAN].wire(),
        [
            (
                event_subject(stream, e.type, e.subject),
                cloud_event_id(e.source, e.id),
                encoder.encode(e),
            )
            for e in events
        ],
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


_CUSTOMERS_PARAM = Param(
    "filterCustomerId",
    {**array(STR), "maxItems": MAX_CUSTOMERS},
    "customers (ids or keys) whose subjects to read; each row carries its customerId",
)
_QUERY_ANSWERS = (("application/json", ref("QueryResult")), ("text/csv", STR))
_CSV_NOTE = (
    "With Accept: text/csv, the rows as CSV: window_start, window_end, subject, the groups "
    "asked for, value; by window, then subject and groups."
)


@routes.put(
    "/api/v1/meters/{meter}",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Update a meter (OpenMeter)",
        "openmeter",
        response=ref("OpenMeterMeter"),
        path=METER_PATH,
        body=ref("OpenMeterMeterUpdate"),
        errors=(400, 404, 409),
        description="A new name or description; group-by keys added while the meter has "
        "counted no event (it then starts a new generation). The slug, event type, "
        "aggregation, value property and an existing key's path cannot change (400 naming "
        "the field): that is a new meter and a backfill.",
    ),
)
async def update_meter(request: web.Request) -> web.Response:
    """PUT /api/v1/meters/{idOrSlug}: change what a meter may change, refuse the rest.

    What may change, and why the rest may not (from how meters are kept):

    - ``name`` and ``description`` are labels: stored in place, the meter's generation
      (``startSeq``) and everything it counted stay as they are.
    - ``slug``, ``eventType``, ``aggregation``, ``valueProperty``, an existing group-by key's
      path, or dropping a key: each changes what the stored readings and summaries mean
      (which events they hold, what was folded, how they were split), and they cannot be
      recomputed in place; 400 naming the field: a new meter and a backfill.
    - New group-by keys: the readings' and summaries' KV keys carry one token per group
      (core.keys.reading_key, in the sorted order of the group names) and a query reads only
      the pages with as many tokens as the meter has groups (core.query), so a key added to
      a meter that has counted events would drop its counts so far out of every query. They
      are taken only while the meter has counted nothing - no event of its type stored since
      its ``startSeq`` - and then the meter starts a new generation at the stream's last
      sequence (it counts the same events, and anything a worker folds meanwhile with the old
      groups belongs to the old generation, which readers skip and the worker replays). A
      meter that has counted events: 400 on ``groupBy`` (create a meter with the key and
      backfill it). See store.meters.MeterStore.update.
    """
    body = decode_body(await request.read(), _update_decoder)
    now = datetime.now(UTC)
    fixed = {
        "slug": body.slug,
        "eventType": body.eventType,
        "aggregation": body.aggregation,
        "valueProperty": body.valueProperty,
    }
    meter = await request.app[METERS].update(
        request.match_info["meter"],
        lambda m: update_meter_fields(
            m,
            name=body.name,
            description=body.description,
            group_by=body.groupBy,
            fixed=fixed,
            now=now,
        ),
    )
    return json_response(openmeter_meter(meter))


@routes.get(
    "/api/v1/meters/{meter}/query",
    access=USER,
    tenant=CALLER,
    op=Op(
        "Query a meter (OpenMeter)",
        "openmeter",
        responses=_QUERY_ANSWERS,
        path=METER_PATH,
        query=(*QUERY_PARAMS, _CUSTOMERS_PARAM),
        errors=(400, 404),
        description=_CSV_NOTE,
    ),
)
@routes.post(
    "/api/v1/meters/{meter}/query",
    access=USER,
    tenant=CALLER,
    op=Op(
        "Query a meter (OpenMeter)",
        "openmeter",
        responses=_QUERY_ANSWERS,
        path=METER_PATH,
        description=_CSV_NOTE,
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
        customer_ids = raw.filterCustomerId or []
    else:
        body = body_from_params(request)
        customer_ids = request.query.getall("filterCustomerId", [])
    return await answer_query(request, meter, body, customer_ids)


async def answer_query(
    request: web.Request, meter: Meter, body: QueryBody, customer_ids: list[str]
) -> web.Response:
    """An OpenMeter query's answer (JSON, or CSV on ``Accept: text/csv``), for the
    request's tenant (gateway.query.execute narrows it).

    ``customer_ids`` (filterCustomerId, ids or keys): only those customers' subjects
    (store.customers), each row one customer's with its ``customerId``, merged over its
    subjects - or, split by subject (``groupBy=subject`` or ``subject``), one subject's
    with the customer owning it. An unknown customer answers 404 naming filterCustomerId,
    and so does another tenant's for a user (its tenant names the one customer it may ask
    for). ``groupBy=customer_id`` is OpenMeter's name of that split, refused without
    filterCustomerId as OpenMeter does."""
    if len(customer_ids) > MAX_CUSTOMERS:
        raise InvalidInput(
            f"filterCustomerId: at most {MAX_CUSTOMERS} customers", field="filterCustomerId"
        )
    if "customer_id" in body.groupBy and not customer_ids:
        raise InvalidInput(
            "groupBy: customer_id needs filterCustomerId (the customers to split by)",
            field="groupBy",
        )
    # OpenMeter lets "subject" be a group: it splits the rows by subject.
    by_subject = "subject" in body.groupBy
    body.groupBy = [g for g in body.groupBy if g not in ("subject", "customer_id")]
    owners = await customer_subjects(request, customer_ids)
    named = set(body.subject)
    if customer_ids:
        body.subject = [s for s in owners if not named or s in named]
    query = _build(request, meter, body)
    # Every subject's rows come from one read of the subjects' pages (store.query).
    query.by_subject = by_subject or bool(customer_ids and named)
    query.customers = owners
    empty = bool(customer_ids) and not query.subjects
    result = await execute(request, meter, query, read_budget(request), empty=empty)
    if customer_ids:
        for row in result.data:
            if query.by_subject:
                row.customerId = owners.get(row.subject or "")
            else:  # merged by customer: its id was in the subject's place
                row.customerId, row.subject = row.subject, None
    if _wants_csv(request):
        csv = openmeter_csv(result.data, body.groupBy, customers=bool(customer_ids))
        return web.Response(body=csv, content_type="text/csv", charset="utf-8")
    return json_response(msgspec.structs.replace(result, windowTimeZone=None))  # not OpenMeter's


async def customer_subjects(request: web.Request, customer_ids: list[str]) -> dict[str, str]:
    """subject -> customer id of each customer named (by id or key), for the request's
    tenant: an unknown customer, or for a user another tenant's, answers 404 naming
    filterCustomerId (store.customers.CustomerStore.get)."""
    tenant = tenant_of(request)
    owners: dict[str, str] = {}
    for named in dict.fromkeys(customer_ids):
        try:
            customer = await request.app[CUSTOMERS].get(named, tenant=tenant)
        except NotFound:
            raise NotFound(f"customer {named!r} not found", field="filterCustomerId") from None
        for subject in subjects_of(customer):
            owners[subject] = customer.id
    return owners


def _wants_csv(request: web.Request) -> bool:
    """Whether the Accept header asks for CSV before JSON (the SDK's query_csv sends
    ``Accept: text/csv``)."""
    for part in request.headers.get("Accept", "").split(","):
        media = part.split(";", 1)[0].strip().lower()
        if media == "text/csv":
            return True
        if media in ("application/json", "application/*", "*/*"):
            return False
    return False


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
    scope = await tenant_subjects(request)
    if scope is not None:
        subjects = [s for s in subjects if s in scope]
    return json_response(subjects)


def _time_param(request: web.Request, name: str) -> datetime | None:
    """An RFC 3339 query parameter (with an offset), or None when absent."""
    value = request.query.get(name)
    if value is None:
        return None
    try:
        return parse_time(name, value)
    except QueryError as exc:
        raise InvalidInput(str(exc), field=exc.field) from None


_VALUES_PARAMS = (
    Param("from", TIME, "readings with an event at or after this time (default: 24 hours ago)"),
    Param("to", TIME, "readings with an event at or before this time"),
)


@routes.get(
    "/api/v1/meters/{meter}/group-by/{groupByKey}/values",
    access=USER,
    tenant=CALLER,
    op=Op(
        "Values of a group-by key (OpenMeter)",
        "openmeter",
        response=array(STR),
        path=(*METER_PATH, "a group-by key of the meter"),
        query=_VALUES_PARAMS,
        errors=(400, 404),
    ),
)
async def list_group_by_values(request: web.Request) -> web.Response:
    """GET /api/v1/meters/{idOrSlug}/group-by/{groupByKey}/values: the distinct values of the
    key in the meter's readings (its current generation), sorted; a user sees its own subject's.

    ``from`` (default 24 hours ago, as OpenMeter) keeps readings with an event at or after
    it, ``to`` those with one at or before it (a reading keeps its first and last event
    times): each bound alone is exact; with both, a value whose events all fall before
    ``from`` and after ``to`` is listed too. An absent value (the path found nothing) is not
    listed. Cost: one read of the meter's readings (a user's: its subject's only)."""
    meter = await request.app[METERS].get(request.match_info["meter"])
    key = request.match_info["groupByKey"]
    if key not in meter.groupBy:
        keys = ", ".join(sorted(meter.groupBy)) or "none"
        raise InvalidInput(
            f"groupByKey: {key!r} is not a group-by key of meter {meter.id!r} (its keys: {keys})",
            field="groupByKey",
        )
    start = _time_param(request, "from") or datetime.now(UTC) - timedelta(hours=24)
    end = _time_param(request, "to")
    scope = await tenant_subjects(request)
    m_tok = encode_token(meter.id)
    patterns = [f"{m_tok}.>"] if scope is None else [f"{m_tok}.{encode_token(s)}.>" for s in scope]
    budget = read_budget(request)
    values: set[str] = set()
    js, bucket = request.app[JS], request.app[LAYOUT].readings_bucket
    found = [kv for pattern in patterns for kv in await scan(js, bucket, pattern, budget=budget)]
    for _, raw in found:
        await budget.tick()
        reading = reading_decoder.decode(raw)
        if reading.meterStartSeq != meter.startSeq:
            continue
        if scope is not None and reading.subject not in scope:
            continue
        if reading.lastTime is not None and reading.lastTime < start:
            continue
        if end is not None and reading.firstTime is not None and reading.firstTime > end:
            continue
        value = reading.groupBy.get(key)
        if value is not None:
            values.add(value)
    return json_response(sorted(values))


class OpenMeterEvent(msgspec.Struct, omit_defaults=True):
    """A stored event as a CloudEvent (OpenMeter's Event): a KloudMeter event's source is
    ``kloudmeter``; its time is when JetStream stored it if it was sent without one."""

    id: str
    source: str
    specversion: str
    type: str
    subject: str
    time: datetime
    data: dict[str, Any] = {}


class OpenMeterIngestedEvent(msgspec.Struct, omit_defaults=True):
    """An entry of GET /api/v1/events (OpenMeter's IngestedEvent): ``ingestedAt`` and
    ``storedAt`` are both when JetStream stored it."""

    event: OpenMeterEvent
    ingestedAt: datetime
    storedAt: datetime


KLOUDMETER_SOURCE = "kloudmeter"
EVENTS_LIMIT = 100  # OpenMeter's default and maximum
EVENTS_DEFAULT_SPAN = timedelta(hours=72)  # OpenMeter's: from, when not given
_EVENTS_PARAMS = (
    Param("from", TIME, "event time at or after (default: 72 hours ago, unless ingestedAtFrom)"),
    Param("to", TIME, "event time at or before"),
    Param("ingestedAtFrom", TIME, "stored at or after"),
    Param("ingestedAtTo", TIME, "stored at or before"),
    Param("id", STR, "a part of the event id (a CloudEvent's own id)"),
    Param("subject", STR, "a part of the subject"),
    Param(
        "limit",
        {"type": "integer", "minimum": 1, "maximum": EVENTS_LIMIT},
        f"events to answer, 1 to {EVENTS_LIMIT} (default {EVENTS_LIMIT})",
    ),
    Param("clientId", STR, "ignored (OpenMeter's progress tracking)"),
)


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return EVENTS_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= EVENTS_LIMIT:
        raise InvalidInput(
            f"limit: {raw!r} is not an integer from 1 to {EVENTS_LIMIT}", field="limit"
        )
    return limit


def _cloud_view(stored: Stored) -> OpenMeterIngestedEvent:
    e = stored.event
    if stored.source is not None and stored.cloud_id is not None:
        source, event_id = stored.source, stored.cloud_id
    else:
        source, event_id = KLOUDMETER_SOURCE, e.id
    event = OpenMeterEvent(
        id=event_id,
        source=source,
        specversion="1.0",
        type=e.eventType,
        subject=e.subject,
        time=e.time or stored.time,
        data=e.data,
    )
    return OpenMeterIngestedEvent(event=event, ingestedAt=stored.time, storedAt=stored.time)


@routes.get(
    "/api/v1/events",
    access=USER,
    tenant=CALLER,
    op=Op(
        "List stored events, newest first (OpenMeter)",
        "openmeter",
        response=array(ref("OpenMeterIngestedEvent")),
        query=_EVENTS_PARAMS,
        errors=(400,),
        description="Newest first by when they were stored; a user's token: its own "
        "subject's only. Corrections are not listed (GET /api/events/{id} shows them).",
    ),
)
async def list_events(request: web.Request) -> web.Response:
    """GET /api/v1/events: the newest stored events that pass the filters, newest first by
    stream order (when JetStream stored them; OpenMeter orders by event time, the same for
    events sent as they happen), at most ``limit``.

    Filters as OpenMeter's: ``from``/``to`` on the event time (inclusive; ``from`` defaults
    to 72 hours ago unless ``ingestedAtFrom`` is given), ``ingestedAtFrom``/``ingestedAtTo`` on
    the stored time, ``id`` and ``subject`` a part of the value. A user's token lists only
    its own subject's events (the scan is narrowed to that subject on the server).

    Cost (store.events.newest_events): the stream is read backwards from its end, a range of
    sequences per direct-get request, until ``limit`` events pass; it grows with the stored
    messages newer than the oldest one answered, so a page of recent events is one or two
    requests, and a filter that matches nothing reads every message under the subject
    filter (all events for an admin, the subject's for a user) unless ``ingestedAtFrom``
    ends it, within METER_READ_TIMEOUT_MS (503 past it). Measured on this machine: see the
    README (OpenMeter compatibility)."""
    start = _time_param(request, "from")
    end = _time_param(request, "to")
    stored_from = _time_param(request, "ingestedAtFrom")
    stored_to = _time_param(request, "ingestedAtTo")
    if start is None and stored_from is None:
        start = datetime.now(UTC) - EVENTS_DEFAULT_SPAN
    limit = _limit(request)
    id_part = request.query.get("id")
    subject_part = request.query.get("subject")
    scope = await tenant_subjects(request)
    layout = request.app[LAYOUT]
    if scope is None:
        filters = [f"{layout.stream}.events.>"]
    else:
        # One narrowed scan per subject of the tenant (a customer's: each it owns).
        filters = [layout.stored_subject("*", encode_token(s)) for s in scope]
    owned = None if scope is None else set(scope)

    def keep(stored: Stored) -> bool:
        e = stored.event
        if e.correction is not None or (owned is not None and e.subject not in owned):
            return False
        when = e.time or stored.time
        if (start is not None and when < start) or (end is not None and when > end):
            return False
        if stored_to is not None and stored.time > stored_to:
            return False
        if subject_part and subject_part not in e.subject:
            return False
        return not id_part or id_part in (stored.cloud_id or e.id)

    budget = read_budget(request)
    wire = await request.app[LEAN].wire()
    newest: list[Stored] = []
    for filter_subject in filters:
        found = await newest_events(
            wire,
            request.app[JS],
            layout.stream,
            filter_subject,
            keep,
            limit,
            stored_from=stored_from,
            budget=budget,
        )
        newest.extend(found.events)
    newest.sort(key=lambda s: s.seq, reverse=True)
    return json_response([_cloud_view(s) for s in newest[:limit]])
