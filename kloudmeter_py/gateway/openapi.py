"""GET /api/openapi.json: an OpenAPI 3.1 document of every route the app has.

The document is built at the first request from ``app.router``, so every route is in it,
whatever module added it. Each ``(method, canonical path)`` is described by an entry in
``OPERATIONS`` (request and response schemas, the statuses it answers); a route without one
still appears, marked ``x-undocumented`` (the tests fail on that). Request and response schemas
come from the msgspec models where there are some (``msgspec.json.schema_components``), so they
follow the models. ``HEAD``, which aiohttp adds to every ``GET``, is left out.

Statuses: the success status of each route; ``400`` where input is checked; ``413`` where a
body is read; ``404``/``409`` where they apply; ``503`` wherever NATS is used; and, when API
tokens are on, ``401``/``403`` on every route but the open ones. Errors under ``/api/v1/`` are
``application/problem+json``, the others ``{"status": "error", "message", "field"}``.
"""

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from kloudmeter_py.core.aggregate import AGGREGATIONS
from kloudmeter_py.core.models import CloudEvent, Event, Meter, MeterIn, Reading, encoder
from kloudmeter_py.gateway.keys import SETTINGS

OPENAPI_PATH = "/api/openapi.json"
Schema = dict[str, Any]

_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


_STR: Schema = {"type": "string"}
_INT: Schema = {"type": "integer"}
_NUM: Schema = {"type": "number"}
_TIME: Schema = {"type": "string", "format": "date-time"}
_OBJ: Schema = {"type": "object"}


def _object(required: Mapping[str, Schema], optional: Mapping[str, Schema] | None = None) -> Schema:
    props = {**required, **(optional or {})}
    return {"type": "object", "properties": props, "required": list(required)}


@dataclass(frozen=True)
class Param:
    """A query or header parameter."""

    name: str
    schema: Schema = field(default_factory=lambda: dict(_STR))
    description: str = ""
    required: bool = False
    where: str = "query"
    style: str | None = None  # "deepObject" for filterGroupBy[key]=value


@dataclass(frozen=True)
class Op:
    """How one route behaves: what it takes, what it answers."""

    summary: str
    tag: str
    status: int = 200
    response: Schema | None = None  # None: no body
    media: str = "application/json"
    path: tuple[str, ...] = ()  # path parameter descriptions, in order
    path_schemas: tuple[Schema, ...] = ()  # per path parameter, when not a plain string
    query: tuple[Param, ...] = ()
    body: Schema | None = None
    body_media: tuple[str, ...] = ("application/json",)
    body_required: bool = True
    errors: tuple[int, ...] = ()  # besides 413 with a body, 503 with NATS, 401/403 with tokens
    nats: bool = True
    description: str = ""
    alt_media: tuple[str, ...] = ()  # other media types of the success response


# -- schemas -------------------------------------------------------------------------------


def _model_schemas() -> dict[str, Schema]:
    from kloudmeter_py.core.rating import Price, PriceIn
    from kloudmeter_py.gateway.auth import UserIn
    from kloudmeter_py.gateway.openmeter import OpenMeterMeterIn
    from kloudmeter_py.gateway.query import QueryBody
    from kloudmeter_py.gateway.rating import ChargingIn, EstimateIn
    from kloudmeter_py.gateway.templates import Template, TemplateIn
    from kloudmeter_py.store.deadletters import DeadLetter, ReplayReport

    _, components = msgspec.json.schema_components(
        [
            Event,
            CloudEvent,
            MeterIn,
            Meter,
            Reading,
            QueryBody,
            OpenMeterMeterIn,
            UserIn,
            DeadLetter,
            ReplayReport,
            PriceIn,
            Price,
            ChargingIn,
            EstimateIn,
            TemplateIn,
            Template,
        ],
        ref_template="#/components/schemas/{name}",
    )
    out: dict[str, Schema] = components
    names = ", ".join(sorted(AGGREGATIONS))
    for name in ("MeterIn", "OpenMeterMeterIn"):
        out[name]["properties"]["aggregation"]["description"] = (
            f"one of {names}, in any case; OpenMeter's names too (UNIQUE_COUNT, ...)"
        )
    # A reading as the API shows it: without the distinct values, with its KV key.
    view = copy.deepcopy(out["Reading"])
    view["title"] = "ReadingView"
    view["properties"].pop("distinct", None)
    view["properties"]["key"] = {"type": "string", "description": "the reading's KV key"}
    view["required"] = [*view.get("required", []), "key"]
    out["ReadingView"] = view
    return out


def _hand_schemas() -> dict[str, Schema]:
    status_error: Schema = {"const": "error"}
    row = _object(
        {
            "value": _nullable(_NUM),
            "windowStart": _TIME,
            "windowEnd": _TIME,
            "subject": _nullable(_STR),
            "groupBy": {"type": "object", "additionalProperties": _nullable(_STR)},
        }
    )
    query_result = _object(
        {
            "from": _TIME,
            "to": _TIME,
            "windowSize": {"enum": ["MINUTE", "HOUR", "DAY", None]},
            "data": _array(ref("QueryRow")),
        },
        {"windowTimeZone": _STR},
    )
    perf_average = _object(
        {
            "start-sec": _INT,
            "end-sec": _INT,
            "interval-size-sec": _INT,
            "num-samples": _INT,
            "avg": _NUM,
        }
    )
    perf_summary = _object(
        {
            "averages": _array(perf_average),
            "start": _INT,
            "end": _INT,
            "timeslice-size-sec": _INT,
            "average-count": _INT,
        }
    )
    user_view = _object(
        {"id": _STR, "name": _STR, "tenant": _STR, "role": {"enum": ["admin", "user"]}},
        {"createdAt": _TIME},
    )
    decimal: Schema = {"type": "string", "format": "decimal"}
    money = _nullable(decimal)
    return {
        "Error": {
            **_object({"status": status_error, "message": _STR}, {"field": _STR}),
            "description": "KloudMeter's error envelope; field names the offending input.",
        },
        "Problem": {
            **_object(
                {"type": _STR, "title": _STR, "status": _INT, "detail": _STR},
                {"instance": _STR, "field": _STR},
            ),
            "description": "RFC 9457 problem details (OpenMeter's errors).",
        },
        "TemplateError": _object({"status": {"const": "error"}, "kind": _STR, "message": _STR}),
        "Accepted": _object({"status": {"const": "ok"}}, {"duplicate": {"const": True}}),
        "Health": _object({"status": {"const": "ok"}}),
        "OpenMeterMeter": _object(
            {
                "id": _STR,
                "slug": _STR,
                "name": _STR,
                "description": _nullable(_STR),
                "aggregation": _STR,
                "eventType": _STR,
                "valueProperty": _nullable(_STR),
                "groupBy": {"type": "object", "additionalProperties": _STR},
                "createdAt": _TIME,
                "updatedAt": _TIME,
            }
        ),
        "OpenMeterQueryBody": {
            "type": "object",
            "properties": {
                "from": _STR,
                "to": _STR,
                "windowSize": _STR,
                "windowTimeZone": _STR,
                "subject": _array(_STR),
                "groupBy": _array(_STR),
                "filterGroupBy": {
                    "type": "object",
                    "additionalProperties": {
                        "anyOf": [_STR, {**_array(_STR), "minItems": 1, "maxItems": 1}]
                    },
                },
            },
        },
        "QueryRow": row,
        "QueryResult": query_result,
        "DeadLetterCounts": _object(
            {"total": _INT, "byMeter": {"type": "object", "additionalProperties": _INT}}
        ),
        "PerfAccepted": _object({"status": {"const": "ok"}, "events": _INT}, {"duplicates": _INT}),
        "PerfSummary": perf_summary,
        "PerfHost": {"type": "object", "additionalProperties": ref("PerfSummary")},
        "Usage": _object(
            {
                "tenant": _STR,
                "start": _TIME,
                "end": _TIME,
                "usage": _array(_object({"location": _STR, "hours": _NUM})),
            }
        ),
        "UserView": user_view,
        "UserCreated": {
            **_object(
                {**user_view["properties"], "token": _STR},
            ),
            "description": "The new user and its token, shown this once.",
        },
        "Resource": _object(
            {
                "meter": _STR,
                "resource_id": _STR,
                "status": {"enum": ["running", "stopped", "deleted"]},
                "quantity": decimal,
                "consumption": decimal,
            },
            {
                "resource_name": _nullable(_STR),
                "resource_type": _nullable(_STR),
                "region": _nullable(_STR),
                "tenant_id": _nullable(_STR),
                "created_at": _nullable(_TIME),
                "deleted_at": _nullable(_TIME),
                "currency": _nullable(_STR),
            },
        ),
        "Record": _object(
            {
                "meter": _STR,
                "resource_id": _STR,
                "start_at": _TIME,
                "end_at": _TIME,
                "status": {"enum": ["running", "stopped"]},
                "quantity": decimal,
                "consumption": decimal,
            },
            {
                "weight": {},
                "seconds": {},
                "unit_price": money,
                "price_id": _nullable(_STR),
                "currency": _nullable(_STR),
            },
        ),
        "Charging": _object(
            {
                "tenant": _nullable(_STR),
                "start": _TIME,
                "end": _TIME,
                "totals": {"type": "object", "additionalProperties": decimal},
                "items": _array(
                    _object(
                        {"meter": _STR, "resource_id": _STR, "quantity": decimal, "cost": decimal},
                        {
                            "tenant": _nullable(_STR),
                            "unit_price": money,
                            "price_id": _nullable(_STR),
                            "currency": _nullable(_STR),
                            "metadata": _OBJ,
                        },
                    )
                ),
            }
        ),
        "CostEstimate": _object(
            {
                "hours": decimal,
                "groups": _array(
                    _object(
                        {
                            "name": _STR,
                            "price_id": _STR,
                            "currency": _STR,
                            "min_quantity": decimal,
                            "max_quantity": decimal,
                            "min_cost": decimal,
                            "max_cost": decimal,
                        }
                    )
                ),
                "totals": {
                    "type": "object",
                    "additionalProperties": _object({"min_cost": decimal, "max_cost": decimal}),
                },
            }
        ),
    }


# -- operations ----------------------------------------------------------------------------

_KEY = Param("key", description="the meter id / reading key", required=True)
_METER = ("the meter id (OpenMeter: id or slug)",)
_WINDOW_SIZE = Param(
    "windowSize", {"enum": ["MINUTE", "HOUR", "DAY"]}, "window size; absent: one total"
)
_QUERY_PARAMS = (
    Param("from", _TIME, "start, RFC 3339, on a METER_INTERVAL boundary (inclusive)"),
    Param("to", _TIME, "end, RFC 3339, on a METER_INTERVAL boundary (exclusive)"),
    _WINDOW_SIZE,
    Param("windowTimeZone", description="IANA time zone of the windows (default UTC)"),
    Param("subject", _array(_STR), "subjects to filter on and split by (repeatable)"),
    Param("groupBy", _array(_STR), "groups to split by (repeatable)"),
    Param(
        "filterGroupBy",
        {"type": "object", "additionalProperties": _STR},
        "filterGroupBy[group]=value: only that group value",
        style="deepObject",
    ),
)
_CLOUD_EVENTS = {"anyOf": [ref("CloudEvent"), _array(ref("CloudEvent"))]}
_PERF_HOST = ("the host name",)
_PERF_TENANT = Param(
    "tenant",
    {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,128}$"},
    "whose hosts (admin; a user token: its own only); absent: hosts without a tenant, "
    "or a user's own",
)
_PRICE_ID = ("the price id",)

OPERATIONS: dict[tuple[str, str], Op] = {
    # KloudMeter
    ("POST", "/api/register-event"): Op(
        "Record a usage event",
        "events",
        status=202,
        response=ref("Accepted"),
        body=ref("Event"),
        errors=(400,),
        description="Answers after JetStream stored it; duplicate: true for an id already "
        "stored within METER_DEDUP_WINDOW. A body with specversion is read as a CloudEvent.",
    ),
    ("POST", "/api/create-meter"): Op(
        "Create a meter",
        "meters",
        status=201,
        response=ref("Meter"),
        body=ref("MeterIn"),
        errors=(400, 409),
    ),
    ("GET", "/api/meters"): Op("List meters", "meters", response=_array(ref("Meter"))),
    ("GET", "/api/meter"): Op(
        "Get a meter", "meters", response=ref("Meter"), query=(_KEY,), errors=(400, 404)
    ),
    ("DELETE", "/api/meter"): Op(
        "Delete a meter and its readings", "meters", status=204, query=(_KEY,), errors=(400, 404)
    ),
    ("GET", "/api/readings"): Op(
        "List readings",
        "readings",
        response=_array(ref("ReadingView")),
        query=(Param("meter", description="meter id"), Param("subject")),
    ),
    ("GET", "/api/reading"): Op(
        "Get a reading by its key",
        "readings",
        response=ref("ReadingView"),
        query=(_KEY,),
        errors=(400, 404),
    ),
    ("GET", "/api/dead-letters"): Op(
        "Dead-letter counts per meter", "dead letters", response=ref("DeadLetterCounts")
    ),
    ("GET", "/api/dead-letters/list"): Op(
        "List dead letters, oldest first",
        "dead letters",
        response=_array(ref("DeadLetter")),
        query=(
            Param("meter"),
            Param("limit", {"type": "integer", "minimum": 1, "maximum": 10000, "default": 100}),
        ),
        errors=(400,),
    ),
    ("POST", "/api/dead-letters/replay"): Op(
        "Replay dead letters into readings",
        "dead letters",
        response=ref("ReplayReport"),
        query=(Param("meter"),),
    ),
    ("GET", "/healthy"): Op(
        "Health: NATS answers",
        "health",
        response=ref("Health"),
        description="503 with the error envelope when NATS does not answer.",
    ),
    ("GET", "/api/meters/{meter}/query"): Op(
        "Query a meter's windows",
        "query",
        response=ref("QueryResult"),
        path=_METER,
        query=(*_QUERY_PARAMS, Param("timeZone", description="alias of windowTimeZone")),
        errors=(400, 404),
    ),
    ("POST", "/api/meters/{meter}/query"): Op(
        "Query a meter's windows",
        "query",
        response=ref("QueryResult"),
        path=_METER,
        body=ref("QueryBody"),
        errors=(400, 404),
    ),
    # OpenMeter
    ("POST", "/api/v1/events"): Op(
        "Ingest CloudEvents (OpenMeter)",
        "openmeter",
        status=204,
        body=_CLOUD_EVENTS,
        body_media=(
            "application/cloudevents+json",
            "application/cloudevents-batch+json",
            "application/json",
        ),
        errors=(400,),
    ),
    ("GET", "/api/v1/meters"): Op(
        "List meters (OpenMeter)", "openmeter", response=_array(ref("OpenMeterMeter"))
    ),
    ("POST", "/api/v1/meters"): Op(
        "Create a meter (OpenMeter)",
        "openmeter",
        status=201,
        response=ref("OpenMeterMeter"),
        body=ref("OpenMeterMeterIn"),
        errors=(400, 409),
    ),
    ("GET", "/api/v1/meters/{meter}"): Op(
        "Get a meter (OpenMeter)",
        "openmeter",
        response=ref("OpenMeterMeter"),
        path=_METER,
        errors=(404,),
    ),
    ("DELETE", "/api/v1/meters/{meter}"): Op(
        "Delete a meter (OpenMeter)", "openmeter", status=204, path=_METER, errors=(404,)
    ),
    ("GET", "/api/v1/meters/{meter}/query"): Op(
        "Query a meter (OpenMeter)",
        "openmeter",
        response=ref("QueryResult"),
        path=_METER,
        query=_QUERY_PARAMS,
        errors=(400, 404),
    ),
    ("POST", "/api/v1/meters/{meter}/query"): Op(
        "Query a meter (OpenMeter)",
        "openmeter",
        response=ref("QueryResult"),
        path=_METER,
        body=ref("OpenMeterQueryBody"),
        body_required=False,
        errors=(400, 404),
    ),
    ("GET", "/api/v1/meters/{meter}/subjects"): Op(
        "Subjects with readings (OpenMeter)",
        "openmeter",
        response=_array(_STR),
        path=_METER,
        errors=(404,),
    ),
    # Host metrics
    ("GET", "/api/perf"): Op(
        "Hosts with samples", "perf", response=_array(_STR), query=(_PERF_TENANT,), errors=(400,)
    ),
    ("POST", "/api/perf/{host}/{epoch}"): Op(
        "Post a host-metrics sample",
        "perf",
        status=202,
        response=ref("PerfAccepted"),
        path=(*_PERF_HOST, "seconds since 1970"),
        path_schemas=({}, {"type": "string", "pattern": "^[0-9]{1,12}$"}),
        query=(
            _PERF_TENANT,
            Param(
                "Idempotency-Key",
                {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                "a retried post with the same key counts once",
                where="header",
            ),
        ),
        body={"type": "object", "additionalProperties": _NUM, "minProperties": 1},
        errors=(400, 409),
    ),
    ("GET", "/api/perf/{host}"): Op(
        "A host's summaries",
        "perf",
        response=ref("PerfHost"),
        path=_PERF_HOST,
        query=(_PERF_TENANT,),
        errors=(400, 404),
    ),
    ("GET", "/api/perf/{host}/{label}"): Op(
        "A host's summaries whose name contains the label",
        "perf",
        response=ref("PerfHost"),
        path=(*_PERF_HOST, "part of the summary name (cpu, by-hour, by-minute:mem), any case"),
        # The route's {label:.+} does not match a newline.
        path_schemas=({}, {"type": "string", "minLength": 1, "pattern": "^[^\\n]+$"}),
        query=(_PERF_TENANT,),
        errors=(400, 404),
    ),
    # Users
    ("POST", "/api/users"): Op(
        "Create a user and its token",
        "users",
        status=201,
        response=ref("UserCreated"),
        body=ref("UserIn"),
        errors=(400,),
    ),
    ("GET", "/api/users"): Op("List users", "users", response=_array(ref("UserView"))),
    ("DELETE", "/api/users/{id}"): Op(
        "Delete a user (revokes its token)",
        "users",
        status=204,
        path=("the user id",),
        errors=(404,),
    ),
    ("GET", "/api/usage"): Op(
        "Hours of use per location of a tenant",
        "usage",
        response=ref("Usage"),
        query=(
            Param(
                "tenant",
                {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,128}$"},
                "the tenant (a user token: its own, the default)",
            ),
            Param("start", _TIME, "RFC 3339", required=True),
            Param("end", _TIME, "RFC 3339 (default: now)"),
        ),
        errors=(400,),
    ),
    # Rating
    ("GET", "/v1/prices"): Op("List prices", "rating", response=_array(ref("Price"))),
    ("POST", "/v1/prices"): Op(
        "Create a price",
        "rating",
        status=201,
        response=ref("Price"),
        body=ref("PriceIn"),
        errors=(400,),
    ),
    ("GET", "/v1/prices/{id}"): Op(
        "Get a price", "rating", response=ref("Price"), path=_PRICE_ID, errors=(404,)
    ),
    ("PUT", "/v1/prices/{id}"): Op(
        "Replace a price",
        "rating",
        response=ref("Price"),
        path=_PRICE_ID,
        body=ref("PriceIn"),
        errors=(400, 404),
    ),
    ("DELETE", "/v1/prices/{id}"): Op(
        "Delete a price", "rating", status=204, path=_PRICE_ID, errors=(404,)
    ),
    ("GET", "/v1/resources"): Op(
        "Resources with their cost so far",
        "rating",
        response=_array(ref("Resource")),
        query=(Param("tenant"),),
    ),
    ("GET", "/v1/records/{resource_id}"): Op(
        "Billing segments of a resource",
        "rating",
        response=_array(ref("Record")),
        path=("the resource id",),
        errors=(404,),
    ),
    ("POST", "/charging"): Op(
        "Cost per meter and resource of a tenant over a period",
        "rating",
        response=ref("Charging"),
        body=ref("ChargingIn"),
        errors=(400, 404),
    ),
    ("POST", "/cost"): Op(
        "Estimate the cost of groups of resources",
        "rating",
        response=ref("CostEstimate"),
        body=ref("EstimateIn"),
        errors=(400,),
    ),
    # Rating templates
    ("GET", "/template"): Op(
        "List rating templates",
        "rating",
        response=_array(_object({"id": _STR, "name": _STR, "description": _STR, "created": _TIME})),
    ),
    ("POST", "/template"): Op(
        "Create a rating template (checked: it must compile)",
        "rating",
        status=201,
        response=ref("Template"),
        body=ref("TemplateIn"),
        errors=(400,),
    ),
    ("GET", "/template/{id}"): Op(
        "Get a rating template",
        "rating",
        response=ref("Template"),
        path=("the template id",),
        errors=(404,),
    ),
    ("DELETE", "/template/{id}"): Op(
        "Delete a rating template",
        "rating",
        status=204,
        path=("the template id",),
        errors=(404,),
    ),
    ("POST", "/template/{id}/rate"): Op(
        "Dry-run a rating template on a JSON object",
        "rating",
        response=_object({"cost": {}}),
        path=("the template id",),
        body=_OBJ,
        errors=(400, 404, 422),
        description="422 with {status, kind, message} when the template fails on this input.",
    ),
    # Dashboard
    ("GET", "/"): Op(
        "The dashboard page", "dashboard", response=_STR, media="text/html", nats=False
    ),
    ("GET", "/static/{name}"): Op(
        "A dashboard asset (app.js, style.css)",
        "dashboard",
        response=_STR,
        media="text/javascript",
        alt_media=("text/css",),
        path=("the asset's file name",),
        errors=(404,),
        nats=False,
    ),
    ("GET", "/api/stream/readings"): Op(
        "Reading changes as server-sent events (one `reading` event per write)",
        "dashboard",
        response=_STR,
        media="text/event-stream",
    ),
    # Operations
    ("GET", "/metrics"): Op(
        "Prometheus metrics",
        "operations",
        response=_STR,
        media="text/plain",
        alt_media=("application/openmetrics-text",),
        nats=False,
    ),
    ("GET", OPENAPI_PATH): Op("This OpenAPI document", "operations", response=_OBJ, nats=False),
}
# The same handlers under a second path.
OPERATIONS[("GET", "/api/meter/")] = OPERATIONS[("GET", "/api/meter")]
OPERATIONS[("DELETE", "/api/meter/")] = OPERATIONS[("DELETE", "/api/meter")]
OPERATIONS[("GET", "/api/reading/")] = OPERATIONS[("GET", "/api/reading")]
OPERATIONS[("GET", "/api/perf/")] = OPERATIONS[("GET", "/api/perf")]

_UNDOCUMENTED = Op(
    "Not described yet", "undocumented", response={}, errors=(400, 404), body_required=False
)

_ERROR_SCHEMAS = {422: "TemplateError"}

_REASONS = {
    400: "Invalid input: bad JSON, a missing or wrong-typed field or parameter",
    401: "No token, a wrong one or a revoked one",
    403: "The token's role or tenant may not do this",
    404: "Not found",
    409: "Conflict: it exists already",
    422: "The rating template failed on this input",
    413: "Request body larger than METER_MAX_BODY_BYTES",
    503: "NATS is unavailable",
}


# -- the document --------------------------------------------------------------------------


def routes(app: web.Application) -> list[tuple[str, str]]:
    """Every (method, canonical path) of the app, HEAD left out."""
    out = []
    for route in app.router.routes():
        resource = route.resource
        if resource is None or route.method == "HEAD":
            continue
        out.append((route.method, resource.canonical))
    return out


def _template(path: str) -> str:
    return _PARAM.sub("{}", path)


def _error_content(path: str) -> dict[str, Any]:
    if path.startswith("/api/v1/"):
        return {"application/problem+json": {"schema": ref("Problem")}}
    return {"application/json": {"schema": ref("Error")}}


def _operation(
    method: str,
    canonical: str,
    doc_path: str,
    op: Op,
    open_routes: set[tuple[str, str]],
    auth: bool,
) -> dict[str, Any]:
    names = _PARAM.findall(doc_path)
    parameters: list[dict[str, Any]] = []
    for i, name in enumerate(names):
        schema: Schema = {"type": "string", "minLength": 1}
        if i < len(op.path_schemas) and op.path_schemas[i]:
            schema = op.path_schemas[i]
        parameters.append(
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": schema,
                "description": op.path[i] if i < len(op.path) else "",
            }
        )
    for p in op.query:
        param: dict[str, Any] = {
            "name": p.name,
            "in": p.where,
            "required": p.required,
            "schema": p.schema,
        }
        if p.description:
            param["description"] = p.description
        if p.style:
            param["style"] = p.style
            param["explode"] = True
        parameters.append(param)
    out: dict[str, Any] = {
        "operationId": _operation_id(method, canonical),
        "summary": op.summary,
        "tags": [op.tag],
    }
    if op.description:
        out["description"] = op.description
    if op is _UNDOCUMENTED:
        out["x-undocumented"] = True
    if parameters:
        out["parameters"] = parameters
    if op.body is not None:
        out["requestBody"] = {
            "required": op.body_required,
            "content": {media: {"schema": op.body} for media in op.body_media},
        }
    ok: dict[str, Any] = {"description": op.summary}
    if op.response is not None:
        ok["content"] = {m: {"schema": op.response} for m in (op.media, *op.alt_media)}
    responses: dict[str, Any] = {str(op.status): ok}
    errors = set(op.errors)
    if op.body is not None:
        errors |= {400, 413}
    if op.nats:
        errors.add(503)
    if auth and (method, canonical) not in open_routes:
        errors |= {401, 403}
        out["security"] = [{"bearer": []}]
    elif auth:
        out["security"] = []
    for status in sorted(errors):
        responses[str(status)] = {
            "description": _REASONS.get(status, "Error"),
            "content": (
                {"application/json": {"schema": ref(_ERROR_SCHEMAS[status])}}
                if status in _ERROR_SCHEMAS
                else _error_content(doc_path)
            ),
        }
    out["responses"] = responses
    return out


def _operation_id(method: str, path: str) -> str:
    words = re.findall(r"[A-Za-z0-9]+", path)
    return (
        method.lower()
        + "".join(w[:1].upper() + w[1:] for w in words)
        + ("Slash" if path.endswith("/") and path != "/" else "")
    )


def build_document(app: web.Application) -> dict[str, Any]:
    """The OpenAPI document of the app's routes as they are now."""
    from kloudmeter_py import __version__
    from kloudmeter_py.gateway import auth as auth_module

    auth = app[SETTINGS].auth_enabled
    open_routes = set(auth_module._ANYONE)
    paths: dict[str, dict[str, Any]] = {}
    doc_paths: dict[str, str] = {}  # template ({} for each parameter) -> path in the document
    for method, canonical in routes(app):
        # OpenAPI forbids two paths that differ only in parameter names
        # (/api/perf/{host}/{epoch} and /api/perf/{host}/{label}): they share the first one.
        doc_path = doc_paths.setdefault(_template(canonical), _PARAM.sub(r"{\1}", canonical))
        op = OPERATIONS.get((method, canonical), _UNDOCUMENTED)
        paths.setdefault(doc_path, {})[method.lower()] = _operation(
            method, canonical, doc_path, op, open_routes, auth
        )
    schemas = {**_model_schemas(), **_hand_schemas()}
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "kloudmeter",
            "version": __version__,
            "description": "Usage metering on NATS JetStream: KloudMeter's REST API, an "
            "OpenMeter-compatible v1 subset, host metrics, users, usage and rating.",
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if auth:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc


def add_routes(app: web.Application) -> None:
    """GET /api/openapi.json, built from app.router at the first request and then kept."""
    cache: list[bytes] = []

    async def openapi(request: web.Request) -> web.Response:
        if not cache:
            cache.append(encoder.encode(build_document(request.app)))
        return web.Response(body=cache[0], content_type="application/json")

    app.router.add_get(OPENAPI_PATH, openapi)
