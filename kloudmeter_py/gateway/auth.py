"""Bearer tokens, roles and tenants at the gateway's edge, and the users API.

Admins may do everything. Users may record usage and read data of their own tenant only:
the tenant is the event subject, so the gateway stamps it on events they send and narrows
every read to it. A reading of another tenant answers 404, exactly as a missing one.
"""

from typing import Any

import msgspec
from aiohttp import web

from kloudmeter_py.core.models import encoder
from kloudmeter_py.errors import Forbidden, Unauthorized
from kloudmeter_py.gateway.helpers import Handler, decode_body
from kloudmeter_py.gateway.keys import AUTH, PRINCIPAL, SETTINGS
from kloudmeter_py.store.auth import Principal

# The dashboard's page and its files hold no data; the data calls it makes need a token.
_ANYONE = {("GET", "/healthy"), ("GET", "/"), ("GET", "/static/{name}")}
# What a `user` token may call; everything else needs `admin`.
_USER = {
    ("POST", "/api/register-event"),
    ("POST", "/api/v1/events"),
    ("GET", "/api/meters"),
    ("GET", "/api/meter"),
    ("GET", "/api/meter/"),
    ("GET", "/api/readings"),
    ("GET", "/api/reading"),
    ("GET", "/api/reading/"),
    ("GET", "/api/meters/{meter}/query"),
    ("POST", "/api/meters/{meter}/query"),
    ("GET", "/api/v1/meters"),
    ("GET", "/api/v1/meters/{meter}"),
    ("GET", "/api/v1/meters/{meter}/query"),
    ("POST", "/api/v1/meters/{meter}/query"),
    ("GET", "/api/v1/meters/{meter}/subjects"),
    ("GET", "/api/usage"),
    ("GET", "/api/perf"),
    ("GET", "/api/perf/{host}"),
    ("GET", "/api/perf/{host}/{label}"),
    ("POST", "/api/perf/{host}/{epoch}"),
    ("GET", "/v1/resources"),
    ("GET", "/v1/records/{resource_id}"),
    ("POST", "/charging"),
    ("GET", "/api/stream/readings"),
}


def principal(request: web.Request) -> Principal | None:
    """The caller, or None when tokens are off (then anyone acts as admin)."""
    return request.get(PRINCIPAL)


def tenant_scope(request: web.Request) -> str | None:
    """The one tenant this caller may see, or None for any."""
    p = principal(request)
    return None if p is None or p.is_admin else p.tenant


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.app[SETTINGS].auth_enabled:
        return await handler(request)
    route = request.match_info.route.resource
    canonical = route.canonical if route is not None else request.path
    method = "GET" if request.method == "HEAD" else request.method
    if (method, canonical) in _ANYONE or route is None:
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("a bearer token is required (Authorization: Bearer <token>)")
    found = await request.app[AUTH].authenticate(token.strip())
    if found is None:
        raise Unauthorized("the token is not valid")
    if not found.is_admin and (method, canonical) not in _USER:
        raise Forbidden("this needs an admin token")
    request[PRINCIPAL] = found
    return await handler(request)


class UserIn(msgspec.Struct, forbid_unknown_fields=True):
    tenant: str
    role: str = "user"
    name: str = ""


_user_in = msgspec.json.Decoder(UserIn)


def _view(user: Any) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(user)
    out.pop("tokenHash", None)
    return out


async def create_user(request: web.Request) -> web.Response:
    body = decode_body(await request.read(), _user_in)
    user, token = await request.app[AUTH].create_user(body.name, body.tenant, body.role)
    # The token is shown here, once; only its hash is stored.
    return web.Response(
        body=encoder.encode({**_view(user), "token": token}),
        status=201,
        content_type="application/json",
    )


async def list_users(request: web.Request) -> web.Response:
    users = [_view(u) for u in await request.app[AUTH].list_users()]
    return web.Response(body=encoder.encode(users), content_type="application/json")


async def delete_user(request: web.Request) -> web.Response:
    await request.app[AUTH].delete_user(request.match_info["id"])
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/users", create_user)
    app.router.add_get("/api/users", list_users)
    app.router.add_delete("/api/users/{id}", delete_user)
