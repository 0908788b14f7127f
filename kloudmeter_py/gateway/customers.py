"""OpenMeter's customers and subjects on the v1 wire: ``/api/v1/customers`` and
``/api/v1/subjects`` (store.customers keeps them).

Routes (all admin: they manage who owns what, and show every customer; no tenant data):

- ``POST /api/v1/customers`` (CustomerCreate -> 201 Customer; 409 naming ``key`` or
  ``usageAttribution.subjectKeys`` when a subject is another customer's)
- ``GET /api/v1/customers`` (page, pageSize, order, orderBy, key, name, primaryEmail,
  subject: case-insensitive parts; includeDeleted, expand accepted; planKey matches none:
  there are no subscriptions here) -> CustomerPaginatedResponse
- ``GET|PUT|DELETE /api/v1/customers/{customerIdOrKey}`` (by ULID id, else by key)
- ``GET|POST /api/v1/subjects``, ``GET|DELETE /api/v1/subjects/{subjectIdOrKey}``

Other modules resolve a customer to its subjects with
``request.app[CUSTOMERS].subjects_of(id_or_key, tenant=...) -> list[str] | None``
(store.customers.CustomerStore.subjects_of): the customer's key, then its subject keys;
None for an unknown customer or, with ``tenant`` (a user's), for any customer whose key
is not that tenant.
"""

from typing import Annotated, Literal

import msgspec
from aiohttp import web
from msgspec import Meta

from kloudmeter_py.core.customers import (
    ULID_PATTERN,
    Customer,
    CustomerIn,
    CustomerPage,
    Listing,
    Subject,
    SubjectUpsert,
    list_page,
)
from kloudmeter_py.errors import InvalidInput
from kloudmeter_py.gateway.helpers import decode_body, json_response
from kloudmeter_py.gateway.keys import CUSTOMERS
from kloudmeter_py.gateway.routes import ADMIN, NO_TENANT_DATA, Op, Param, Routes
from kloudmeter_py.gateway.schemas import STR, array, ref

routes = Routes()

_customer_in = msgspec.json.Decoder(CustomerIn)
_subjects_in = msgspec.json.Decoder(Annotated[list[SubjectUpsert], Meta(max_length=1000)])

ID_OR_KEY = {
    "anyOf": [
        {"type": "string", "pattern": ULID_PATTERN},
        {"type": "string", "minLength": 1, "maxLength": 256},
    ]
}
CUSTOMER_PATH = ("the customer's id (a ULID) or key",)
SUBJECT_PATH = ("the subject's key or id",)
_INT = {"type": "integer"}
MAX_PAGE = 1_000_000
_LIST_PARAMS = (
    Param("page", {**_INT, "minimum": 1, "maximum": MAX_PAGE}, "page index, from 1 (default 1)"),
    Param("pageSize", {**_INT, "minimum": 1, "maximum": 1000}, "customers a page (default 100)"),
    Param("order", {"enum": ["ASC", "DESC"]}, "order direction (default ASC)"),
    Param("orderBy", {"enum": ["id", "name", "createdAt"]}, "order by (default id)"),
    Param("includeDeleted", {"type": "boolean"}, "accepted; deleted customers are not kept"),
    Param("key", STR, "a part of the key, any case"),
    Param("name", STR, "a part of the name, any case"),
    Param("primaryEmail", STR, "a part of the primary email, any case"),
    Param("subject", STR, "a part of a subject the customer owns, any case"),
    Param("planKey", STR, "customers subscribed to this plan: none (no subscriptions here)"),
    Param("expand", array({"enum": ["subscriptions"]}), "accepted; there are no subscriptions"),
)


def _int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise InvalidInput(f"{name}: {raw!r} is not an integer from {low} to {high}", field=name)
    return value


def _choice(request: web.Request, name: str, choices: tuple[str, ...], default: str) -> str:
    raw = request.query.get(name, default)
    if raw not in choices:
        raise InvalidInput(f"{name}: {raw!r} is not one of {', '.join(choices)}", field=name)
    return raw


def listing(request: web.Request) -> Listing:
    """GET /api/v1/customers' parameters, each checked (400 naming it)."""
    q = request.query
    _choice(request, "includeDeleted", ("true", "false"), "false")
    for value in q.getall("expand", []):
        if value != "subscriptions":
            raise InvalidInput(f"expand: {value!r} is not subscriptions", field="expand")
    order: Literal["ASC", "DESC"] = (
        "DESC" if _choice(request, "order", ("ASC", "DESC"), "ASC") == "DESC" else "ASC"
    )
    by = _choice(request, "orderBy", ("id", "name", "createdAt"), "id")
    order_by: Literal["id", "name", "createdAt"] = (
        "name" if by == "name" else "createdAt" if by == "createdAt" else "id"
    )
    return Listing(
        page=_int(request, "page", 1, 1, MAX_PAGE),
        page_size=_int(request, "pageSize", 100, 1, 1000),
        order=order,
        order_by=order_by,
        key=q.get("key"),
        name=q.get("name"),
        primary_email=q.get("primaryEmail"),
        subject=q.get("subject"),
    )


@routes.post(
    "/api/v1/customers",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Create a customer (OpenMeter)",
        "customers",
        status=201,
        response=ref("Customer"),
        body=ref("CustomerIn"),
        errors=(400, 409),
        description="Its usage is its key's and its usageAttribution.subjectKeys' (one of "
        "them is needed); a subject belongs to at most one customer (409 naming the field).",
    ),
)
async def create_customer(request: web.Request) -> web.Response:
    """Admin only: customers say who owns which subjects."""
    body = decode_body(await request.read(), _customer_in)
    customer = await request.app[CUSTOMERS].create(body)
    return json_response(customer, status=201)


@routes.get(
    "/api/v1/customers",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "List customers (OpenMeter)",
        "customers",
        response=ref("CustomerPage"),
        query=_LIST_PARAMS,
        errors=(400,),
    ),
)
async def list_customers(request: web.Request) -> web.Response:
    """Admin only: every customer. Cost: one read of the customers' records."""
    page: CustomerPage = list_page(await request.app[CUSTOMERS].list_customers(), listing(request))
    if request.query.get("planKey") is not None:
        page = CustomerPage(totalCount=0, page=page.page, pageSize=page.pageSize, items=[])
    return json_response(page)


_CUSTOMER = "/api/v1/customers/{customerIdOrKey}"


@routes.get(
    _CUSTOMER,
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Get a customer by id or key (OpenMeter)",
        "customers",
        response=ref("Customer"),
        path=CUSTOMER_PATH,
        path_schemas=(ID_OR_KEY,),
        query=(Param("expand", array({"enum": ["subscriptions"]}), "accepted"),),
        errors=(400, 404),
    ),
)
async def get_customer(request: web.Request) -> web.Response:
    """Admin only."""
    for value in request.query.getall("expand", []):
        if value != "subscriptions":
            raise InvalidInput(f"expand: {value!r} is not subscriptions", field="expand")
    customer: Customer = await request.app[CUSTOMERS].get(request.match_info["customerIdOrKey"])
    return json_response(customer)


@routes.put(
    _CUSTOMER,
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Replace a customer (OpenMeter)",
        "customers",
        response=ref("Customer"),
        path=CUSTOMER_PATH,
        path_schemas=(ID_OR_KEY,),
        body=ref("CustomerIn"),
        errors=(400, 404, 409),
        description="The whole customer (id and createdAt kept): subjects it no longer names "
        "are free for other customers, new ones are claimed (409 if another's).",
    ),
)
async def update_customer(request: web.Request) -> web.Response:
    """Admin only."""
    body = decode_body(await request.read(), _customer_in)
    customer = await request.app[CUSTOMERS].replace(request.match_info["customerIdOrKey"], body)
    return json_response(customer)


@routes.delete(
    _CUSTOMER,
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Delete a customer (OpenMeter)",
        "customers",
        status=204,
        path=CUSTOMER_PATH,
        path_schemas=(ID_OR_KEY,),
        errors=(404,),
        description="Its subjects are free again; their usage stays (it is the subjects').",
    ),
)
async def delete_customer(request: web.Request) -> web.Response:
    """Admin only."""
    await request.app[CUSTOMERS].delete(request.match_info["customerIdOrKey"])
    return web.Response(status=204)


# -- subjects ------------------------------------------------------------------------------


@routes.get(
    "/api/v1/subjects",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op("List subjects (OpenMeter)", "customers", response=array(ref("Subject"))),
)
async def list_subjects(request: web.Request) -> web.Response:
    """Admin only: the subject entities, by key."""
    subjects: list[Subject] = await request.app[CUSTOMERS].list_subjects()
    return json_response(subjects)


@routes.post(
    "/api/v1/subjects",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Create or update subjects (OpenMeter)",
        "customers",
        response=array(ref("Subject")),
        body={**array(ref("SubjectUpsert")), "maxItems": 1000},
        errors=(400,),
        description="Each new subject is created; an existing one takes the fields given "
        "(null clears one) and keeps the others.",
    ),
)
async def upsert_subjects(request: web.Request) -> web.Response:
    """Admin only."""
    bodies = decode_body(await request.read(), _subjects_in)
    return json_response(await request.app[CUSTOMERS].upsert_subjects(bodies))


_SUBJECT = "/api/v1/subjects/{subjectIdOrKey}"
_SUBJECT_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 256}


@routes.get(
    _SUBJECT,
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Get a subject by key or id (OpenMeter)",
        "customers",
        response=ref("Subject"),
        path=SUBJECT_PATH,
        path_schemas=(_SUBJECT_SCHEMA,),
        errors=(404,),
    ),
)
async def get_subject(request: web.Request) -> web.Response:
    """Admin only."""
    return json_response(
        await request.app[CUSTOMERS].get_subject(request.match_info["subjectIdOrKey"])
    )


@routes.delete(
    _SUBJECT,
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Delete a subject by key or id (OpenMeter)",
        "customers",
        status=204,
        path=SUBJECT_PATH,
        path_schemas=(_SUBJECT_SCHEMA,),
        errors=(404,),
        description="The entity only: its usage and any customer's claim of it stay.",
    ),
)
async def delete_subject(request: web.Request) -> web.Response:
    """Admin only."""
    await request.app[CUSTOMERS].delete_subject(request.match_info["subjectIdOrKey"])
    return web.Response(status=204)
