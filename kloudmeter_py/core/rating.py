"""Rating: prices with tiers and effective dates, lifecycle timelines turned into billing
segments, filters over metadata, and cost estimates. Money is Decimal, never float."""

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from itertools import pairwise
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from kloudmeter_py.core.models import InvalidField

Money = Decimal
Currency = Annotated[str, Meta(pattern=r"^[A-Z]{3}$")]
# Koala's lifecycle names; a meter may map its own.
DEFAULT_ACTIONS = {
    "create": "start",
    "power_on": "start",
    "resize": "change",
    "power_off": "stop",
    "delete": "end",
}
ACTION_KINDS = ("start", "change", "stop", "end")


class Tier(msgspec.Struct, forbid_unknown_fields=True):
    unit_price: Decimal
    up_to: Decimal | None = None  # None: no upper bound (the last tier)


class PriceIn(msgspec.Struct, forbid_unknown_fields=True):
    """Body of POST /v1/prices (and PUT)."""

    name: Annotated[str, Meta(min_length=1, max_length=128)]
    currency: Currency
    unit_price: Decimal
    meter: str | None = None
    resource_type: str | None = None
    region: str | None = None
    tiers: list[Tier] = []
    tier_mode: str = "graduated"  # graduated | volume
    # Price per this many seconds of a duration meter's quantity (3600: per hour).
    unit_seconds: int = 3600
    effective_from: datetime | None = None
    effective_to: datetime | None = None
    description: str = ""


class Price(PriceIn, kw_only=True):
    id: str
    created_at: datetime


def validate_price(body: PriceIn) -> None:
    if body.meter is None and body.resource_type is None:
        raise InvalidField("meter", "a price needs a meter or a resource_type")
    if body.unit_price < 0:
        raise InvalidField("unit_price", "must not be negative")
    if body.tier_mode not in ("graduated", "volume"):
        raise InvalidField("tier_mode", "graduated or volume")
    if body.unit_seconds < 1:
        raise InvalidField("unit_seconds", "must be positive")
    for field_name, t in (
        ("effective_from", body.effective_from),
        ("effective_to", body.effective_to),
    ):
        if t is not None and t.tzinfo is None:
            raise InvalidField(field_name, "needs a UTC offset")
    if body.effective_from and body.effective_to and body.effective_to <= body.effective_from:
        raise InvalidField("effective_to", "must be after effective_from")
    last = Decimal(0)
    for i, tier in enumerate(body.tiers):
        if tier.unit_price < 0:
            raise InvalidField(f"tiers[{i}].unit_price", "must not be negative")
        if tier.up_to is None:
            if i != len(body.tiers) - 1:
                raise InvalidField(f"tiers[{i}]", "only the last tier may be unbounded")
            continue
        if tier.up_to <= last:
            raise InvalidField(f"tiers[{i}].up_to", "tiers must increase")
        last = tier.up_to


def price_applies(
    price: Price, *, meter: str, resource_type: str | None, region: str | None, at: datetime
) -> bool:
    if price.meter is not None and price.meter != meter:
        return False
    if price.resource_type is not None and price.resource_type != resource_type:
        return False
    if price.region is not None and price.region != region:
        return False
    if price.effective_from is not None and at < price.effective_from:
        return False
    return not (price.effective_to is not None and at >= price.effective_to)


def pick_price(
    prices: Iterable[Price],
    *,
    meter: str,
    resource_type: str | None,
    region: str | None,
    at: datetime,
) -> Price | None:
    """The price in force at ``at``: the most specific (region and type beat wildcards); of
    equally specific ones, the one in force since the latest ``effective_from`` (a price
    change is a new price from a later instant: it ends the earlier one then, with no
    ``effective_to`` needed); of those, the lowest id. The same prices always give the same
    answer, whatever order they are listed in."""
    best = (-1, -math.inf)
    chosen: Price | None = None
    for p in prices:
        if price_applies(p, meter=meter, resource_type=resource_type, region=region, at=at):
            score = (
                (p.region is not None) * 2 + (p.meter is not None) + (p.resource_type is not None)
            )
            since = p.effective_from.timestamp() if p.effective_from is not None else -math.inf
            rank = (score, since)
            if chosen is None or rank > best or (rank == best and p.id < chosen.id):
                best, chosen = rank, p
    return chosen


def tiered_cost(price: Price, quantity: Decimal) -> Decimal:
    """Cost of ``quantity`` under the price's tiers (or its flat unit price)."""
    if not price.tiers:
        return quantity * price.unit_price
    if price.tier_mode == "volume":
        for tier in price.tiers:
            if tier.up_to is None or quantity <= tier.up_to:
                return quantity * tier.unit_price
        return quantity * price.tiers[-1].unit_price
    cost = Decimal(0)
    floor = Decimal(0)
    for tier in price.tiers:
        top = quantity if tier.up_to is None else min(quantity, tier.up_to)
        if top > floor:
            cost += (top - floor) * tier.unit_price
        if tier.up_to is None or quantity <= tier.up_to:
            break
        floor = tier.up_to
    return cost


@dataclass(frozen=True)
class Point:
    """One lifecycle event of a resource."""

    at: datetime
    seq: int
    kind: str  # start | change | stop | end
    weight: Decimal | None
    data: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Segment:
    start: datetime
    end: datetime
    running: bool
    weight: Decimal
    price: Price | None

    @property
    def seconds(self) -> Decimal:
        return Decimal(str((self.end - self.start).total_seconds()))

    def quantity(self) -> Decimal:
        """Weighted time in price units (seconds / unit_seconds), running time only."""
        if not self.running:
            return Decimal(0)
        unit = Decimal(self.price.unit_seconds if self.price else 3600)
        return self.seconds * self.weight / unit


def segments(
    points: list[Point],
    until: datetime,
    prices: list[Price],
    *,
    meter: str,
    resource_type: str | None,
    region: str | None,
) -> list[Segment]:
    """Billing segments of one resource: a new one at every state change and price change.

    Points are taken in event-time order (then stream order), so late or out-of-order events
    give the same segments as in-order ones. A resource still running accrues up to ``until``.
    """
    ordered = sorted(points, key=lambda p: (p.at, p.seq))
    spans: list[tuple[datetime, datetime, bool, Decimal]] = []
    exists = running = False
    weight = Decimal(1)
    since: datetime | None = None
    for p in ordered:
        if exists and since is not None and p.at > since:
            spans.append((since, p.at, running, weight))
        if p.weight is not None:
            weight = p.weight
        if p.kind == "start":
            exists = running = True
        elif p.kind == "stop":
            running = False
        elif p.kind == "end":
            exists = running = False
        since = p.at if exists else None
    if exists and since is not None and until > since:
        spans.append((since, until, running, weight))
    out: list[Segment] = []
    boundaries = sorted(
        {t for pr in prices for t in (pr.effective_from, pr.effective_to) if t is not None}
    )
    for start, end, is_running, w in spans:
        cuts = [start, *[b for b in boundaries if start < b < end], end]
        for a, b in pairwise(cuts):
            price = pick_price(
                prices, meter=meter, resource_type=resource_type, region=region, at=a
            )
            out.append(Segment(a, b, is_running, w, price))
    return _merge_adjacent(out)


def _merge_adjacent(segs: list[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for s in segs:
        last = merged[-1] if merged else None
        if (
            last is not None
            and last.end == s.start
            and last.running == s.running
            and last.weight == s.weight
            and last.price is s.price
        ):
            merged[-1] = Segment(last.start, s.end, s.running, s.weight, s.price)
        else:
            merged.append(s)
    return merged


def clip(segs: list[Segment], start: datetime, end: datetime) -> list[Segment]:
    out = []
    for s in segs:
        a, b = max(s.start, start), min(s.end, end)
        if b > a:
            out.append(Segment(a, b, s.running, s.weight, s.price))
    return out


def to_decimal(value: Any, field_name: str) -> Decimal:
    if isinstance(value, bool) or value is None:
        raise InvalidField(field_name, f"expected a number, got {value!r}")
    try:
        out = Decimal(str(value))
    except InvalidOperation:
        raise InvalidField(field_name, f"expected a number, got {value!r}") from None
    if not out.is_finite():
        raise InvalidField(field_name, "must be finite")
    return out


# ---- filters (eBill): == != <= >= < > =~ in ----

OPS = ("==", "!=", "<=", ">=", "<", ">", "=~", "in")


class Filter(msgspec.Struct, forbid_unknown_fields=True):
    field: str
    op: str
    value: Any


def check_filters(filters: list[Filter]) -> list[tuple[Filter, re.Pattern[str] | None]]:
    out = []
    for i, f in enumerate(filters):
        if f.op not in OPS:
            raise InvalidField(f"filters[{i}].op", f"one of {' '.join(OPS)}")
        pattern = None
        if f.op == "=~":
            if not isinstance(f.value, str):
                raise InvalidField(f"filters[{i}].value", "=~ needs a regular expression string")
            try:
                pattern = re.compile(f.value)
            except re.error as exc:
                raise InvalidField(
                    f"filters[{i}].value", f"bad regular expression: {exc}"
                ) from None
        if f.op == "in" and not isinstance(f.value, list):
            raise InvalidField(f"filters[{i}].value", "in needs a list")
        out.append((f, pattern))
    return out


def matches(metadata: dict[str, Any], filters: list[tuple[Filter, re.Pattern[str] | None]]) -> bool:
    for f, pattern in filters:
        have = metadata.get(f.field)
        if f.op == "==":
            ok = _cmp_eq(have, f.value)
        elif f.op == "!=":
            ok = not _cmp_eq(have, f.value)
        elif f.op == "in":
            ok = any(_cmp_eq(have, v) for v in f.value)
        elif f.op == "=~":
            ok = have is not None and pattern is not None and bool(pattern.search(str(have)))
        else:
            ok = _cmp_order(have, f.op, f.value)
        if not ok:
            return False
    return True


def _cmp_eq(a: Any, b: Any) -> bool:
    if a == b:
        return True
    try:
        return Decimal(str(a)) == Decimal(str(b))
    except (InvalidOperation, ValueError):
        return str(a) == str(b)


def _cmp_order(a: Any, op: str, b: Any) -> bool:
    if a is None:
        return False
    try:
        x, y = Decimal(str(a)), Decimal(str(b))
    except (InvalidOperation, ValueError):
        x, y = str(a), str(b)  # type: ignore[assignment]
    if op == "<":
        return x < y
    if op == ">":
        return x > y
    if op == "<=":
        return x <= y
    return x >= y
