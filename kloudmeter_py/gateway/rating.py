"""Rating and billing: Koala's price book, resources and records; eBill's charging and cost
estimate. Money is Decimal and travels as strings in JSON."""

from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web
from msgspec import Meta

from kloudmeter_py.core.budget import ReadBudget
from kloudmeter_py.core.models import AwareTime
from kloudmeter_py.core.query import parse_time
from kloudmeter_py.core.rating import (
    Filter,
    Price,
    PriceIn,
    Segment,
    Tier,
    check_filters,
    clip,
    matches,
    pick_price,
    segments,
    tiered_cost,
    to_decimal,
    validate_price,
)
from kloudmeter_py.core.windows import QueryError
from kloudmeter_py.errors import InvalidInput, NotFound
from kloudmeter_py.gateway.helpers import decode_body, json_response, read_budget
from kloudmeter_py.gateway.keys import JS, LAYOUT, METERS
from kloudmeter_py.gateway.routes import (
    ADMIN,
    CALLER,
    NO_TENANT_DATA,
    USER,
    Op,
    Routes,
    TenantScope,
    own_tenant,
    tenant_of,
)
from kloudmeter_py.gateway.schemas import array, ref
from kloudmeter_py.store.rating import PriceStore, Resource, resources

routes = Routes()
_PRICE_ID = ("the price id",)

# A non-negative decimal, as a string or a JSON number (validate_price refuses negatives).
_DECIMAL = Meta(
    extra_json_schema={
        "anyOf": [
            {"type": "string", "pattern": r"^[0-9]{1,18}(\.[0-9]{1,18})?$"},
            {"type": "integer", "minimum": 0, "maximum": 10**18},
        ]
    }
)
NonNegative = Annotated[Decimal, _DECIMAL]


class TierBody(Tier, forbid_unknown_fields=True):
    unit_price: NonNegative
    up_to: NonNegative | None = None


class PriceBody(PriceIn, forbid_unknown_fields=True):
    """Body of POST /v1/prices and PUT /v1/prices/{id}: a PriceIn with what validate_price
    checks of each field in the schema (a meter or a resource_type is required; tiers must
    increase, and effective_to follow effective_from, which a schema cannot say)."""

    unit_price: NonNegative
    tiers: list[TierBody] = msgspec.field(default_factory=list)  # type: ignore[assignment]
    tier_mode: Annotated[str, Meta(pattern="^(graduated|volume)$")] = "graduated"
    unit_seconds: Annotated[int, Meta(ge=1)] = 3600
    effective_from: AwareTime | None = None
    effective_to: AwareTime | None = None


_price_in = msgspec.json.Decoder(PriceBody)


class ResourceCost(msgspec.Struct):
    """A resource of a duration meter, with what it has cost so far."""

    meter: str
    resource_id: str
    resource_name: str | None
    resource_type: str | None
    region: str | None
    tenant_id: str
    status: Literal["running", "stopped", "deleted"]
    created_at: datetime | None
    deleted_at: datetime | None
    quantity: Decimal
    consumption: Decimal
    currency: str | None


class Record(msgspec.Struct):
    """A billing segment of a resource: one price and one state."""

    meter: str
    resource_id: str
    start_at: datetime
    end_at: datetime
    status: Literal["running", "stopped"]
    weight: Decimal
    seconds: Decimal
    unit_price: Decimal | None
    price_id: str | None
    currency: str | None
    quantity: Decimal
    consumption: Decimal


class ChargingItem(msgspec.Struct):
    meter: str
    resource_id: str
    tenant: str
    quantity: Decimal
    unit_price: Decimal | None
    price_id: str | None
    currency: str | None
    cost: Decimal
    metadata: dict[str, Any]


class Charging(msgspec.Struct):
    """Cost per meter and resource over [start, end), and totals per currency."""

    tenant: str | None
    start: datetime
    end: datetime
    totals: dict[str, Decimal]
    items: list[ChargingItem]


class GroupCost(msgspec.Struct):
    name: str
    price_id: str
    currency: str
    min_quantity: Decimal
    max_quantity: Decimal
    min_cost: Decimal
    max_cost: Decimal


class CostRange(msgspec.Struct):
    min_cost: Decimal
    max_cost: Decimal


class CostEstimate(msgspec.Struct):
    """Min and max cost of groups of resources over a period, per group and currency."""

    hours: Decimal
    groups: list[GroupCost]
    totals: dict[str, CostRange]


PRICE_RULES = {
    "anyOf": [
        {"required": ["meter"], "properties": {"meter": {"type": "string"}}},
        {"required": ["resource_type"], "properties": {"resource_type": {"type": "string"}}},
    ]
}


def _prices(request: web.Request) -> PriceStore:
    return PriceStore(request.app[JS], request.app[LAYOUT])


def _body_price(raw: bytes) -> PriceIn:
    body = decode_body(raw, _price_in)
    validate_price(body)
    return body


@routes.post(
    "/v1/prices",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Create a price",
        "rating",
        status=201,
        response=ref("Price"),
        body=ref("PriceBody"),
        errors=(400,),
    ),
)
async def create_price(request: web.Request) -> web.Response:
    return json_response(
        await _prices(request).create(_body_price(await request.read())), status=201
    )


@routes.get(
    "/v1/prices",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op("List prices", "rating", response=array(ref("Price"))),
)
async def list_prices(request: web.Request) -> web.Response:
    return json_response(await _prices(request).list())


@routes.get(
    "/v1/prices/{id}",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op("Get a price", "rating", response=ref("Price"), path=_PRICE_ID, errors=(404,)),
)
async def get_price(request: web.Request) -> web.Response:
    return json_response(await _prices(request).get(request.match_info["id"]))


@routes.put(
    "/v1/prices/{id}",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Replace a price",
        "rating",
        response=ref("Price"),
        path=_PRICE_ID,
        body=ref("PriceBody"),
        errors=(400, 404),
    ),
)
async def put_price(request: web.Request) -> web.Response:
    body = _body_price(await request.read())
    return json_response(await _prices(request).replace(request.match_info["id"], body))


@routes.delete(
    "/v1/prices/{id}",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op("Delete a price", "rating", status=204, path=_PRICE_ID, errors=(404,)),
)
async def delete_price(request: web.Request) -> web.Response:
    await _prices(request).delete(request.match_info["id"])
    return web.Response(status=204)


async def _resources(
    request: web.Request, tenant: str | None, budget: ReadBudget, resource_id: str | None = None
) -> tuple[list[Resource], list[Price]]:
    meters = await request.app[METERS].list()
    found = await resources(
        request.app[JS], request.app[LAYOUT], meters, tenant, budget, resource_id=resource_id
    )
    return found, await _prices(request).list()


def _segments(res: Resource, prices: list[Price], until: datetime) -> list[Segment]:
    return segments(
        res.points,
        until,
        prices,
        meter=res.meter,
        resource_type=res.resource_type,
        region=res.region,
    )


ResourceStatus = Literal["running", "stopped", "deleted"]
_STATUS: dict[str, ResourceStatus] = {
    "start": "running",
    "change": "running",
    "stop": "stopped",
    "end": "deleted",
}


def _status(res: Resource) -> ResourceStatus:
    return _STATUS[max(res.points, key=lambda p: (p.at, p.seq)).kind]


def _segment_cost(seg: Segment) -> Decimal:
    return seg.quantity() * seg.price.unit_price if seg.price else Decimal(0)


@routes.get(
    "/v1/resources",
    access=USER,
    tenant=TenantScope(param="tenant"),
    op=Op("Resources with their cost so far", "rating", response=array(ref("ResourceCost"))),
)
async def list_resources(request: web.Request) -> web.Response:
    budget = read_budget(request)
    found, prices = await _resources(request, tenant_of(request), budget)
    now = datetime.now(UTC)
    out = []
    for res in found:
        await budget.tick()
        segs = _segments(res, prices, now)
        created = min((p.at for p in res.points if p.kind == "start"), default=None)
        deleted = max((p.at for p in res.points if p.kind == "end"), default=None)
        out.append(
            ResourceCost(
                meter=res.meter,
                resource_id=res.resource_id,
                resource_name=res.name,
                resource_type=res.resource_type,
                region=res.region,
                tenant_id=res.tenant,
                status=_status(res),
                created_at=created,
                deleted_at=deleted,
                quantity=sum((s.quantity() for s in segs), Decimal(0)),
                consumption=sum((_segment_cost(s) for s in segs), Decimal(0)),
                currency=next((s.price.currency for s in segs if s.price), None),
            )
        )
    return json_response(out)


@routes.get(
    "/v1/records/{resource_id}",
    access=USER,
    tenant=CALLER,
    op=Op(
        "Billing segments of a resource",
        "rating",
        response=array(ref("Record")),
        path=("the resource id",),
        errors=(404,),
    ),
)
async def records(request: web.Request) -> web.Response:
    rid = request.match_info["resource_id"]
    found, prices = await _resources(request, tenant_of(request), read_budget(request), rid)
    matching = [r for r in found if r.resource_id == rid]
    if not matching:
        raise NotFound(f"resource {rid!r} not found", field="resource_id")
    now = datetime.now(UTC)
    out = []
    for res in matching:
        for seg in _segments(res, prices, now):
            out.append(
                Record(
                    meter=res.meter,
                    resource_id=rid,
                    start_at=seg.start,
                    end_at=seg.end,
                    status="running" if seg.running else "stopped",
                    weight=seg.weight,
                    seconds=seg.seconds,
                    unit_price=seg.price.unit_price if seg.price else None,
                    price_id=seg.price.id if seg.price else None,
                    currency=seg.price.currency if seg.price else None,
                    quantity=seg.quantity(),
                    consumption=_segment_cost(seg),
                )
            )
    return json_response(out)


class ChargingIn(msgspec.Struct, forbid_unknown_fields=True):
    start: AwareTime
    end: AwareTime
    tenant: str | None = None
    project: str | None = None  # eBill's name for the tenant
    meters: list[str] | None = None
    filters: list[Filter] = []
    template: str | None = None


_charging_in = msgspec.json.Decoder(ChargingIn)


def _period(start: str | datetime, end: str | datetime) -> tuple[datetime, datetime]:
    try:
        a = start.astimezone(UTC) if isinstance(start, datetime) else parse_time("start", start)
        b = end.astimezone(UTC) if isinstance(end, datetime) else parse_time("end", end)
    except QueryError as exc:
        raise InvalidInput(str(exc), field=exc.field) from None
    if b <= a:
        raise InvalidInput("end must be after start", field="end")
    return a, b


@routes.post(
    "/charging",
    access=USER,
    tenant=CALLER,
    op=Op(
        "Cost per meter and resource of a tenant over a period",
        "rating",
        response=ref("Charging"),
        body=ref("ChargingIn"),
        errors=(400, 404),
    ),
)
async def charging(request: web.Request) -> web.Response:
    """POST /charging: cost per meter and resource of a tenant over a period, filtered."""
    body = decode_body(await request.read(), _charging_in)
    tenant = own_tenant(request, body.tenant or body.project, "tenant")
    start, end = _period(body.start, body.end)
    try:
        filters = check_filters(body.filters)
    except ValueError as exc:
        raise InvalidInput(str(exc), field=getattr(exc, "field", "filters")) from None
    template_source = None
    if body.template is not None:
        template_source = await _template_source(request, body.template)
    budget = read_budget(request)
    found, prices = await _resources(request, tenant, budget)
    wanted = set(body.meters) if body.meters else None
    items = []
    totals: dict[str, Decimal] = defaultdict(Decimal)
    for res in found:
        await budget.tick()
        if wanted is not None and res.meter not in wanted:
            continue
        if not matches(res.metadata, filters):
            continue
        segs = clip(_segments(res, prices, min(end, datetime.now(UTC))), start, end)
        by_price: dict[str | None, tuple[Price | None, Decimal]] = {}
        for seg in segs:
            pid = seg.price.id if seg.price else None
            price, qty = by_price.get(pid, (seg.price, Decimal(0)))
            by_price[pid] = (price, qty + seg.quantity())
        for price, qty in by_price.values():
            if qty == 0:
                continue
            cost = tiered_cost(price, qty) if price else Decimal(0)
            if template_source is not None:
                cost = await _rate(template_source, res, qty, price, cost)
            currency = price.currency if price else None
            items.append(
                ChargingItem(
                    meter=res.meter,
                    resource_id=res.resource_id,
                    tenant=res.tenant,
                    quantity=qty,
                    unit_price=price.unit_price if price else None,
                    price_id=price.id if price else None,
                    currency=currency,
                    cost=cost,
                    metadata=res.metadata,
                )
            )
            if currency:
                totals[currency] += cost
    return json_response(
        Charging(tenant=tenant, start=start, end=end, totals=dict(totals), items=items)
    )


async def _template_source(request: web.Request, template_id: str) -> str:
    from kloudmeter_py.gateway.templates import load_source

    return await load_source(request, template_id)


async def _rate(
    source: str, res: Resource, qty: Decimal, price: Price | None, cost: Decimal
) -> Decimal:
    from kloudmeter_py.rating.sandbox import TemplateError, run_template

    data = {
        "meter": res.meter,
        "resource": res.resource_id,
        "tenant": res.tenant,
        "quantity": str(qty),
        "unit_price": str(price.unit_price) if price else None,
        "currency": price.currency if price else None,
        "cost": str(cost),
        "metadata": res.metadata,
    }
    try:
        return await run_template(source, data)
    except TemplateError as exc:
        raise InvalidInput(f"template failed: {exc}", field="template") from None


class EstimateGroup(msgspec.Struct, forbid_unknown_fields=True):
    min_instances: int
    max_instances: int
    usage_per_hour: Decimal = Decimal(1)  # units per instance per hour (vCPUs, GB, ...)
    meter: str | None = None
    resource_type: str | None = None
    region: str | None = None
    name: str = ""


class EstimateIn(msgspec.Struct, forbid_unknown_fields=True):
    groups: list[EstimateGroup]
    start: str | None = None
    end: str | None = None
    hours: Decimal | None = None


_estimate_in = msgspec.json.Decoder(EstimateIn)


@routes.post(
    "/cost",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Estimate the cost of groups of resources",
        "rating",
        response=ref("CostEstimate"),
        body=ref("EstimateIn"),
        errors=(400,),
    ),
)
async def cost_estimate(request: web.Request) -> web.Response:
    """POST /cost: min and max cost of groups of resources over a period, from the price book."""
    body = decode_body(await request.read(), _estimate_in)
    if body.hours is not None:
        hours = to_decimal(body.hours, "hours")
        start = datetime.now(UTC)
    elif body.start and body.end:
        start, end = _period(body.start, body.end)
        hours = Decimal(str((end - start).total_seconds())) / 3600
    else:
        raise InvalidInput("give hours, or start and end", field="hours")
    if hours <= 0:
        raise InvalidInput("the period must be positive", field="hours")
    prices = await _prices(request).list()
    groups = []
    totals: dict[str, CostRange] = {}
    for i, g in enumerate(body.groups):
        if g.min_instances < 0 or g.max_instances < g.min_instances:
            raise InvalidInput("0 <= min_instances <= max_instances", field=f"groups[{i}]")
        price = pick_price(
            prices,
            meter=g.meter or "",
            resource_type=g.resource_type,
            region=g.region,
            at=start,
        )
        if price is None:
            raise InvalidInput("no price applies to this group", field=f"groups[{i}]")
        per_unit = Decimal(3600) / Decimal(price.unit_seconds)
        lo_q = g.min_instances * g.usage_per_hour * hours * per_unit
        hi_q = g.max_instances * g.usage_per_hour * hours * per_unit
        lo, hi = tiered_cost(price, lo_q), tiered_cost(price, hi_q)
        t = totals.setdefault(price.currency, CostRange(Decimal(0), Decimal(0)))
        t.min_cost += lo
        t.max_cost += hi
        groups.append(
            GroupCost(
                name=g.name,
                price_id=price.id,
                currency=price.currency,
                min_quantity=lo_q,
                max_quantity=hi_q,
                min_cost=lo,
                max_cost=hi,
            )
        )
    return json_response(CostEstimate(hours=hours, groups=groups, totals=totals))
