"""GET /api/usage?tenant=&start=&end=: hours of use per location (AMP's usage summary).

From the tenant's lifecycle events (event type ``KLOUDMETER_USAGE_EVENT_TYPE``, default
``lifecycle``) with ``data.event`` CREATED or DESTROYED, ``data.resource`` and the location at
``KLOUDMETER_USAGE_LOCATION`` (a JSONPath, default ``$.location``), as the worker folds them
into the ``resources`` bucket (``core.lifecycle``): a read costs the tenant's resources, not
the events ever stored, and does not depend on ``METER_RETENTION``.
"""

from datetime import UTC, datetime

import msgspec
from aiohttp import web

from kloudmeter_py.core.budget import ReadBudget
from kloudmeter_py.core.lifecycle import state_decoder, usage_events, usage_pattern
from kloudmeter_py.core.query import parse_time
from kloudmeter_py.core.usage import Lifecycle, usage_hours
from kloudmeter_py.core.windows import QueryError
from kloudmeter_py.errors import InvalidInput
from kloudmeter_py.gateway.helpers import json_response, read_budget
from kloudmeter_py.gateway.keys import JS, LAYOUT, SETTINGS
from kloudmeter_py.gateway.routes import USER, Op, Param, Routes, TenantScope, tenant_of
from kloudmeter_py.gateway.schemas import TENANT, TIME, ref
from kloudmeter_py.store.kv import scan

routes = Routes()


class LocationHours(msgspec.Struct):
    location: str
    hours: float


class Usage(msgspec.Struct):
    """Hours of use per location of a tenant between start and end."""

    tenant: str
    start: datetime
    end: datetime
    usage: list[LocationHours]


@routes.get(
    "/api/usage",
    access=USER,
    tenant=TenantScope(param="tenant"),
    op=Op(
        "Hours of use per location of a tenant",
        "usage",
        response=ref("Usage"),
        query=(
            Param(
                "tenant",
                TENANT,
                "the tenant (required but for a user token: its own, the default)",
                required=True,
            ),
            Param("start", TIME, "RFC 3339", required=True),
            Param("end", TIME, "RFC 3339 (default: now)"),
        ),
        errors=(400,),
    ),
)
async def usage(request: web.Request) -> web.Response:
    q = request.query
    tenant = tenant_of(request)
    if tenant is None:
        raise InvalidInput("query parameter 'tenant' is required", field="tenant")
    try:
        start = parse_time("start", q.get("start", ""))
        end = parse_time("end", q["end"]) if "end" in q else datetime.now(UTC)
    except QueryError as exc:
        raise InvalidInput(str(exc), field=exc.field) from None
    if start >= end:
        raise InvalidInput("start must be before end", field="start")
    settings = request.app[SETTINGS]
    events = await _lifecycle_events(
        request, tenant, settings.usage_event_type, read_budget(request)
    )
    hours = usage_hours(events, start, end)
    rows = [LocationHours(location=k, hours=round(v, 6)) for k, v in sorted(hours.items())]
    return json_response(Usage(tenant=tenant, start=start, end=end, usage=rows))


async def _lifecycle_events(
    request: web.Request, tenant: str, event_type: str, budget: ReadBudget
) -> list[Lifecycle]:
    """The tenant's usage resources' CREATED / DESTROYED points, as the worker folded them
    into the ``resources`` bucket (keys ``usage.<event type>.<tenant>.<resource>``): one
    server-side filtered scan, each key a tick of ``budget``."""
    layout = request.app[LAYOUT]
    out: list[Lifecycle] = []
    for _, value in await scan(
        request.app[JS], layout.resources_bucket, usage_pattern(event_type, tenant), budget=budget
    ):
        out.extend(usage_events(state_decoder.decode(value)))
    return out
