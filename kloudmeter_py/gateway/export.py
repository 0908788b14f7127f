"""GET /api/meters/{id}/export: a meter's usage per subject (and group) for a period, as CSV or
JSON, in one streamed answer. The rows are a meter query's, run as the query APIs run it
(``gateway.query.execute``: narrowed to the caller's tenant, ``store.query.run_query``), split
by subject."""

import re

from aiohttp import web

from kloudmeter_py.core.export import FORMATS, csv_chunks, json_chunks, ordered
from kloudmeter_py.core.query import Query
from kloudmeter_py.errors import InvalidInput
from kloudmeter_py.gateway.keys import METERS
from kloudmeter_py.gateway.query import METER_PATH, QUERY_PARAMS, QueryBody, _build, execute
from kloudmeter_py.gateway.routes import CALLER, USER, Op, Param, Routes
from kloudmeter_py.gateway.schemas import STR, ref
from kloudmeter_py.store.query import collector_paused

routes = Routes()
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_COMMON = {p.name: p for p in QUERY_PARAMS}
EXPORT_PARAMS = (
    Param("from", _COMMON["from"].schema, _COMMON["from"].description, required=True),
    Param("to", _COMMON["to"].schema, _COMMON["to"].description, required=True),
    _COMMON["windowSize"],
    _COMMON["windowTimeZone"],
    Param("groupBy", _COMMON["groupBy"].schema, "groups to split by besides the subject"),
    Param("format", {"enum": list(FORMATS)}, "csv or json", required=True),
)


def _required(request: web.Request, name: str, what: str) -> str:
    value = request.query.get(name)
    if not value:
        raise InvalidInput(f"{name}: required ({what})", field=name)
    return value


@routes.get(
    "/api/meters/{meter}/export",
    access=USER,
    tenant=CALLER,
    op=Op(
        "Export a meter's usage per subject for a period",
        "query",
        path=METER_PATH,
        query=EXPORT_PARAMS,
        responses=(("text/csv", STR), ("application/json", ref("QueryResult"))),
        errors=(400, 404),
        description="One row per subject, requested group values and window (the whole "
        "period when windowSize is absent), ordered by subject. CSV columns: subject, "
        "groupBy.<group>..., windowStart, windowEnd, value. JSON: the query answer's shape.",
    ),
)
async def export_usage(request: web.Request) -> web.StreamResponse:
    meter = await request.app[METERS].get(request.match_info["meter"])
    start = _required(request, "from", "RFC 3339, on a METER_INTERVAL boundary")
    end = _required(request, "to", "RFC 3339, on a METER_INTERVAL boundary")
    fmt = _required(request, "format", "csv or json")
    if fmt not in FORMATS:
        raise InvalidInput(f"format: {fmt!r} is not csv or json", field="format")
    body = QueryBody(
        start=start,
        end=end,
        windowSize=request.query.get("windowSize"),
        windowTimeZone=request.query.get("windowTimeZone"),
        groupBy=request.query.getall("groupBy", []),
    )
    q = _build(request, meter, body)
    q.by_subject = True
    result = await execute(request, meter, q)  # every error is raised before the answer starts
    rows = ordered(result.data, q.group_by)
    head = {
        "from": result.start,
        "to": result.end,
        "windowSize": result.windowSize,
        "windowTimeZone": result.windowTimeZone,
    }
    resp = web.StreamResponse(
        headers={"Content-Disposition": f'attachment; filename="{_filename(meter.id, q, fmt)}"'}
    )
    resp.content_type = FORMATS[fmt]
    if fmt == "csv":
        resp.charset = "utf-8"  # text/csv is US-ASCII unless it says so
    await resp.prepare(request)
    chunks = json_chunks(head, rows) if fmt == "json" else csv_chunks(rows, q.group_by)
    with collector_paused():  # (as while the rows were built: see store.query)
        for chunk in chunks:
            await resp.write(chunk)
    await resp.write_eof()
    return resp


def _filename(meter_id: str, q: Query, fmt: str) -> str:
    name = _UNSAFE.sub("_", meter_id)[:64] or "meter"
    return f"{name}_{q.start:%Y%m%dT%H%M%SZ}_{q.end:%Y%m%dT%H%M%SZ}.{fmt}"
