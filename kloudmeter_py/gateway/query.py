"""GET/POST /api/meters/{id}/query: windows over the summaries, in OpenMeter's shape."""

import ast
import json
import re
from datetime import datetime
from typing import Any, Literal

import msgspec
from aiohttp import web

from kloudmeter_py.core.budget import ReadBudget
from kloudmeter_py.core.models import Meter
from kloudmeter_py.core.query import Query, QueryRow, build_query
from kloudmeter_py.core.windows import QueryError
from kloudmeter_py.errors import InvalidInput
from kloudmeter_py.gateway.helpers import decode_body, json_response, read_budget
from kloudmeter_py.gateway.keys import JS, LEAN, METERS, SETTINGS
from kloudmeter_py.gateway.routes import CALLER, USER, Op, Param, Routes, tenant_subjects
from kloudmeter_py.gateway.schemas import STR, TIME, array, ref
from kloudmeter_py.store.query import run_query, utc_now

routes = Routes()
_FILTER = re.compile(r"filterGroupBy\[(.+)\]")
METER_PATH = ("the meter id (OpenMeter: id or slug)",)
QUERY_PARAMS = (
    Param("from", TIME, "start, RFC 3339, on a METER_INTERVAL boundary (inclusive)"),
    Param("to", TIME, "end, RFC 3339, on a METER_INTERVAL boundary (exclusive)"),
    Param(
        "windowSize",
        {"enum": ["MINUTE", "HOUR", "DAY", "MONTH"]},
        "window size (MONTH: calendar months in windowTimeZone); absent: one total",
    ),
    Param("windowTimeZone", description="IANA time zone of the windows (default UTC)"),
    Param("subject", array(STR), "subjects to filter on and split by (repeatable)"),
    Param("groupBy", array(STR), "groups to split by (repeatable)"),
    Param(
        "filterGroupBy",
        {"type": "object", "additionalProperties": STR},
        "filterGroupBy[group]=value: only that group value",
        style="deepObject",
    ),
)


class QueryBody(msgspec.Struct, forbid_unknown_fields=True, rename={"start": "from", "end": "to"}):
    start: str | None = None
    end: str | None = None
    windowSize: str | None = None
    windowTimeZone: str | None = None
    subject: list[str] = []
    groupBy: list[str] = []
    filterGroupBy: dict[str, str] = {}


_body_decoder = msgspec.json.Decoder(QueryBody)


class QueryResult(msgspec.Struct, omit_defaults=True, rename={"start": "from", "end": "to"}):
    """The windows with data; windowTimeZone is KloudMeter's (OpenMeter's answer has none)."""

    start: datetime
    end: datetime
    windowSize: Literal["MINUTE", "HOUR", "DAY", "MONTH"] | None
    data: list[QueryRow]
    windowTimeZone: str | None = None


def body_from_params(request: web.Request) -> QueryBody:
    """The query a GET asks for, from its URL parameters (both query APIs read them so):
    ``from``, ``to``, ``windowSize``, ``windowTimeZone`` (or ``timeZone``), repeated
    ``subject`` and ``groupBy``, and ``filterGroupBy[group]=value`` or one ``filterGroupBy``
    object (the openmeter SDK sends the dict as one value, JSON or a Python repr)."""
    q = request.query
    return QueryBody(
        start=q.get("from"),
        end=q.get("to"),
        windowSize=q.get("windowSize"),
        windowTimeZone=q.get("windowTimeZone") or q.get("timeZone"),
        subject=q.getall("subject", []),
        groupBy=q.getall("groupBy", []),
        filterGroupBy=_filter_group_by(request),
    )


def _filter_group_by(request: web.Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in request.query.items():
        match = _FILTER.fullmatch(name)
        if match:
            out[match.group(1)] = value
        elif name == "filterGroupBy":
            try:
                parsed = json.loads(value)
            except ValueError:
                try:
                    parsed = ast.literal_eval(value)
                except (ValueError, SyntaxError):
                    raise InvalidInput(
                        "filterGroupBy: expected an object of group -> value", field="filterGroupBy"
                    ) from None
            if not isinstance(parsed, dict):
                raise InvalidInput("filterGroupBy: expected an object", field="filterGroupBy")
            out.update({str(k): str(v) for k, v in parsed.items()})
    return out


def _build(request: web.Request, meter: Meter, body: QueryBody) -> Query:
    settings = request.app[SETTINGS]
    try:
        return build_query(
            meter,
            start=body.start,
            end=body.end,
            window_size=body.windowSize,
            tz=body.windowTimeZone,
            subjects=body.subject,
            group_by=body.groupBy,
            filter_group_by=body.filterGroupBy,
            interval=settings.interval,
            now=utc_now(),
            day_retention_days=settings.day_retention_days,
        )
    except QueryError as exc:
        raise InvalidInput(str(exc), field=exc.field) from None


async def execute(
    request: web.Request,
    meter: Meter,
    q: Query,
    budget: ReadBudget | None = None,
    *,
    empty: bool = False,
) -> QueryResult:
    """Run ``q`` for this request's tenant, within ``budget`` (default: a new read's);
    ``empty``: no subject is asked for (the answer has no rows)."""
    scope = await tenant_subjects(request)
    if scope is not None:
        # A user sees its own tenant's subjects (a customer's: all it owns) and nothing
        # else, asked for or not.
        q.subjects = [s for s in q.subjects if s in scope] if q.subjects else list(scope)
        if q.customers:
            q.customers = {s: c for s, c in q.customers.items() if s in scope}
        empty = empty or not q.subjects
    if empty:
        size = q.window_size.upper() if q.window_size else None
        none: dict[str, Any] = {"from": q.start, "to": q.end, "windowSize": size, "data": []}
        return msgspec.convert({**none, "windowTimeZone": q.tz.key}, QueryResult)
    try:
        result = await run_query(
            request.app[JS],
            request.app[SETTINGS],
            meter,
            q,
            budget or read_budget(request),
            wire=await request.app[LEAN].wire(),
        )
    except QueryError as exc:
        raise InvalidInput(str(exc), field=exc.field) from None
    return msgspec.convert(result, QueryResult)


@routes.get(
    "/api/meters/{meter}/query",
    access=USER,
    tenant=CALLER,
    op=Op(
        "Query a meter's windows",
        "query",
        response=ref("QueryResult"),
        path=METER_PATH,
        query=(*QUERY_PARAMS, Param("timeZone", description="alias of windowTimeZone")),
        errors=(400, 404),
    ),
)
@routes.post(
    "/api/meters/{meter}/query",
    access=USER,
    tenant=CALLER,
    op=Op(
        "Query a meter's windows",
        "query",
        response=ref("QueryResult"),
        path=METER_PATH,
        body=ref("QueryBody"),
        errors=(400, 404),
    ),
)
async def query_meter(request: web.Request) -> web.Response:
    meter = await request.app[METERS].get(request.match_info["meter"])
    if request.method == "POST":
        body = decode_body(await request.read(), _body_decoder)
        q = _build(request, meter, body)
    else:
        q = _build(request, meter, body_from_params(request))
    return json_response(await execute(request, meter, q))
