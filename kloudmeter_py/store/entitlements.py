"""Features, entitlements and grants in KV (buckets ``features``, ``entitlements``,
``grants``), and an entitlement's value at a time computed from the window summaries.

Keys (every token encoded by core.keys.encode_token, so any value is a legal key):

- ``features``: ``<feature id>``; value: :class:`FeatureRecord` (a deleted feature is kept,
  archived, for the entitlements that name it).
- ``entitlements``: ``<subject>.<entitlement id>``; value: :class:`EntitlementRecord`, its
  manual resets inside (each added by compare-and-set).
- ``grants``: ``<entitlement id>.<grant id>``; value: :class:`GrantRecord` (voiding sets
  ``voidedAt`` by compare-and-set).

The value (:func:`value_at`) reads the meter's usage of each stretch the burn-down needs
(core.entitlements.usage_segments) with the meter query's own path (store.query.run_query:
the subjects' summary pages, a direct get each when they are few), all stretches side by
side, and runs core.entitlements.run over them. No event is read.
"""

import asyncio
import os
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from kloudmeter_py.config import Settings
from kloudmeter_py.core import entitlements as core
from kloudmeter_py.core.budget import ReadBudget
from kloudmeter_py.core.keys import encode_token
from kloudmeter_py.core.models import Meter
from kloudmeter_py.core.query import Query
from kloudmeter_py.core.windows import DAY, HOUR, MINUTE, widths
from kloudmeter_py.errors import Conflict, InvalidInput, NotFound
from kloudmeter_py.store.kv import get_with_revision, new_budget, scan
from kloudmeter_py.store.layout import Layout
from kloudmeter_py.store.meters import MeterStore
from kloudmeter_py.store.query import horizons, run_query
from kloudmeter_py.store.wire import Wire

EntitlementType = Literal["metered", "boolean", "static"]
# Meters whose usage adds up over time (a balance is burnt by the sum of its stretches).
METERED_AGGREGATIONS = ("count", "sum", "duration")


class Period(msgspec.Struct):
    interval: str
    anchor: datetime


class Expiration(msgspec.Struct):
    duration: str
    count: int


class ResetRecord(msgspec.Struct):
    at: datetime
    retainAnchor: bool = False
    preserveOverage: bool | None = None


class FeatureRecord(msgspec.Struct, omit_defaults=True):
    id: str
    key: str
    name: str
    createdAt: datetime
    updatedAt: datetime
    meterSlug: str | None = None
    meterGroupByFilters: dict[str, str] | None = None
    metadata: dict[str, str] | None = None
    archivedAt: datetime | None = None


class EntitlementRecord(msgspec.Struct, omit_defaults=True):
    id: str
    type: EntitlementType
    subjectKey: str
    featureId: str
    featureKey: str
    createdAt: datetime
    updatedAt: datetime
    metadata: dict[str, str] | None = None
    config: str | None = None  # static
    usagePeriod: Period | None = None
    measureUsageFrom: datetime | None = None
    isSoftLimit: bool = False
    issueAfterReset: float | None = None
    issueAfterResetPriority: int = 1
    preserveOverageAtReset: bool = False
    resets: list[ResetRecord] = []
    customerId: str | None = None  # set when made through a customer's path


class GrantRecord(msgspec.Struct, omit_defaults=True):
    id: str
    entitlementId: str
    amount: float
    priority: int
    effectiveAt: datetime
    createdAt: datetime
    updatedAt: datetime
    expiration: Expiration | None = None
    expiresAt: datetime | None = None
    minRolloverAmount: float = 0.0
    maxRolloverAmount: float = 0.0
    recurrence: Period | None = None
    voidedAt: datetime | None = None
    metadata: dict[str, str] | None = None


_feature_decoder = msgspec.json.Decoder(FeatureRecord)
_entitlement_decoder = msgspec.json.Decoder(EntitlementRecord)
_grant_decoder = msgspec.json.Decoder(GrantRecord)
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_id() -> str:
    """A ULID (26 characters, time-ordered, as OpenMeter's ids)."""
    n = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(n >> (5 * i)) & 31] for i in reversed(range(26)))


# --- times on the meter's interval ----------------------------------------------------------


def floor_time(t: datetime, step: int) -> datetime:
    epoch = int(t.timestamp())
    return datetime.fromtimestamp(epoch - epoch % step, UTC)


def ceil_time(t: datetime, step: int) -> datetime:
    floored = floor_time(t, step)
    return floored if floored == t else floored + timedelta(seconds=step)


# --- records to the pure core ---------------------------------------------------------------


def metered_of(ent: EntitlementRecord) -> core.Metered:
    assert ent.usagePeriod is not None and ent.measureUsageFrom is not None
    return core.Metered(
        id=ent.id,
        measure_from=ent.measureUsageFrom,
        usage_period=core.Recurrence(ent.usagePeriod.interval, ent.usagePeriod.anchor),
        soft_limit=ent.isSoftLimit,
        preserve_overage=ent.preserveOverageAtReset,
        issue_after_reset=ent.issueAfterReset,
        issue_priority=ent.issueAfterResetPriority,
    )


def grant_of(g: GrantRecord) -> core.Grant:
    return core.Grant(
        id=g.id,
        amount=g.amount,
        effective_at=g.effectiveAt,
        priority=g.priority,
        expires_at=g.expiresAt,
        voided_at=g.voidedAt,
        min_rollover=g.minRolloverAmount,
        max_rollover=g.maxRolloverAmount,
        recurrence=(
            core.Recurrence(g.recurrence.interval, g.recurrence.anchor) if g.recurrence else None
        ),
        created_at=g.createdAt,
    )


def resets_of(ent: EntitlementRecord) -> list[core.Reset]:
    return [core.Reset(r.at, r.retainAnchor, r.preserveOverage) for r in ent.resets]


# --- the stores -----------------------------------------------------------------------------


class EntitlementStore:
    """Features, entitlements and grants, as the gateway and the alerting use them."""

    def __init__(self, js: JetStreamContext, layout: Layout) -> None:
        self.js = js
        self.layout = layout

    async def _kv(self, bucket: str) -> KeyValue:
        return await self.js.key_value(bucket)

    # features

    async def features(self, include_archived: bool = False) -> list[FeatureRecord]:
        found = [
            _feature_decoder.decode(v) for _, v in await scan(self.js, self.layout.features_bucket)
        ]
        found = [f for f in found if include_archived or f.archivedAt is None]
        return sorted(found, key=lambda f: (f.createdAt, f.id))

    async def feature(self, id_or_key: str, include_archived: bool = False) -> FeatureRecord:
        """A feature by id, or by key (the live one with that key)."""
        kv = await self._kv(self.layout.features_bucket)
        value, _ = await get_with_revision(kv, encode_token(id_or_key))
        if value is not None:
            feature = _feature_decoder.decode(value)
            if include_archived or feature.archivedAt is None:
                return feature
        for f in await self.features():
            if f.key == id_or_key:
                return f
        raise NotFound(f"feature {id_or_key!r} not found", field="featureId")

    async def create_feature(self, feature: FeatureRecord) -> FeatureRecord:
        if any(f.key == feature.key for f in await self.features()):
            raise Conflict(f"a feature with key {feature.key!r} already exists", field="key")
        kv = await self._kv(self.layout.features_bucket)
        await kv.create(encode_token(feature.id), msgspec.json.encode(feature))
        return feature

    async def archive_feature(self, id_or_key: str, now: datetime) -> None:
        feature = await self.feature(id_or_key)
        kv = await self._kv(self.layout.features_bucket)
        archived = msgspec.structs.replace(feature, archivedAt=now, updatedAt=now)
        await kv.put(encode_token(feature.id), msgspec.json.encode(archived))

    # entitlements

    async def entitlements(
        self, subjects: Iterable[str] | None = None, budget: ReadBudget | None = None
    ) -> list[EntitlementRecord]:
        """Every entitlement (of ``subjects``), oldest first."""
        bucket = self.layout.entitlements_bucket
        if subjects is None:
            pairs = await scan(self.js, bucket, budget=budget)
        else:
            pairs = []
            for s in dict.fromkeys(subjects):
                pairs += await scan(self.js, bucket, f"{encode_token(s)}.*", budget=budget)
        found = [_entitlement_decoder.decode(v) for _, v in pairs]
        return sorted(found, key=lambda e: (e.createdAt, e.id))

    async def entitlement(self, subject: str | None, id_or_feature: str) -> EntitlementRecord:
        """An entitlement by id (of ``subject`` when given), or the subject's entitlement of
        a feature (by the feature's key or id)."""
        kv = await self._kv(self.layout.entitlements_bucket)
        if subject is not None:
            value, _ = await get_with_revision(
                kv, f"{encode_token(subject)}.{encode_token(id_or_feature)}"
            )
            if value is not None:
                return _entitlement_decoder.decode(value)
            for e in await self.entitlements([subject]):
                if id_or_feature in (e.featureKey, e.featureId):
                    return e
        else:
            pairs = await scan(
                self.js, self.layout.entitlements_bucket, f"*.{encode_token(id_or_feature)}"
            )
            if pairs:
                return _entitlement_decoder.decode(pairs[0][1])
        raise NotFound(f"entitlement {id_or_feature!r} not found", field="entitlementId")

    async def create_entitlement(self, ent: EntitlementRecord) -> EntitlementRecord:
        for e in await self.entitlements([ent.subjectKey]):
            if e.featureId == ent.featureId:
                raise Conflict(
                    f"subject {ent.subjectKey!r} already has an entitlement to feature "
                    f"{ent.featureKey!r} ({e.id}); override it instead",
                    field="featureKey",
                )
        kv = await self._kv(self.layout.entitlements_bucket)
        await kv.create(_ent_key(ent), msgspec.json.encode(ent))
        return ent

    async def delete_entitlement(self, ent: EntitlementRecord) -> None:
        """The entitlement and its grants, gone."""
        grants = await self._kv(self.layout.grants_bucket)
        for g in await self.grants(ent.id):
            await grants.delete(f"{encode_token(ent.id)}.{encode_token(g.id)}")
        await (await self._kv(self.layout.entitlements_bucket)).delete(_ent_key(ent))

    async def change_entitlement(
        self, ent: EntitlementRecord, change: Callable[[EntitlementRecord], EntitlementRecord]
    ) -> EntitlementRecord:
        """``change`` applied by compare-and-set (tried again on a concurrent change)."""
        kv = await self._kv(self.layout.entitlements_bucket)
        key = _ent_key(ent)
        for _ in range(20):
            value, revision = await get_with_revision(kv, key)
            if value is None:
                raise NotFound(f"entitlement {ent.id!r} not found", field="entitlementId")
            new = change(_entitlement_decoder.decode(value))
            try:
                await kv.update(key, msgspec.json.encode(new), last=revision)
            except KeyWrongLastSequenceError:
                continue
            return new
        raise Conflict("the entitlement kept changing; try again", field="entitlementId")

    # grants

    async def grants(
        self, entitlement_id: str | None = None, budget: ReadBudget | None = None
    ) -> list[GrantRecord]:
        pattern = ">" if entitlement_id is None else f"{encode_token(entitlement_id)}.*"
        pairs = await scan(self.js, self.layout.grants_bucket, pattern, budget=budget)
        found = [_grant_decoder.decode(v) for _, v in pairs]
        return sorted(found, key=lambda g: (g.createdAt, g.id))

    async def create_grant(self, grant: GrantRecord) -> GrantRecord:
        kv = await self._kv(self.layout.grants_bucket)
        key = f"{encode_token(grant.entitlementId)}.{encode_token(grant.id)}"
        await kv.create(key, msgspec.json.encode(grant))
        return grant

    async def grant(self, grant_id: str) -> GrantRecord:
        pairs = await scan(self.js, self.layout.grants_bucket, f"*.{encode_token(grant_id)}")
        if not pairs:
            raise NotFound(f"grant {grant_id!r} not found", field="grantId")
        return _grant_decoder.decode(pairs[0][1])

    async def void_grant(self, grant: GrantRecord, at: datetime) -> GrantRecord:
        """The grant voided at ``at`` (compare-and-set; a voided grant stays voided)."""
        kv = await self._kv(self.layout.grants_bucket)
        key = f"{encode_token(grant.entitlementId)}.{encode_token(grant.id)}"
        for _ in range(20):
            value, revision = await get_with_revision(kv, key)
            if value is None:
                raise NotFound(f"grant {grant.id!r} not found", field="grantId")
            current = _grant_decoder.decode(value)
            if current.voidedAt is not None:
                return current
            voided = msgspec.structs.replace(current, voidedAt=at, updatedAt=at)
            try:
                await kv.update(key, msgspec.json.encode(voided), last=revision)
            except KeyWrongLastSequenceError:
                continue
            return voided
        raise Conflict("the grant kept changing; try again", field="grantId")


def _ent_key(ent: EntitlementRecord) -> str:
    return f"{encode_token(ent.subjectKey)}.{encode_token(ent.id)}"


# --- the value ------------------------------------------------------------------------------


class EntitlementValue(msgspec.Struct, omit_defaults=True):
    """OpenMeter's EntitlementValue: metered fields only for a metered entitlement, config
    only for a static one."""

    hasAccess: bool
    balance: float | None = None
    usage: float | None = None
    overage: float | None = None
    totalAvailableGrantAmount: float | None = None
    config: str | None = None


def stored_edge(t: datetime, settings: Settings, now: float | None = None) -> datetime:
    """``t`` as finely as the summaries still hold it: itself while minute summaries are
    kept there, else the hour holding it, else the (UTC) day. A stretch of usage is read
    between such edges, so it is exact where the minute summaries are kept (METER_MINUTE_
    RETENTION) and rounded down to the hour or day past that."""
    w = widths(settings.interval)
    h = horizons(settings, now)
    epoch = int(t.timestamp())
    for level in (MINUTE, HOUR, DAY):
        start = epoch - epoch % w[level]
        if start + w[level] > h[level] or level == DAY:
            return datetime.fromtimestamp(start if level != MINUTE else epoch, UTC)
    raise AssertionError("unreachable")


_READS_AT_ONCE = 16


async def measured_usage(
    js: JetStreamContext,
    settings: Settings,
    meter: Meter,
    stretches: Sequence[tuple[datetime, datetime]],
    subjects: Sequence[str],
    filters: dict[str, str] | None,
    budget: ReadBudget,
    wire: Wire | None = None,
) -> dict[tuple[datetime, datetime], float]:
    """The meter's usage by ``subjects`` in each stretch [start, end) (on METER_INTERVAL
    edges), from the window summaries: one query total per stretch, read side by side."""
    gate = asyncio.Semaphore(_READS_AT_ONCE)
    utc = ZoneInfo("UTC")
    now = time.time()

    async def one(start: datetime, end: datetime) -> float:
        a, b = stored_edge(start, settings, now), stored_edge(end, settings, now)
        if a >= b or not subjects:
            return 0.0
        q = Query(
            start=a,
            end=b,
            window_size=None,
            tz=utc,
            subjects=list(subjects),
            filter_group_by=dict(filters or {}),
        )
        async with gate:
            result = await run_query(js, settings, meter, q, budget, wire=wire)
        total = 0.0
        for row in result["data"]:
            if row.value is not None:
                total += row.value
        return total

    figures = await asyncio.gather(*(one(a, b) for a, b in stretches))
    return dict(zip(stretches, figures, strict=True))


async def metered_run(
    js: JetStreamContext,
    settings: Settings,
    meter: Meter,
    feature: FeatureRecord,
    ent: EntitlementRecord,
    grants: Sequence[GrantRecord],
    at: datetime,
    *,
    subjects: Sequence[str] | None = None,
    splits: Iterable[datetime] = (),
    budget: ReadBudget | None = None,
    wire: Wire | None = None,
) -> core.Run:
    """The burn-down of a metered entitlement up to ``at`` (ceiled to METER_INTERVAL: the
    usage of the interval holding ``at`` counts), its usage read from the summaries of
    ``subjects`` (default: the entitlement's subject)."""
    if budget is None:
        budget = new_budget(settings.read_timeout_ms / 1000)
    at = ceil_time(at, settings.interval)
    metered = metered_of(ent)
    core_grants = [grant_of(g) for g in grants]
    resets = resets_of(ent)
    splits = list(splits)
    stretches = core.usage_segments(metered, core_grants, resets, at, splits)
    usage = await measured_usage(
        js,
        settings,
        meter,
        stretches,
        list(subjects) if subjects is not None else [ent.subjectKey],
        feature.meterGroupByFilters,
        budget,
        wire,
    )
    return core.run(metered, core_grants, resets, at, usage, splits)


async def value_at(
    js: JetStreamContext,
    settings: Settings,
    ent: EntitlementRecord,
    at: datetime | None = None,
    *,
    subjects: Sequence[str] | None = None,
    budget: ReadBudget | None = None,
    wire: Wire | None = None,
) -> EntitlementValue:
    """An entitlement's value at ``at`` (default now), any type: what
    ``GET .../entitlements/{id}/value`` answers. A metered one reads its feature, meter and
    grants, then the usage from the window summaries (see :func:`metered_run`)."""
    if ent.type == "boolean":
        return EntitlementValue(hasAccess=True)
    if ent.type == "static":
        return EntitlementValue(hasAccess=True, config=ent.config)
    layout = Layout(settings)
    store = EntitlementStore(js, layout)
    feature = await store.feature(ent.featureId, include_archived=True)
    if feature.meterSlug is None:
        raise InvalidInput(f"feature {feature.key!r} has no meter", field="featureKey")
    meter = await MeterStore(js, layout).get(feature.meterSlug)
    grants = await store.grants(ent.id, budget=budget)
    result = await metered_run(
        js,
        settings,
        meter,
        feature,
        ent,
        grants,
        at or datetime.now(UTC),
        subjects=subjects,
        budget=budget,
        wire=wire,
    )
    v = result.value
    return EntitlementValue(
        hasAccess=v.has_access,
        balance=v.balance,
        usage=v.usage,
        overage=v.overage,
        totalAvailableGrantAmount=v.total_available_grant_amount,
    )


def period_of(ent: EntitlementRecord, at: datetime) -> tuple[datetime, datetime, datetime]:
    """(start, end, last reset) of the entitlement's usage period holding ``at``."""
    return core.current_period(metered_of(ent), resets_of(ent), at)


def check_metered_meter(meter: Meter, feature_key: str) -> None:
    if meter.aggregation not in METERED_AGGREGATIONS:
        raise InvalidInput(
            f"featureKey: feature {feature_key!r} counts meter {meter.id!r}, a "
            f"{meter.aggregation} meter; a metered entitlement needs a count, sum or duration "
            "meter (its usage adds up over time)",
            field="featureKey",
        )
