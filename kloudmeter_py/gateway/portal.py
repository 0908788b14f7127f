"""OpenMeter's consumer portal: tokens a customer's own web page uses to read one subject's
usage (store.portal keeps them, as hashes), and the query they may call.

- ``POST /api/v1/portal/tokens`` (admin): a token for a subject, optionally only for some
  meters (each must exist: 404) and with an expiry (default an hour, as OpenMeter's; at
  most 366 days); answers 200 with the token, shown this once.
- ``GET /api/v1/portal/tokens`` (admin): the newest ``limit`` (1-100, default 25), never
  the tokens themselves.
- ``POST /api/v1/portal/tokens/invalidate`` (admin): by ``id`` (404 if unknown) and/or by
  ``subject`` (all its tokens); 204. An invalidated token answers 401 from then on.
- ``GET /api/v1/portal/meters/{meterSlug}/query`` (a portal token only, tokens on or off):
  the token's subject's usage of an allowed meter (another: 403 naming meterSlug), as
  OpenMeter's meter query answers it (JSON, or CSV on ``Accept: text/csv``); ``subject``
  and ``filterCustomerId`` are ignored, as OpenMeter ignores them there: the answer is
  always the token's subject's, split by subject. Every other route answers a portal
  token 401 (it is no API token), and this one answers an API token 403.
"""

from datetime import UTC, datetime

import msgspec
from aiohttp import web

from kloudmeter_py.core.portal import (
    LIST_DEFAULT,
    LIST_MAX,
    InvalidateIn,
    PortalTokenIn,
    check_meter,
    expiry,
    view,
)
from kloudmeter_py.errors import InvalidInput, NotFound
from kloudmeter_py.gateway.helpers import decode_body, json_response
from kloudmeter_py.gateway.keys import METERS, PORTAL, PORTAL_TOKEN
from kloudmeter_py.gateway.openmeter import answer_query
from kloudmeter_py.gateway.query import QUERY_PARAMS, body_from_params
from kloudmeter_py.gateway.routes import ADMIN, CALLER, NO_TENANT_DATA, Access, Op, Param, Routes
from kloudmeter_py.gateway.schemas import STR, array, ref

routes = Routes()
_token_in = msgspec.json.Decoder(PortalTokenIn)
_invalidate_in = msgspec.json.Decoder(InvalidateIn)


@routes.post(
    "/api/v1/portal/tokens",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Create a portal token (OpenMeter)",
        "portal",
        response=ref("PortalToken"),
        body=ref("PortalTokenIn"),
        errors=(400, 404),
        description="A token for one subject's usage (of allowedMeterSlugs only, when "
        "given; each must exist). It expires at expiresAt (default in an hour; at most 366 "
        "days). The token is in this answer only; the server keeps its hash.",
    ),
)
async def create_token(request: web.Request) -> web.Response:
    """Admin only: a token opens a subject's usage to whoever holds it."""
    body = decode_body(await request.read(), _token_in)
    now = datetime.now(UTC)
    expires = expiry(body.expiresAt, now)
    allowed = (
        None if body.allowedMeterSlugs is None else list(dict.fromkeys(body.allowedMeterSlugs))
    )
    for slug in allowed or []:
        try:
            await request.app[METERS].get(slug)
        except NotFound:
            raise NotFound(f"meter {slug!r} not found", field="allowedMeterSlugs") from None
    record, token = await request.app[PORTAL].create(body.subject, allowed, expires, now)
    return json_response(view(record, now, token))


@routes.get(
    "/api/v1/portal/tokens",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "List portal tokens (OpenMeter)",
        "portal",
        response=array(ref("PortalToken")),
        query=(
            Param(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": LIST_MAX},
                f"tokens to list, newest first (default {LIST_DEFAULT})",
            ),
        ),
        errors=(400,),
    ),
)
async def list_tokens(request: web.Request) -> web.Response:
    """Admin only. Expired and invalidated tokens are listed with ``expired: true``."""
    raw = request.query.get("limit")
    limit = LIST_DEFAULT
    if raw is not None:
        try:
            limit = int(raw)
        except ValueError:
            limit = 0
        if not 1 <= limit <= LIST_MAX:
            raise InvalidInput(
                f"limit: {raw!r} is not an integer from 1 to {LIST_MAX}", field="limit"
            )
    now = datetime.now(UTC)
    records = await request.app[PORTAL].list_tokens()
    return json_response([view(r, now) for r in records[:limit]])


@routes.post(
    "/api/v1/portal/tokens/invalidate",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Invalidate portal tokens (OpenMeter)",
        "portal",
        status=204,
        body=ref("InvalidateIn"),
        errors=(400, 404),
        description="By id (404 if unknown), by subject (all its tokens), or both.",
    ),
)
async def invalidate_tokens(request: web.Request) -> web.Response:
    """Admin only."""
    body = decode_body(await request.read(), _invalidate_in)
    if body.id is None and body.subject is None:
        raise InvalidInput("give the token's id or a subject", field="id")
    await request.app[PORTAL].invalidate(token_id=body.id, subject=body.subject)
    return web.Response(status=204)


_PORTAL_QUERY = (
    *(p for p in QUERY_PARAMS if p.name != "subject"),
    Param("subject", array(STR), "ignored: the token's subject is read"),
    Param("filterCustomerId", array(STR), "ignored: the token's subject is read"),
    Param("clientId", STR, "ignored (OpenMeter's progress tracking)"),
)


@routes.get(
    "/api/v1/portal/meters/{meterSlug}/query",
    access=Access.PORTAL,
    tenant=CALLER,  # the portal token's subject (routes._declared)
    op=Op(
        "Query a meter for the portal token's subject (OpenMeter)",
        "portal",
        responses=(("application/json", ref("QueryResult")), ("text/csv", STR)),
        path=("the meter's slug",),
        query=_PORTAL_QUERY,
        errors=(400, 401, 403, 404),
        description="Called with a portal token as the bearer: the token's subject's rows "
        "of an allowed meter, as the meter query answers them.",
    ),
)
async def query_portal_meter(request: web.Request) -> web.Response:
    """A portal token's subject's usage (its only route). Cost: a meter query of one
    subject."""
    slug = request.match_info["meterSlug"]
    check_meter(request[PORTAL_TOKEN], slug)
    meter = await request.app[METERS].get(slug)
    body = body_from_params(request)
    body.subject = []  # the token's subject: gateway.query.execute narrows to it
    return await answer_query(request, meter, body, [])
