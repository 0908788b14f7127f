"""GET /api/openapi.json: an OpenAPI 3.1 document of every route the app has.

The document is built at the first request from ``app.router`` and the declaration each route
carries (``routes.py``: access, tenant scope, operation), so a route is described where it is
declared, and a route without a declaration cannot be registered (``check_declared``).
Request and response schemas come from the msgspec models where there are some
(``msgspec.json.schema_components``), so they follow the models; the rest are in
``schemas.py``. ``HEAD``, which aiohttp adds to every ``GET``, is left out.

Statuses: the success status of each route; ``400`` where input is checked; ``413`` where a
body is read; ``404``/``409`` where they apply; ``503`` wherever NATS is used; and, when API
tokens are on, ``401``/``403`` on every route but the open ones. Errors under ``/api/v1/`` are
``application/problem+json``, the others ``{"status": "error", "message", "field"}``. A route
whose tenant scope takes a query parameter documents it, with its ``400``.
"""

import copy
import re
from typing import Any

import msgspec
from aiohttp import web

from kloudmeter_py import __version__
from kloudmeter_py.core import customers as customer_models
from kloudmeter_py.core import portal as portal_models
from kloudmeter_py.core.aggregate import AGGREGATIONS
from kloudmeter_py.core.corrections import CORRECTION_SOURCE
from kloudmeter_py.core.models import CloudEvent, Event, Meter, MeterIn, Reading, encoder
from kloudmeter_py.core.rating import Price
from kloudmeter_py.gateway import (
    alerts,
    auth,
    corrections,
    customer_entitlements,
    entitlements,
    kloudmeter,
    openmeter,
    perf,
    query,
    rating,
    templates,
    usage,
)
from kloudmeter_py.gateway.helpers import Error, Problem
from kloudmeter_py.gateway.keys import OPENAPI_CACHE, SETTINGS
from kloudmeter_py.gateway.routes import (
    ADMIN,
    NO_TENANT_DATA,
    Access,
    Op,
    Param,
    Routes,
    RouteSpec,
    declared_routes,
)
from kloudmeter_py.gateway.schemas import (
    EVENT_YEAR,
    OBJ,
    RFC3339,
    STR,
    TENANT,
    Schema,
    meter_rules,
    ref,
    with_pattern,
)
from kloudmeter_py.metrics import METRICS, METRICS_PATH
from kloudmeter_py.store.deadletters import DeadLetter, ReplayReport
from kloudmeter_py.store.entitlements import EntitlementValue

OPENAPI_PATH = "/api/openapi.json"
_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")
routes = Routes()

_TENANT_PARAM_SCHEMA = TENANT

# Every request and response body, as msgspec models: the document's components.
MODELS: list[type[msgspec.Struct]] = [
    Error,
    Problem,
    Event,
    CloudEvent,
    MeterIn,
    Meter,
    Reading,
    kloudmeter.MeterBody,
    kloudmeter.Accepted,
    corrections.CancelIn,
    corrections.AmendIn,
    corrections.CorrectionAccepted,
    corrections.EventView,
    kloudmeter.Health,
    kloudmeter.DeadLetterCounts,
    DeadLetter,
    ReplayReport,
    query.QueryBody,
    query.QueryResult,
    openmeter.OpenMeterMeterIn,
    openmeter.OpenMeterQueryIn,
    openmeter.OpenMeterMeter,
    openmeter.OpenMeterMeterUpdate,
    openmeter.OpenMeterIngestedEvent,
    entitlements.FeatureIn,
    entitlements.Feature,
    entitlements.EntitlementIn,
    entitlements.Entitlement,
    entitlements.GrantIn,
    entitlements.Grant,
    entitlements.ResetIn,
    EntitlementValue,
    entitlements.BalanceHistory,
    customer_entitlements.EntitlementPage,
    customer_entitlements.GrantPage,
    customer_models.CustomerIn,
    customer_models.Customer,
    customer_models.CustomerPage,
    customer_models.Subject,
    customer_models.SubjectUpsert,
    portal_models.PortalTokenIn,
    portal_models.PortalToken,
    portal_models.InvalidateIn,
    perf.PerfAccepted,
    perf.PerfSummary,
    auth.UserIn,
    auth.UserView,
    auth.UserCreated,
    usage.Usage,
    Price,
    rating.PriceBody,
    rating.ChargingIn,
    rating.EstimateIn,
    rating.ResourceCost,
    rating.Record,
    rating.Charging,
    rating.CostEstimate,
    templates.TemplateIn,
    templates.Template,
    templates.TemplateSummary,
    templates.Rated,
    templates.TemplateFailure,
    *alerts.SCHEMA_MODELS,
]

# -- schemas -------------------------------------------------------------------------------


def _model_schemas() -> dict[str, Schema]:
    _, components = msgspec.json.schema_components(
        MODELS,
        ref_template="#/components/schemas/{name}",
    )
    out: dict[str, Schema] = components
    names = ", ".join(sorted(AGGREGATIONS))
    out["MeterBody"].update(meter_rules(lifecycle_fields=True))
    out["PriceBody"].update(rating.PRICE_RULES)
    # The core models check an event's year in __post_init__, which no schema shows.
    for name in ("Event", "CloudEvent"):
        time = out[name]["properties"]["time"]
        time["anyOf"] = [
            {**t, "pattern": EVENT_YEAR} if t.get("type") == "string" else t for t in time["anyOf"]
        ]
    # Ingest refuses corrections (gateway.corrections.refuse_correction): no correction
    # attribute, no id or CloudEvent source in their id space.
    out["Event"]["properties"].pop("correction")
    out.pop("Correction")
    out["Event"]["not"] = {"anyOf": [{"required": ["correction"]}, _reserved("id", "#")]}
    out["CloudEvent"]["not"] = {"anyOf": [{"required": ["correction"]}, _reserved("source", "")]}
    out["OpenMeterMeterIn"].update(meter_rules(lifecycle_fields=False))
    # A customer is named by its key or at least one subject key (core.customers).
    out["CustomerIn"]["anyOf"] = [
        {"required": ["key"], "properties": {"key": {"type": "string"}}},
        {
            "required": ["usageAttribution"],
            "properties": {
                "usageAttribution": {
                    "type": "object",
                    "properties": {"subjectKeys": {"minItems": 1}},
                }
            },
        },
    ]
    out["InvalidateIn"]["anyOf"] = [
        {"required": [f], "properties": {f: {"type": "string"}}} for f in ("id", "subject")
    ]
    props = out["PortalTokenIn"]["properties"]
    props["expiresAt"] = with_pattern(props["expiresAt"], RFC3339)
    for name in ("currentPeriodStart", "currentPeriodEnd"):
        props = out["SubjectUpsert"]["properties"]
        props[name] = with_pattern(props[name], RFC3339)
    out["AmendIn"]["anyOf"] = [{"required": ["data"]}, {"required": ["time"]}]
    out["AmendIn"]["properties"]["time"]["pattern"] = EVENT_YEAR
    for name in ("MeterIn", "MeterBody", "OpenMeterMeterIn"):
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


def _reserved(field: str, after: str) -> Schema:
    """A schema matching a ``field`` in the corrections' id space: the CORRECTION_PREFIX
    (``after="#"``), or the CORRECTION_SOURCE alone or followed by ``#`` (``after=""``)."""
    # The source is letters and a hyphen: nothing to escape in a pattern.
    pattern = f"^{CORRECTION_SOURCE}#" if after else f"^{CORRECTION_SOURCE}(#|$)"
    return {"required": [field], "properties": {field: {"type": "string", "pattern": pattern}}}


_ERROR_SCHEMAS = {422: "TemplateFailure"}

_REASONS = {
    400: "Invalid input: bad JSON, a missing or wrong-typed field or parameter",
    401: "No token, a wrong one or a revoked one (a portal route: an expired or invalidated one)",
    403: "The token's role or tenant may not do this",
    404: "Not found",
    409: "Conflict: it exists already",
    422: "The rating template failed on this input",
    413: "Request body larger than METER_MAX_BODY_BYTES",
    503: "NATS is unavailable, a read passed METER_READ_TIMEOUT_MS, or the gateway is stopping",
}


# -- the document --------------------------------------------------------------------------


def _template(path: str) -> str:
    return _PARAM.sub("{}", path)


def _error_content(path: str) -> dict[str, Any]:
    if path.startswith("/api/v1/"):
        return {"application/problem+json": {"schema": ref("Problem")}}
    return {"application/json": {"schema": ref("Error")}}


def _query_params(spec: RouteSpec) -> tuple[Param, ...]:
    """The operation's parameters, with the tenant parameter of its scope."""
    op, name = spec.op, spec.tenant.param
    if name is None or any(p.name == name for p in op.query):
        return op.query
    if spec.tenant.admin_default is None:
        about = "the tenant (admin; a user token: its own only); absent: every tenant"
    else:
        about = "the tenant (admin; a user token: its own only); absent: a user's own"
    return (Param(name, _TENANT_PARAM_SCHEMA, about), *op.query)


def _operation(
    method: str, canonical: str, doc_path: str, spec: RouteSpec, auth: bool
) -> dict[str, Any]:
    op = spec.op
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
    for p in _query_params(spec):
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
        "x-access": spec.access.value,
    }
    if op.description:
        out["description"] = op.description
    if parameters:
        out["parameters"] = parameters
    if op.bodies:
        out["requestBody"] = {
            "required": op.body_required,
            "content": {media: {"schema": schema} for media, schema in op.bodies},
        }
    elif op.body is not None:
        out["requestBody"] = {
            "required": op.body_required,
            "content": {media: {"schema": op.body} for media in op.body_media},
        }
    ok: dict[str, Any] = {"description": op.summary}
    if op.responses:
        ok["content"] = {media: {"schema": schema} for media, schema in op.responses}
    elif op.response is not None:
        ok["content"] = {m: {"schema": op.response} for m in (op.media, *op.alt_media)}
    responses: dict[str, Any] = {str(op.status): ok}
    errors = set(op.errors)
    if op.body is not None or op.bodies:
        errors |= {400, 413}
    if spec.tenant.param is not None:
        errors.add(400)
    if op.nats:
        errors.add(503)
    if spec.access is Access.PORTAL:
        errors |= {401, 403}  # a portal token is needed, tokens on or off
    if auth and spec.access is not Access.OPEN:
        errors |= {401, 403}
        out["security"] = [{"bearer": []}]
    elif auth:
        out["security"] = []
    if parameters:
        errors.add(400)  # a request line too long for aiohttp's parser, at least
    for status in sorted(errors):
        content = (
            {"application/json": {"schema": ref(_ERROR_SCHEMAS[status])}}
            if status in _ERROR_SCHEMAS
            else _error_content(doc_path)
        )
        if status == 400:
            # aiohttp answers a request it cannot parse (a line over 8190 bytes) itself.
            content = {**content, "text/plain": {"schema": STR}}
        responses[str(status)] = {"description": _REASONS.get(status, "Error"), "content": content}
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
    auth = app[SETTINGS].auth_enabled
    paths: dict[str, dict[str, Any]] = {}
    doc_paths: dict[str, str] = {}  # template ({} for each parameter) -> path in the document
    for method, canonical, spec in declared_routes(app):
        if spec is None:
            raise RuntimeError(f"{method} {canonical} has no declaration")
        # OpenAPI forbids two paths that differ only in parameter names
        # (/api/perf/{host}/{epoch} and /api/perf/{host}/{label}): they share the first one.
        doc_path = doc_paths.setdefault(_template(canonical), _PARAM.sub(r"{\1}", canonical))
        paths.setdefault(doc_path, {})[method.lower()] = _operation(
            method, canonical, doc_path, spec, auth
        )
    schemas = _model_schemas()
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


@routes.get(
    OPENAPI_PATH,
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op("This OpenAPI document", "operations", response=OBJ, nats=False),
)
async def openapi(request: web.Request) -> web.Response:
    """Built from app.router at the first request, then kept."""
    cache = request.app[OPENAPI_CACHE]
    if not cache:
        cache.append(encoder.encode(build_document(request.app)))
    return web.Response(body=cache[0], content_type="application/json")


@routes.get(
    METRICS_PATH,
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Prometheus metrics",
        "operations",
        response=STR,
        media="text/plain",
        alt_media=("application/openmetrics-text",),
        nats=False,
    ),
)
async def metrics(request: web.Request) -> web.StreamResponse:
    return await request.app[METRICS].handler(request)
