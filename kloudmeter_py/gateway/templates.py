"""Rating templates (eBill's /template): CRUD, and a dry run with POST /template/{id}/rate."""

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web
from msgspec import Meta

from kloudmeter_py.errors import InvalidInput, NotFound
from kloudmeter_py.gateway.helpers import decode_body, json_response
from kloudmeter_py.gateway.keys import JS, LAYOUT
from kloudmeter_py.gateway.routes import ADMIN, NO_TENANT_DATA, Op, Routes
from kloudmeter_py.gateway.schemas import OBJ, array, ref
from kloudmeter_py.rating.sandbox import TemplateError, check_template, run_template
from kloudmeter_py.store.kv import get_with_revision, scan

routes = Routes()


class TemplateIn(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=128)]
    source: Annotated[str, Meta(min_length=1, max_length=64 * 1024)]
    description: str = ""


class Template(TemplateIn, kw_only=True):
    id: str
    created: datetime


class TemplateSummary(msgspec.Struct):
    """A template in the list, without its source."""

    id: str
    name: str
    description: str
    created: datetime


class Rated(msgspec.Struct):
    cost: Decimal


class TemplateFailure(msgspec.Struct):
    """422: the template failed on this input (kind: what went wrong)."""

    status: Literal["error"]
    kind: str
    message: str


_template_in = msgspec.json.Decoder(TemplateIn)
_template = msgspec.json.Decoder(Template)
_object = msgspec.json.Decoder(dict[str, Any])


async def _get(request: web.Request, template_id: str) -> Template:
    if not (template_id.isascii() and template_id.isalnum()):  # a KV key token
        raise NotFound("template not found", field="id")
    kv = await request.app[JS].key_value(request.app[LAYOUT].templates_bucket)
    value, _ = await get_with_revision(kv, template_id)
    if value is None:
        raise NotFound("template not found", field="id")
    return _template.decode(value)


async def load_source(request: web.Request, template_id: str) -> str:
    """The source of a stored template (for charging)."""
    try:
        return (await _get(request, template_id)).source
    except NotFound:
        raise InvalidInput(f"template {template_id!r} not found", field="template") from None


@routes.post(
    "/template",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Create a rating template (checked: it must compile)",
        "rating",
        status=201,
        response=ref("Template"),
        body=ref("TemplateIn"),
        errors=(400,),
    ),
)
async def create(request: web.Request) -> web.Response:
    body = decode_body(await request.read(), _template_in)
    try:
        await check_template(body.source)
    except TemplateError as exc:
        raise InvalidInput(
            f"the template does not compile: {exc.message}", field="source"
        ) from None
    template = Template(
        name=body.name,
        source=body.source,
        description=body.description,
        id=uuid.uuid4().hex[:12],
        created=datetime.now(UTC),
    )
    kv = await request.app[JS].key_value(request.app[LAYOUT].templates_bucket)
    await kv.create(template.id, msgspec.json.encode(template))
    return json_response(template, status=201)


@routes.get(
    "/template",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "List rating templates",
        "rating",
        response=array(ref("TemplateSummary")),
    ),
)
async def list_templates(request: web.Request) -> web.Response:
    out = []
    for _, value in await scan(request.app[JS], request.app[LAYOUT].templates_bucket):
        t = _template.decode(value)
        out.append(
            TemplateSummary(id=t.id, name=t.name, description=t.description, created=t.created)
        )
    return json_response(out)


@routes.get(
    "/template/{id}",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Get a rating template",
        "rating",
        response=ref("Template"),
        path=("the template id",),
        errors=(404,),
    ),
    allow_head=True,
)
async def get(request: web.Request) -> web.Response:
    template = await _get(request, request.match_info["id"])
    if request.method == "HEAD":
        return web.Response(status=200)
    return json_response(template)


@routes.delete(
    "/template/{id}",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Delete a rating template",
        "rating",
        status=204,
        path=("the template id",),
        errors=(404,),
    ),
)
async def delete(request: web.Request) -> web.Response:
    template = await _get(request, request.match_info["id"])
    kv = await request.app[JS].key_value(request.app[LAYOUT].templates_bucket)
    await kv.delete(template.id)
    return web.Response(status=204)


@routes.post(
    "/template/{id}/rate",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Dry-run a rating template on a JSON object",
        "rating",
        response=ref("Rated"),
        path=("the template id",),
        body=OBJ,
        errors=(400, 404, 422),
        description="422 with {status, kind, message} when the template fails on this input.",
    ),
)
async def rate(request: web.Request) -> web.Response:
    template = await _get(request, request.match_info["id"])
    data = decode_body(await request.read(), _object)
    try:
        cost = await run_template(template.source, data)
    except TemplateError as exc:
        return json_response(
            TemplateFailure(status="error", kind=exc.kind, message=exc.message), status=422
        )
    return json_response(Rated(cost=cost))
