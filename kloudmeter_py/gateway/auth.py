"""Bearer tokens, roles and tenants at the gateway's edge, and the users API.

Admins may do everything. Users may record usage and read data of their own tenant only:
the tenant is the event subject, so the gateway stamps it on events they send and narrows
every read to it. A reading of another tenant answers 404, exactly as a missing one.
"""

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web
from msgspec import Meta

from kloudmeter_py.errors import Forbidden, Unauthorized
from kloudmeter_py.gateway.helpers import Handler, decode_body, json_response
from kloudmeter_py.gateway.keys import AUTH, PORTAL, PORTAL_TOKEN, PRINCIPAL, SETTINGS
from kloudmeter_py.gateway.routes import (
    ADMIN,
    NO_TENANT_DATA,
    OPEN,
    USER,
    Access,
    Op,
    Routes,
    spec_of,
)
from kloudmeter_py.gateway.schemas import TENANT_PATTERN, array, ref
from kloudmeter_py.store.auth import User

routes = Routes()


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Who may call what, from the route's declaration (``routes.py``): open routes need no
    token, user routes any valid one, admin routes an admin's, portal routes a portal
    token (always, since the token names the subject they read; a user's or an admin's
    token there: 403). A portal token is no API token: elsewhere it answers 401."""
    spec = spec_of(request.match_info.handler)
    if spec is not None and spec.access is Access.PORTAL:
        return await _portal(request, handler)
    if not request.app[SETTINGS].auth_enabled:
        return await handler(request)
    if request.match_info.route.resource is None or (spec is not None and spec.access is OPEN):
        return await handler(request)  # no route (404, 405), or an open one
    found = await request.app[AUTH].authenticate(_bearer(request))
    if found is None:
        raise Unauthorized("the token is not valid")
    # A route without a declaration is refused when the app is made; admin-only if it slips.
    access = spec.access if spec is not None else ADMIN
    if not found.is_admin and access is not USER:
        raise Forbidden("this needs an admin token")
    request[PRINCIPAL] = found
    return await handler(request)


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("a bearer token is required (Authorization: Bearer <token>)")
    return token.strip()


async def _portal(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A portal route: a usable portal token (401: none, unknown, expired or invalidated;
    403: an API token, which is not for this route)."""
    token = _bearer(request)
    found = await request.app[PORTAL].authenticate(token)
    if found is None:
        if await request.app[AUTH].authenticate(token) is not None:
            raise Forbidden("this needs a portal token")
        raise Unauthorized("the portal token is not valid (unknown, expired or invalidated)")
    request[PORTAL_TOKEN] = found
    return await handler(request)


class UserIn(msgspec.Struct, forbid_unknown_fields=True):
    tenant: Annotated[str, Meta(pattern=TENANT_PATTERN)]
    role: Literal["admin", "user"] = "user"
    name: str = ""


_user_in = msgspec.json.Decoder(UserIn)


class UserView(msgspec.Struct, kw_only=True):
    """A user as the API shows it: never its token or the token's hash."""

    id: str
    name: str
    tenant: str
    role: Literal["admin", "user"]
    createdAt: datetime


class UserCreated(UserView, kw_only=True):
    """The new user and its token, shown this once."""

    token: str


def _view(user: User) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.structs.asdict(user)
    out.pop("tokenHash")
    return out


@routes.post(
    "/api/users",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Create a user and its token",
        "users",
        status=201,
        response=ref("UserCreated"),
        body=ref("UserIn"),
        errors=(400,),
    ),
)
async def create_user(request: web.Request) -> web.Response:
    body = decode_body(await request.read(), _user_in)
    user, token = await request.app[AUTH].create_user(body.name, body.tenant, body.role)
    # The token is shown here, once; only its hash is stored.
    return json_response(msgspec.convert({**_view(user), "token": token}, UserCreated), 201)


@routes.get(
    "/api/users",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op("List users", "users", response=array(ref("UserView"))),
)
async def list_users(request: web.Request) -> web.Response:
    users = [msgspec.convert(_view(u), UserView) for u in await request.app[AUTH].list_users()]
    return json_response(users)


@routes.delete(
    "/api/users/{id}",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Delete a user (revokes its token)",
        "users",
        status=204,
        path=("the user id",),
        errors=(404,),
    ),
)
async def delete_user(request: web.Request) -> web.Response:
    await request.app[AUTH].delete_user(request.match_info["id"])
    return web.Response(status=204)
