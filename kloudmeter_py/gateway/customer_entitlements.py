"""A customer's entitlements (OpenMeter's customer paths, which SDK 1.0.0b236 documents and
calls): ``/api/v2/customers/{customerIdOrKey}/entitlements...``, ``/api/v2/entitlements``,
``/api/v2/grants`` and ``GET /api/v1/customers/{customerIdOrKey}/entitlements/{featureKey}/value``.

A customer's entitlement is kept as its key's (or, with no key, its id's) entitlement, with
``customerId`` set (store.entitlements): the subject paths of that key see the same one, as in
OpenMeter, where a subject key names the customer. Its usage counts every subject the
customer owns (its key and its ``usageAttribution.subjectKeys``, store.customers), read when
the value is asked (store.entitlements.value_at resolves them).

Access as the subject paths: an admin manages; a user whose tenant is the customer's key reads
its entitlements, grants, values and history; any other customer, known or not, answers 404.
"""

from datetime import UTC, datetime

import msgspec
from aiohttp import web

from kloudmeter_py.core.customers import Customer
from kloudmeter_py.errors import InvalidInput, NotFound
from kloudmeter_py.gateway.customers import CUSTOMER_PATH, ID_OR_KEY
from kloudmeter_py.gateway.entitlements import (
    HISTORY_PARAMS,
    VALUE_PARAMS,
    Entitlement,
    Grant,
    _entitlement_decoder,
    _grant_decoder,
    _reset_decoder,
    create_with_grants,
    entitlement_history,
    entitlement_value,
    entitlement_view,
    grant_view,
    new_grant,
    override_entitlement,
    reset_entitlement,
    store_of,
)
from kloudmeter_py.gateway.helpers import decode_body, json_response, read_budget
from kloudmeter_py.gateway.keys import CUSTOMERS
from kloudmeter_py.gateway.routes import ADMIN, CALLER, USER, Op, Param, Routes, tenant_of
from kloudmeter_py.gateway.schemas import STR, array, ref
from kloudmeter_py.store.entitlements import EntitlementRecord

routes = Routes()
_INT = {"type": "integer"}
MAX_PAGE = 1_000_000
PAGE_PARAMS = (
    Param("page", {**_INT, "minimum": 1, "maximum": MAX_PAGE}, "page index, from 1 (default 1)"),
    Param("pageSize", {**_INT, "minimum": 1, "maximum": 1000}, "items a page (default 100)"),
)


class EntitlementPage(msgspec.Struct):
    """OpenMeter's EntitlementV2PaginatedResponse."""

    totalCount: int
    page: int
    pageSize: int
    items: list[Entitlement]


class GrantPage(msgspec.Struct):
    """OpenMeter's GrantV2PaginatedResponse."""

    totalCount: int
    page: int
    pageSize: int
    items: list[Grant]


def _int(request: web.Request, name: str, default: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= high:
        raise InvalidInput(f"{name}: {raw!r} is not an integer from 1 to {high}", field=name)
    return value


def _page(request: web.Request) -> tuple[int, int]:
    return _int(request, "page", 1, MAX_PAGE), _int(request, "pageSize", 100, 1000)


def owner_of(customer: Customer) -> str:
    """Whose entitlements are the customer's: its key's, else its id's."""
    return customer.key or customer.id


async def _customer(request: web.Request) -> Customer:
    return await request.app[CUSTOMERS].get(
        request.match_info["customerIdOrKey"], tenant=tenant_of(request)
    )


def _view(ent: EntitlementRecord, customer: Customer, now: datetime | None = None) -> Entitlement:
    view = entitlement_view(ent, now)
    view.customerId = customer.id
    view.customerKey = customer.key
    return view


async def _entitlement(request: web.Request, customer: Customer) -> EntitlementRecord:
    return await store_of(request).entitlement(
        owner_of(customer), request.match_info["entitlementIdOrFeatureKey"]
    )


CUSTOMER = CUSTOMER_PATH[0]
ENT_OR_FEATURE = "the entitlement's id, or its feature's key"
BASE = "/api/v2/customers/{customerIdOrKey}/entitlements"
ONE = BASE + "/{entitlementIdOrFeatureKey}"
PATH_SCHEMAS = (ID_OR_KEY,)


@routes.post(
    BASE,
    access=ADMIN,
    tenant=CALLER,
    op=Op(
        "Create a customer's entitlement (OpenMeter v2)",
        "entitlements",
        status=201,
        response=ref("Entitlement"),
        path=(CUSTOMER,),
        path_schemas=PATH_SCHEMAS,
        body=ref("EntitlementIn"),
        errors=(400, 404, 409),
        description="Its usage counts every subject the customer owns.",
    ),
)
async def create_customer_entitlement(request: web.Request) -> web.Response:
    customer = await _customer(request)
    body = decode_body(await request.read(), _entitlement_decoder)
    created = await create_with_grants(request, body, owner_of(customer), customer.id)
    return json_response(_view(created, customer), status=201)


@routes.get(
    BASE,
    access=USER,
    tenant=CALLER,
    op=Op(
        "List a customer's entitlements (OpenMeter v2)",
        "entitlements",
        response=ref("EntitlementPage"),
        path=(CUSTOMER,),
        path_schemas=PATH_SCHEMAS,
        query=PAGE_PARAMS,
        errors=(400, 404),
    ),
)
async def list_customer_entitlements(request: web.Request) -> web.Response:
    customer = await _customer(request)
    page, size = _page(request)
    found = await store_of(request).entitlements([owner_of(customer)], budget=read_budget(request))
    now = datetime.now(UTC)
    items = [_view(e, customer, now) for e in found[(page - 1) * size : page * size]]
    return json_response(EntitlementPage(len(found), page, size, items))


@routes.get(
    ONE,
    access=USER,
    tenant=CALLER,
    op=Op(
        "Get a customer's entitlement (OpenMeter v2)",
        "entitlements",
        response=ref("Entitlement"),
        path=(CUSTOMER, ENT_OR_FEATURE),
        path_schemas=PATH_SCHEMAS,
        errors=(404,),
    ),
)
async def get_customer_entitlement(request: web.Request) -> web.Response:
    customer = await _customer(request)
    return json_response(_view(await _entitlement(request, customer), customer))


@routes.delete(
    ONE,
    access=ADMIN,
    tenant=CALLER,
    op=Op(
        "Delete a customer's entitlement (OpenMeter v2)",
        "entitlements",
        status=204,
        path=(CUSTOMER, ENT_OR_FEATURE),
        path_schemas=PATH_SCHEMAS,
        errors=(404,),
    ),
)
async def delete_customer_entitlement(request: web.Request) -> web.Response:
    customer = await _customer(request)
    await store_of(request).delete_entitlement(await _entitlement(request, customer))
    return web.Response(status=204)


@routes.put(
    ONE + "/override",
    access=ADMIN,
    tenant=CALLER,
    op=Op(
        "Override a customer's entitlement (OpenMeter v2)",
        "entitlements",
        status=201,
        response=ref("Entitlement"),
        path=(CUSTOMER, ENT_OR_FEATURE),
        path_schemas=PATH_SCHEMAS,
        body=ref("EntitlementIn"),
        errors=(400, 404, 409),
        description="The entitlement is replaced by a new one (its grants and resets go).",
    ),
)
async def override_customer_entitlement(request: web.Request) -> web.Response:
    customer = await _customer(request)
    existing = await _entitlement(request, customer)
    body = decode_body(await request.read(), _entitlement_decoder)
    created = await override_entitlement(request, owner_of(customer), existing, body, customer.id)
    return json_response(_view(created, customer), status=201)


@routes.get(
    ONE + "/grants",
    access=USER,
    tenant=CALLER,
    op=Op(
        "List a customer's entitlement's grants (OpenMeter v2)",
        "entitlements",
        response=ref("GrantPage"),
        path=(CUSTOMER, ENT_OR_FEATURE),
        path_schemas=PATH_SCHEMAS,
        query=(*PAGE_PARAMS, Param("includeDeleted", {"type": "boolean"}, "voided too")),
        errors=(400, 404),
    ),
)
async def list_customer_grants(request: web.Request) -> web.Response:
    customer = await _customer(request)
    ent = await _entitlement(request, customer)
    page, size = _page(request)
    voided = request.query.get("includeDeleted", "false").lower() == "true"
    found = [
        g
        for g in await store_of(request).grants(ent.id, budget=read_budget(request))
        if voided or g.voidedAt is None
    ]
    now = datetime.now(UTC)
    items = [grant_view(g, now) for g in found[(page - 1) * size : page * size]]
    return json_response(GrantPage(len(found), page, size, items))


@routes.post(
    ONE + "/grants",
    access=ADMIN,
    tenant=CALLER,
    op=Op(
        "Grant usage to a customer's entitlement (OpenMeter v2)",
        "entitlements",
        status=201,
        response=ref("Grant"),
        path=(CUSTOMER, ENT_OR_FEATURE),
        path_schemas=PATH_SCHEMAS,
        body=ref("GrantIn"),
        errors=(400, 404),
    ),
)
async def create_customer_grant(request: web.Request) -> web.Response:
    customer = await _customer(request)
    ent = await _entitlement(request, customer)
    body = decode_body(await request.read(), _grant_decoder)
    grant = await store_of(request).create_grant(await new_grant(request, ent, body))
    return json_response(grant_view(grant), status=201)


@routes.get(
    ONE + "/value",
    access=USER,
    tenant=CALLER,
    op=Op(
        "A customer's entitlement's value (OpenMeter v2)",
        "entitlements",
        response=ref("EntitlementValue"),
        path=(CUSTOMER, ENT_OR_FEATURE),
        path_schemas=PATH_SCHEMAS,
        query=VALUE_PARAMS,
        errors=(400, 404),
        description="Usage of every subject the customer owns.",
    ),
)
@routes.get(
    "/api/v1/customers/{customerIdOrKey}/entitlements/{entitlementIdOrFeatureKey}/value",
    access=USER,
    tenant=CALLER,
    op=Op(
        "A customer's entitlement's value (OpenMeter v1)",
        "entitlements",
        response=ref("EntitlementValue"),
        path=(CUSTOMER, "the feature's key"),
        path_schemas=PATH_SCHEMAS,
        query=VALUE_PARAMS,
        errors=(400, 404),
        description="Usage of every subject the customer owns.",
    ),
)
async def get_customer_value(request: web.Request) -> web.Response:
    customer = await _customer(request)
    ent = await _entitlement(request, customer)
    return json_response(await entitlement_value(request, ent))


@routes.get(
    ONE + "/history",
    access=USER,
    tenant=CALLER,
    op=Op(
        "A customer's entitlement's usage and balance by window (OpenMeter v2)",
        "entitlements",
        response=ref("BalanceHistory"),
        path=(CUSTOMER, ENT_OR_FEATURE),
        path_schemas=PATH_SCHEMAS,
        query=HISTORY_PARAMS,
        errors=(400, 404),
    ),
)
async def get_customer_history(request: web.Request) -> web.Response:
    customer = await _customer(request)
    ent = await _entitlement(request, customer)
    return json_response(await entitlement_history(request, ent))


@routes.post(
    ONE + "/reset",
    access=ADMIN,
    tenant=CALLER,
    op=Op(
        "Reset a customer's entitlement's usage (OpenMeter v2)",
        "entitlements",
        status=204,
        path=(CUSTOMER, ENT_OR_FEATURE),
        path_schemas=PATH_SCHEMAS,
        body=ref("ResetIn"),
        body_required=False,
        errors=(400, 404),
    ),
)
async def reset_customer_entitlement(request: web.Request) -> web.Response:
    customer = await _customer(request)
    ent = await _entitlement(request, customer)
    body = decode_body(await request.read() or b"{}", _reset_decoder)
    await reset_entitlement(request, ent, body)
    return web.Response(status=204)


async def _customers_of(
    request: web.Request, found: list[EntitlementRecord]
) -> list[tuple[EntitlementRecord, Customer]]:
    """Each entitlement that is a customer's, with that customer (a user: its own only)."""
    store = request.app[CUSTOMERS]
    tenant = tenant_of(request)
    out = []
    cache: dict[str, Customer | None] = {}
    for e in found:
        name = e.customerId or e.subjectKey
        if name not in cache:
            cache[name] = await store.find(name)
        customer = cache[name]
        if customer is None or owner_of(customer) != e.subjectKey:
            continue
        if tenant is not None and customer.key != tenant:
            continue
        out.append((e, customer))
    return out


@routes.get(
    "/api/v2/entitlements",
    access=USER,
    tenant=CALLER,
    op=Op(
        "List customers' entitlements (OpenMeter v2)",
        "entitlements",
        response=ref("EntitlementPage"),
        query=(
            *PAGE_PARAMS,
            Param("feature", array(STR), "only these features (keys or ids)"),
            Param("customerKeys", array(STR), "only these customers' (keys)"),
            Param("customerIds", array(STR), "only these customers' (ids)"),
            Param(
                "entitlementType",
                array({"enum": ["metered", "boolean", "static"]}),
                "only these types",
            ),
        ),
        errors=(400,),
        description="Every customer's for an admin; a user token: its own customer's.",
    ),
)
async def list_v2_entitlements(request: web.Request) -> web.Response:
    page, size = _page(request)
    features = set(request.query.getall("feature", []))
    keys = set(request.query.getall("customerKeys", []))
    ids = set(request.query.getall("customerIds", []))
    types = set(request.query.getall("entitlementType", []))
    found = await store_of(request).entitlements(budget=read_budget(request))
    kept = [
        (e, c)
        for e, c in await _customers_of(request, found)
        if (not features or features & {e.featureKey, e.featureId})
        and (not keys or c.key in keys)
        and (not ids or c.id in ids)
        and (not types or e.type in types)
    ]
    now = datetime.now(UTC)
    items = [_view(e, c, now) for e, c in kept[(page - 1) * size : page * size]]
    return json_response(EntitlementPage(len(kept), page, size, items))


@routes.get(
    "/api/v2/entitlements/{entitlementId}",
    access=USER,
    tenant=CALLER,
    op=Op(
        "Get a customer's entitlement by id (OpenMeter v2)",
        "entitlements",
        response=ref("Entitlement"),
        path=("the entitlement's id",),
        errors=(404,),
    ),
)
async def get_v2_entitlement(request: web.Request) -> web.Response:
    ent = await store_of(request).entitlement(None, request.match_info["entitlementId"])
    pairs = await _customers_of(request, [ent])
    if not pairs:
        raise NotFound(f"entitlement {ent.id!r} not found", field="entitlementId")
    return json_response(_view(*pairs[0]))


@routes.get(
    "/api/v2/grants",
    access=ADMIN,
    tenant=CALLER,
    op=Op(
        "List customers' grants (OpenMeter v2)",
        "entitlements",
        response=ref("GrantPage"),
        query=(
            *PAGE_PARAMS,
            Param("feature", array(STR), "only grants of these features (keys or ids)"),
            Param("customer", array(STR), "only these customers' (ids or keys)"),
            Param("includeDeleted", {"type": "boolean"}, "voided grants too"),
        ),
        errors=(400,),
    ),
)
async def list_v2_grants(request: web.Request) -> web.Response:
    page, size = _page(request)
    features = set(request.query.getall("feature", []))
    wanted = set(request.query.getall("customer", []))
    voided = request.query.get("includeDeleted", "false").lower() == "true"
    store = store_of(request)
    budget = read_budget(request)
    pairs = await _customers_of(request, await store.entitlements(budget=budget))
    ents = {
        e.id
        for e, c in pairs
        if (not features or features & {e.featureKey, e.featureId})
        and (not wanted or wanted & {c.id, c.key})
    }
    found = [
        g
        for g in await store.grants(budget=budget)
        if g.entitlementId in ents and (voided or g.voidedAt is None)
    ]
    now = datetime.now(UTC)
    items = [grant_view(g, now) for g in found[(page - 1) * size : page * size]]
    return json_response(GrantPage(len(found), page, size, items))
