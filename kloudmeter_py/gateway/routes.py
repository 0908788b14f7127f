"""A route is declared once, next to its handler: who may call it, how it is narrowed to the
caller's tenant, and its OpenAPI operation.

Each route module keeps a :class:`Routes` (an aiohttp ``RouteTableDef`` inside) and declares
its handlers with it::

    @routes.get("/api/perf", access=USER, tenant=TenantScope(param="tenant"), op=Op(...))
    async def list_hosts(request: web.Request) -> web.Response:
        tenant = tenant_of(request)

Access and tenant scope have no defaults. The auth middleware reads the access of the route it
is serving from the declaration (:func:`spec_of`); the permission table (:func:`permissions`)
and the OpenAPI document (``openapi.py``) are derived from the declarations of the app's routes;
and the one tenant a request acts for is decided here, before the handler runs, from the
caller and the declared scope (:func:`resolve_tenant`). Handlers read it with
:func:`tenant_of` and compare tenants named in a body with :func:`own_tenant`.

A tenant may name a customer (OpenMeter's, by its key: store.customers): the tenant then
stands for every subject the customer owns - its key, which is one of them, and its subject
keys. Routes that read or write by subject ask :func:`tenant_subjects` (and
:func:`own_subject` for a subject named in a body) and act for all of them; the others act
for the tenant alone, that is for the customer's key, which the customer owns too, so no
route shows a customer's user a subject it does not own. A tenant that is no customer's key
is one subject, as before.
"""

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from aiohttp import web

from kloudmeter_py.errors import Forbidden
from kloudmeter_py.gateway.keys import CUSTOMERS, PORTAL_TOKEN, PRINCIPAL
from kloudmeter_py.store.auth import check_tenant

Schema = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
H = TypeVar("H", bound=Handler)


class Access(enum.Enum):
    """Who may call a route when API tokens are on (when they are off, anyone may)."""

    OPEN = "open"  # no token needed: the dashboard's files, health
    USER = "user"  # any valid token; a user acts for its own tenant only
    ADMIN = "admin"  # an admin token
    # A portal token only (always, tokens on or off): the route acts for its subject alone.
    PORTAL = "portal"


OPEN: Final = Access.OPEN
USER: Final = Access.USER
ADMIN: Final = Access.ADMIN
PORTAL: Final = Access.PORTAL


@dataclass(frozen=True)
class TenantScope:
    """How a route is narrowed to the caller's tenant.

    ``data=False``: the route shows and writes no tenant's data (meter definitions, health,
    admin-only operations); :func:`tenant_of` refuses to answer for it.

    Otherwise the route acts for one tenant, or for all (``None``): a user always for its own;
    an admin (or anyone when tokens are off) for the tenant named by the query parameter
    ``param`` if the route has one and it is given, else for ``admin_default`` (``None``: all
    tenants). A user naming another tenant in ``param`` is refused with 403.
    """

    data: bool = True
    param: str | None = None
    admin_default: str | None = None


NO_TENANT_DATA: Final = TenantScope(data=False)
CALLER: Final = TenantScope()  # the caller's tenant (a user's own; all for an admin)


@dataclass(frozen=True)
class Param:
    """A query or header parameter."""

    name: str
    schema: Schema = field(default_factory=lambda: {"type": "string"})
    description: str = ""
    required: bool = False
    where: str = "query"
    style: str | None = None  # "deepObject" for filterGroupBy[key]=value


@dataclass(frozen=True)
class Op:
    """The OpenAPI operation of a route: what it takes, what it answers."""

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
    bodies: tuple[tuple[str, Schema], ...] = ()  # (media, schema) when they differ by media
    body_required: bool = True
    errors: tuple[int, ...] = ()  # besides 413 with a body, 503 with NATS, 401/403 with tokens
    nats: bool = True
    description: str = ""
    alt_media: tuple[str, ...] = ()  # other media types of the success response
    responses: tuple[tuple[str, Schema], ...] = ()  # (media, schema) when they differ by media


@dataclass(frozen=True)
class RouteSpec:
    """Everything the gateway knows of one route, besides its handler."""

    access: Access
    tenant: TenantScope
    op: Op
    ingests: bool = False  # stores events: counted in kloudmeter_http_events_ingested_total


_TENANT = web.RequestKey("tenant", str)
_SUBJECTS = web.RequestKey("tenant_subjects", list[str])
_ALL_TENANTS = ""  # request[_TENANT] when the route acts for every tenant (never a tenant name)
_SPEC_ATTR = "__kloudmeter_route__"


def spec_of(handler: object) -> RouteSpec | None:
    """The declaration of a registered handler, or None for one declared otherwise."""
    spec = getattr(handler, _SPEC_ATTR, None)
    return spec if isinstance(spec, RouteSpec) else None


def caller_tenant(request: web.Request) -> str | None:
    """The tenant a user token is bound to; None for an admin, or when tokens are off."""
    p = request.get(PRINCIPAL)
    return None if p is None or p.is_admin else p.tenant


def resolve_tenant(request: web.Request, scope: TenantScope) -> str | None:
    """The one tenant the request acts for under ``scope`` (None: every tenant)."""
    own = caller_tenant(request)
    asked = request.query.get(scope.param) if scope.param else None
    if asked is not None:
        check_tenant(asked)
        if own is not None and asked != own:
            raise Forbidden(f"this token may only act for tenant {own!r}", field=scope.param)
        return asked
    if own is not None:
        return own
    return scope.admin_default


def tenant_of(request: web.Request) -> str | None:
    """The tenant this request acts for, as its route's declaration decided (None: all)."""
    try:
        tenant = request[_TENANT]
    except KeyError:
        raise RuntimeError(
            f"{request.method} {request.path}: the route declares no tenant data "
            "(tenant=NO_TENANT_DATA) but its handler asked for the tenant"
        ) from None
    return None if tenant == _ALL_TENANTS else tenant


def own_tenant(request: web.Request, named: str | None, field: str) -> str | None:
    """A tenant named in a request body, checked against the request's tenant: a user may
    name only its own (403 otherwise); the result is the tenant to act for."""
    tenant = tenant_of(request)
    if tenant is None:
        return named
    if named is not None and named != tenant:
        raise Forbidden(f"this token may only act for tenant {tenant!r}", field=field)
    return tenant


async def tenant_subjects(request: web.Request) -> list[str] | None:
    """The subjects this request acts for (None: every subject): the tenant's, which are
    the subjects of the customer whose key is the tenant, or the tenant alone. Read once
    a request, from the customers bucket (no cache across requests: a customer's subjects
    change)."""
    tenant = tenant_of(request)
    if tenant is None:
        return None
    subjects = request.get(_SUBJECTS)
    if subjects is None:
        subjects = await request.app[CUSTOMERS].tenant_subjects(tenant)
        request[_SUBJECTS] = subjects
    return subjects


async def own_subject(request: web.Request, named: str | None, field: str) -> str | None:
    """A subject named in a request body, checked against the request's tenant: a user may
    name only one of its tenant's subjects (403 otherwise); none named: the tenant itself
    (a customer's key is one of its subjects). The result is the subject to act for."""
    subjects = await tenant_subjects(request)
    if subjects is None:
        return named
    if named is None:
        return tenant_of(request)
    if named not in subjects:
        raise Forbidden(
            f"this token may only act for tenant {tenant_of(request)!r} and its subjects",
            field=field,
        )
    return named


def _declared(handler: Handler, spec: RouteSpec) -> Handler:
    async def route(request: web.Request) -> web.StreamResponse:
        if spec.access is PORTAL:
            # The portal token's subject, exactly: never widened to a customer's subjects.
            subject = request[PORTAL_TOKEN].subject
            request[_TENANT] = subject
            request[_SUBJECTS] = [subject]
        elif spec.tenant.data:
            tenant = resolve_tenant(request, spec.tenant)
            request[_TENANT] = _ALL_TENANTS if tenant is None else tenant
        return await handler(request)

    route.__name__ = handler.__name__
    route.__qualname__ = handler.__qualname__
    route.__doc__ = handler.__doc__
    setattr(route, _SPEC_ATTR, spec)
    return route


class Routes:
    """A module's routes: an aiohttp ``RouteTableDef`` whose entries carry a :class:`RouteSpec`."""

    def __init__(self) -> None:
        self.table = web.RouteTableDef()

    def route(
        self,
        method: str,
        *paths: str,
        access: Access,
        tenant: TenantScope,
        op: Op,
        ingests: bool = False,
        **kwargs: Any,
    ) -> Callable[[H], H]:
        """Declare ``handler`` under each of ``paths`` (aliases share the declaration)."""
        spec = RouteSpec(access=access, tenant=tenant, op=op, ingests=ingests)
        if not paths:
            raise ValueError("a route needs a path")

        def register(handler: H) -> H:
            declared = _declared(handler, spec)
            for path in paths:
                self.table.route(method, path, **kwargs)(declared)
            return handler

        return register

    def get(
        self, *paths: str, access: Access, tenant: TenantScope, op: Op, **kw: Any
    ) -> Callable[[H], H]:
        return self.route("GET", *paths, access=access, tenant=tenant, op=op, **kw)

    def post(
        self, *paths: str, access: Access, tenant: TenantScope, op: Op, **kw: Any
    ) -> Callable[[H], H]:
        return self.route("POST", *paths, access=access, tenant=tenant, op=op, **kw)

    def put(
        self, *paths: str, access: Access, tenant: TenantScope, op: Op, **kw: Any
    ) -> Callable[[H], H]:
        return self.route("PUT", *paths, access=access, tenant=tenant, op=op, **kw)

    def delete(
        self, *paths: str, access: Access, tenant: TenantScope, op: Op, **kw: Any
    ) -> Callable[[H], H]:
        return self.route("DELETE", *paths, access=access, tenant=tenant, op=op, **kw)


def declared_routes(app: web.Application) -> list[tuple[str, str, RouteSpec | None]]:
    """Every (method, canonical path, declaration) of the app, HEAD left out."""
    out = []
    for route in app.router.routes():
        resource = route.resource
        if resource is None or route.method == "HEAD":
            continue
        out.append((route.method, resource.canonical, spec_of(route.handler)))
    return out


def check_declared(app: web.Application) -> None:
    """Refuse an app with a route that has no declaration (it would have no access rule)."""
    missing = [f"{m} {p}" for m, p, spec in declared_routes(app) if spec is None]
    if missing:
        raise RuntimeError(f"routes without a declaration (access, tenant, op): {missing}")


def ingest_routes(app: web.Application) -> frozenset[tuple[str, str]]:
    """The routes declared with ``ingests=True``: (method, canonical path)."""
    return frozenset((m, p) for m, p, spec in declared_routes(app) if spec and spec.ingests)


def permissions(app: web.Application) -> dict[tuple[str, str], Access]:
    """The permission table, derived from the declarations: (method, path) -> access."""
    return {(m, p): spec.access for m, p, spec in declared_routes(app) if spec is not None}
