"""The price book (KV bucket ``prices``) and resource timelines read from the event stream."""

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from kloudmeter_py.core.budget import ReadBudget
from kloudmeter_py.core.keys import encode_token
from kloudmeter_py.core.models import InvalidField, Meter, event_decoder
from kloudmeter_py.core.paths import MISSING, compile_path
from kloudmeter_py.core.rating import DEFAULT_ACTIONS, Point, Price, PriceIn, to_decimal
from kloudmeter_py.errors import NotFound
from kloudmeter_py.store.kv import get_with_revision, new_budget, read, scan
from kloudmeter_py.store.layout import Layout

_price_decoder = msgspec.json.Decoder(Price)


class PriceStore:
    def __init__(self, js: JetStreamContext, layout: Layout) -> None:
        self.js = js
        self.bucket = layout.prices_bucket

    async def kv(self) -> KeyValue:
        return await self.js.key_value(self.bucket)

    async def create(self, body: PriceIn) -> Price:
        price = Price(
            **msgspec.structs.asdict(body), id=uuid.uuid4().hex[:12], created_at=datetime.now(UTC)
        )
        await (await self.kv()).create(price.id, msgspec.json.encode(price))
        return price

    async def replace(self, price_id: str, body: PriceIn) -> Price:
        old = await self.get(price_id)
        price = Price(**msgspec.structs.asdict(body), id=old.id, created_at=old.created_at)
        await (await self.kv()).put(price.id, msgspec.json.encode(price))
        return price

    async def get(self, price_id: str) -> Price:
        if not (price_id.isascii() and price_id.isalnum()):  # a KV key token
            raise NotFound("price not found", field="id")
        value, _ = await get_with_revision(await self.kv(), price_id)
        if value is None:
            raise NotFound("price not found", field="id")
        return _price_decoder.decode(value)

    async def delete(self, price_id: str) -> None:
        await self.get(price_id)
        await (await self.kv()).delete(price_id)

    async def list(self) -> list[Price]:
        return [_price_decoder.decode(v) for _, v in await scan(self.js, self.bucket)]


@dataclass
class Resource:
    meter: str
    resource_id: str
    tenant: str
    resource_type: str | None = None
    region: str | None = None
    name: str | None = None
    points: list[Point] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


async def resources(
    js: JetStreamContext,
    layout: Layout,
    meters: list[Meter],
    tenant: str | None = None,
    budget: ReadBudget | None = None,
) -> list[Resource]:
    """Resource timelines of the duration meters, from their lifecycle events in the stream;
    each event read and folded is a tick of ``budget``."""
    if budget is None:
        budget = new_budget(None)
    out: dict[tuple[str, str], Resource] = {}
    for meter in meters:
        if meter.aggregation != "duration":
            continue
        assert meter.resourceProperty and meter.actionProperty
        find_resource = compile_path(meter.resourceProperty)
        find_action = compile_path(meter.actionProperty)
        find_weight = compile_path(meter.valueProperty) if meter.valueProperty else None
        actions = meter.actions or DEFAULT_ACTIONS
        subject = encode_token(tenant) if tenant else "*"
        for seq, stored, raw in await _events(
            js,
            layout,
            layout.stored_subject(encode_token(meter.eventType), subject),
            meter.startSeq,
            budget,
        ):
            await budget.tick()
            try:
                event = event_decoder.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue  # dead-lettered by the worker
            rid = find_resource(event.data)
            kind = actions.get(str(find_action(event.data)))
            if rid is MISSING or rid is None or kind is None:
                continue
            weight: Decimal | None = None
            if find_weight is not None:
                value = find_weight(event.data)
                if value is not MISSING and value is not None:
                    try:
                        weight = to_decimal(value, "valueProperty")
                    except InvalidField:
                        weight = None
            key = (meter.id, str(rid))
            res = out.get(key)
            if res is None:
                res = out[key] = Resource(
                    meter=meter.id, resource_id=str(rid), tenant=event.subject
                )
            data = event.data
            if kind == "start" or not res.metadata:
                res.resource_type = data.get("resource_type", res.resource_type)
                res.region = data.get("region", res.region)
                res.name = data.get("resource_name", res.name)
                res.metadata = {
                    **{k: v for k, v in data.items() if isinstance(v, str | int | float)},
                    "tenant": event.subject,
                    "resource_id": str(rid),
                    "meter": meter.id,
                }
            res.points.append(Point(event.time or stored, seq, kind, weight, data))
    return sorted(out.values(), key=lambda r: (r.meter, r.resource_id))


async def _events(
    js: JetStreamContext, layout: Layout, subject: str, after_seq: int, budget: ReadBudget
) -> list[tuple[int, datetime, bytes]]:
    msgs = await read(js, layout.stream, subject, after_seq=after_seq, budget=budget)
    return [(m.metadata.sequence.stream, m.metadata.timestamp, m.data) for m in msgs]
