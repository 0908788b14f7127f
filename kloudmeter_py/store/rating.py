"""The price book (KV bucket ``prices``) and resource timelines (KV bucket ``resources``, kept
by the worker's lifecycle folding)."""

import uuid
from datetime import UTC, datetime

import msgspec
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from kloudmeter_py.core.budget import ReadBudget
from kloudmeter_py.core.lifecycle import ResourceView, meter_pattern, resource_view, state_decoder
from kloudmeter_py.core.models import Meter
from kloudmeter_py.core.rating import Price, PriceIn
from kloudmeter_py.errors import NotFound
from kloudmeter_py.store.kv import get_with_revision, new_budget, scan
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


Resource = ResourceView


async def resources(
    js: JetStreamContext,
    layout: Layout,
    meters: list[Meter],
    tenant: str | None = None,
    budget: ReadBudget | None = None,
    resource_id: str | None = None,
) -> list[Resource]:
    """Resource timelines of the duration meters (of ``tenant``, or the one resource), from
    the lifecycle state the worker folds into the ``resources`` bucket: one server-side
    filtered scan, each key read a tick of ``budget``. A value of an earlier generation of its
    meter (deleted and created again, or backfilled and not yet read again) is left out."""
    if budget is None:
        budget = new_budget(None)
    generation = {m.id: m.startSeq for m in meters if m.aggregation == "duration"}
    if not generation:
        return []
    only = next(iter(generation)) if len(generation) == 1 else None
    pattern = meter_pattern(only, tenant, resource_id)
    out: list[Resource] = []
    for _, value in await scan(js, layout.resources_bucket, pattern, budget=budget):
        state = state_decoder.decode(value)
        if state.meter is None or generation.get(state.meter) != state.meterStartSeq:
            continue
        out.append(resource_view(state))
    return sorted(out, key=lambda r: (r.meter, r.resource_id, r.tenant))
