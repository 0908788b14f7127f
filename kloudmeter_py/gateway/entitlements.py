"""OpenMeter's features, entitlements and grants (v1 wire): what a subject may use, and how
much of it is left.

- ``/api/v1/features``: a feature names a meter (``meterSlug``) and optional group filters.
- ``/api/v1/subjects/{subjectIdOrKey}/entitlements``: a subject's ``metered`` (a usage
  period, grants burnt down by its usage), ``boolean`` or ``static`` (a JSON config)
  entitlement to a feature; its grants, value (``?time=``), history, reset and override.
- ``/api/v1/entitlements`` and ``/api/v1/grants``: every subject's.

Access: an admin manages features, entitlements and grants (ADMIN routes). A user token may
read its own subjects' entitlements, grants, values and history (its tenant is its subject,
or a customer's key: then every subject of that customer); any other subject, known or not,
answers 404 as an unknown one does. Features are
definitions, like meters: any token may list them.

Values are computed by store.entitlements.value_at from the window summaries
(core.entitlements for the burn-down): exact while the minute summaries are kept where a
grant starts or ends (see store.entitlements.stored_edge), as fast as a few meter queries.
"""

import json
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from aiohttp import web
from msgspec import Meta

from kloudmeter_py.core import entitlements as core
from kloudmeter_py.core.query import parse_time
from kloudmeter_py.core.windows import QueryError
from kloudmeter_py.errors import InvalidInput, NotFound
from kloudmeter_py.gateway.helpers import decode_body, json_response, read_budget
from kloudmeter_py.gateway.keys import JS, LAYOUT, LEAN, METERS, SETTINGS
from kloudmeter_py.gateway.routes import (
    ADMIN,
    CALLER,
    NO_TENANT_DATA,
    USER,
    Op,
    Param,
    Routes,
    tenant_subjects,
)
from kloudmeter_py.gateway.schemas import STR, TIME, array, ref
from kloudmeter_py.store.entitlements import (
    EntitlementRecord,
    EntitlementStore,
    EntitlementValue,
    Expiration,
    FeatureRecord,
    GrantRecord,
    Period,
    ResetRecord,
    ceil_time,
    check_metered_meter,
    floor_time,
    metered_run,
    new_id,
    period_of,
    value_at,
)

routes = Routes()

FeatureKey = Annotated[
    str, Meta(min_length=1, max_length=64, pattern=r"^[a-z0-9]+(?:_[a-z0-9]+)*$")
]
Interval = Literal["DAY", "WEEK", "MONTH", "YEAR"]
Duration = Literal["HOUR", "DAY", "WEEK", "MONTH", "YEAR"]
Amount = Annotated[float, Meta(ge=0, le=1e15)]
Priority = Annotated[int, Meta(ge=1, le=255)]


# --- bodies -----------------------------------------------------------------------------------


class FeatureIn(msgspec.Struct):
    """Body of POST /api/v1/features (OpenMeter's FeatureCreateInputs; other fields ignored)."""

    key: FeatureKey
    name: Annotated[str, Meta(min_length=1, max_length=256)]
    meterSlug: str | None = None
    meterGroupByFilters: dict[str, str] | None = None
    metadata: dict[str, str] | None = None


class Feature(msgspec.Struct, omit_defaults=True):
    """A feature (OpenMeter's Feature)."""

    id: str
    key: str
    name: str
    createdAt: datetime
    updatedAt: datetime
    meterSlug: str | None = None
    meterGroupByFilters: dict[str, str] | None = None
    metadata: dict[str, str] | None = None
    archivedAt: datetime | None = None


class PeriodIn(msgspec.Struct):
    """A recurring period: ``interval`` from ``anchor`` (an entitlement's default: its
    ``measureUsageFrom``; a grant's: its ``effectiveAt``)."""

    interval: Interval
    anchor: datetime | None = None


class RecurringPeriod(msgspec.Struct):
    interval: str
    anchor: datetime
    intervalISO: str


class Span(msgspec.Struct, rename={"start": "from", "end": "to"}):
    start: datetime
    end: datetime


class ExpirationIn(msgspec.Struct):
    duration: Duration
    count: Annotated[int, Meta(ge=1, le=1000)]


class IssueIn(msgspec.Struct):
    """v2's ``issue``: a grant of ``amount`` after every reset (``issueAfterReset``)."""

    amount: Amount
    priority: Priority = 1


class EntitlementIn(msgspec.Struct):
    """Body of POST .../entitlements and PUT .../override (OpenMeter's
    EntitlementCreateInputs: metered, boolean or static; other fields ignored).

    ``measureUsageFrom``: ``NOW`` (default), ``CURRENT_PERIOD_START`` or an RFC 3339 time.
    ``usagePeriod`` is required for a metered entitlement, ``config`` (a JSON text) for a
    static one. v2's ``issue`` is ``issueAfterReset`` with its priority, and ``grants`` are
    granted with the entitlement."""

    type: Literal["metered", "boolean", "static"]
    featureKey: str | None = None
    featureId: str | None = None
    metadata: dict[str, str] | None = None
    usagePeriod: PeriodIn | None = None
    measureUsageFrom: str | None = None
    isSoftLimit: bool = False
    issueAfterReset: Amount | None = None
    issueAfterResetPriority: Priority = 1
    preserveOverageAtReset: bool = False
    config: str | None = None
    issue: IssueIn | None = None
    grants: Annotated[list["GrantIn"], Meta(max_length=100)] | None = None


class Entitlement(msgspec.Struct, omit_defaults=True):
    """An entitlement (OpenMeter's EntitlementMetered, EntitlementBoolean or
    EntitlementStatic, by ``type``)."""

    type: str
    id: str
    featureId: str
    featureKey: str
    subjectKey: str
    createdAt: datetime
    updatedAt: datetime
    activeFrom: datetime
    metadata: dict[str, str] | None = None
    config: str | None = None
    usagePeriod: RecurringPeriod | None = None
    currentUsagePeriod: Span | None = None
    lastReset: datetime | None = None
    measureUsageFrom: datetime | None = None
    isSoftLimit: bool | None = None
    issueAfterReset: float | None = None
    issueAfterResetPriority: int | None = None
    preserveOverageAtReset: bool | None = None
    customerId: str | None = None
    customerKey: str | None = None


class GrantIn(msgspec.Struct):
    """Body of POST .../grants (OpenMeter's EntitlementGrantCreateInput). ``effectiveAt`` is
    ceiled to METER_INTERVAL; no ``expiration``: the grant does not expire."""

    amount: Annotated[float, Meta(gt=0, le=1e15)]
    effectiveAt: datetime
    priority: Priority = 1
    expiration: ExpirationIn | None = None
    minRolloverAmount: Amount = 0.0
    maxRolloverAmount: Amount = 0.0
    recurrence: PeriodIn | None = None
    metadata: dict[str, str] | None = None


class Grant(msgspec.Struct, omit_defaults=True):
    """A grant (OpenMeter's EntitlementGrant)."""

    id: str
    entitlementId: str
    amount: float
    priority: int
    effectiveAt: datetime
    minRolloverAmount: float
    maxRolloverAmount: float
    createdAt: datetime
    updatedAt: datetime
    expiration: Expiration | None = None
    expiresAt: datetime | None = None
    recurrence: RecurringPeriod | None = None
    nextRecurrence: datetime | None = None
    voidedAt: datetime | None = None
    metadata: dict[str, str] | None = None


class ResetIn(msgspec.Struct):
    """Body of POST .../reset (OpenMeter's ResetEntitlementUsageInput). ``effectiveAt``
    (default now) is floored to METER_INTERVAL; not in the future, not before the last reset.
    ``retainAnchor`` false (default): the usage periods run from the reset on."""

    effectiveAt: datetime | None = None
    retainAnchor: bool = False
    preserveOverage: bool | None = None


class BalanceWindow(msgspec.Struct):
    """A window of the history (OpenMeter's BalanceHistoryWindow)."""

    period: Span
    usage: float
    balanceAtStart: float


class GrantUsage(msgspec.Struct):
    grantId: str
    usage: float


class BurnDownSegment(msgspec.Struct):
    """A stretch where only usage changed (OpenMeter's GrantBurnDownHistorySegment)."""

    period: Span
    usage: float
    overage: float
    balanceAtStart: float
    grantBalancesAtStart: dict[str, float]
    balanceAtEnd: float
    grantBalancesAtEnd: dict[str, float]
    grantUsages: list[GrantUsage]


class BalanceHistory(msgspec.Struct):
    """OpenMeter's WindowedBalanceHistory."""

    windowedHistory: list[BalanceWindow]
    burndownHistory: list[BurnDownSegment]


_feature_decoder = msgspec.json.Decoder(FeatureIn)
_entitlement_decoder = msgspec.json.Decoder(EntitlementIn)
_grant_decoder = msgspec.json.Decoder(GrantIn)
_reset_decoder = msgspec.json.Decoder(ResetIn)


# --- views ------------------------------------------------------------------------------------


def feature_view(f: FeatureRecord) -> Feature:
    return Feature(**msgspec.structs.asdict(f))


def _recurring(p: Period | None) -> RecurringPeriod | None:
    if p is None:
        return None
    return RecurringPeriod(p.interval, p.anchor, core.iso_interval(p.interval))


def entitlement_view(e: EntitlementRecord, now: datetime | None = None) -> Entitlement:
    now = now or datetime.now(UTC)
    view = Entitlement(
        type=e.type,
        id=e.id,
        featureId=e.featureId,
        featureKey=e.featureKey,
        subjectKey=e.subjectKey,
        createdAt=e.createdAt,
        updatedAt=e.updatedAt,
        activeFrom=e.createdAt,
        metadata=e.metadata,
        config=e.config,
        usagePeriod=_recurring(e.usagePeriod),
        customerId=e.customerId,
        customerKey=e.subjectKey if e.customerId else None,
    )
    if e.type == "metered":
        start, end, last = period_of(e, now)
        view.currentUsagePeriod = Span(start, end)
        view.lastReset = last
        view.measureUsageFrom = e.measureUsageFrom
        view.isSoftLimit = e.isSoftLimit
        view.issueAfterReset = e.issueAfterReset
        view.issueAfterResetPriority = e.issueAfterResetPriority if e.issueAfterReset else None
        view.preserveOverageAtReset = e.preserveOverageAtReset
    elif e.usagePeriod is not None:
        start, end = core.Recurrence(e.usagePeriod.interval, e.usagePeriod.anchor).period(now)
        view.currentUsagePeriod = Span(start, end)
    return view


def grant_view(g: GrantRecord, now: datetime | None = None) -> Grant:
    now = now or datetime.now(UTC)
    following = None
    if g.recurrence is not None:
        rec = core.Recurrence(g.recurrence.interval, g.recurrence.anchor)
        following = rec.nth(rec.index(max(now, g.effectiveAt)) + 1)
        if g.expiresAt is not None and following >= g.expiresAt:
            following = None
    return Grant(
        id=g.id,
        entitlementId=g.entitlementId,
        amount=g.amount,
        priority=g.priority,
        effectiveAt=g.effectiveAt,
        minRolloverAmount=g.minRolloverAmount,
        maxRolloverAmount=g.maxRolloverAmount,
        createdAt=g.createdAt,
        updatedAt=g.updatedAt,
        expiration=g.expiration,
        expiresAt=g.expiresAt,
        recurrence=_recurring(g.recurrence),
        nextRecurrence=following,
        voidedAt=g.voidedAt,
        metadata=g.metadata,
    )


# --- shared steps (the customer paths use them too) --------------------------------------------


def store_of(request: web.Request) -> EntitlementStore:
    return EntitlementStore(request.app[JS], request.app[LAYOUT])


async def visible_subject(request: web.Request, subject: str) -> str:
    """The subject a request may act on: a user token one of its tenant's subjects only
    (routes.tenant_subjects: the tenant, or the subjects of the customer whose key it is);
    any other, known or not, is 404 as an unknown one."""
    subjects = await tenant_subjects(request)
    if subjects is not None and subject not in subjects:
        raise NotFound(f"subject {subject!r} not found", field="subjectIdOrKey")
    return subject


def _step(request: web.Request) -> int:
    return request.app[SETTINGS].interval


def _measure_from(raw: str | None, period: Period, now: datetime, step: int) -> datetime:
    if raw is None or raw == "NOW":
        return floor_time(now, step)
    if raw == "CURRENT_PERIOD_START":
        start, _ = core.Recurrence(period.interval, period.anchor).period(now)
        return start
    try:
        return floor_time(parse_time("measureUsageFrom", raw), step)
    except QueryError:
        raise InvalidInput(
            f"measureUsageFrom: {raw!r} is not NOW, CURRENT_PERIOD_START or an RFC 3339 time",
            field="measureUsageFrom",
        ) from None


async def new_entitlement(
    request: web.Request,
    body: EntitlementIn,
    owner: str,
    customer_id: str | None = None,
) -> EntitlementRecord:
    """A checked entitlement record of ``owner`` (a subject, or a customer's key) from
    ``body``; not stored yet."""
    store = store_of(request)
    wanted = body.featureId or body.featureKey
    if not wanted:
        raise InvalidInput("featureKey or featureId is required", field="featureKey")
    try:
        feature = await store.feature(wanted)
    except NotFound:
        field = "featureKey" if body.featureKey else "featureId"
        raise InvalidInput(f"{field}: no feature {wanted!r}", field=field) from None
    now = datetime.now(UTC)
    step = _step(request)
    period = None
    if body.usagePeriod is not None:
        # No anchor: the periods run from when usage is measured (from now by default).
        anchor = body.usagePeriod.anchor or now
        period = Period(body.usagePeriod.interval, floor_time(anchor.astimezone(UTC), step))
        if body.usagePeriod.anchor is None and body.measureUsageFrom not in (
            None,
            "NOW",
            "CURRENT_PERIOD_START",
        ):
            period.anchor = _measure_from(body.measureUsageFrom, period, now, step)
    record = EntitlementRecord(
        id=new_id(),
        type=body.type,
        subjectKey=owner,
        featureId=feature.id,
        featureKey=feature.key,
        createdAt=now,
        updatedAt=now,
        metadata=body.metadata,
        usagePeriod=period,
        customerId=customer_id,
    )
    if body.type == "static":
        if body.config is None:
            raise InvalidInput("config is required for a static entitlement", field="config")
        try:
            json.loads(body.config)
        except ValueError as exc:
            raise InvalidInput(f"config: not JSON ({exc})", field="config") from None
        record.config = body.config
    if body.type == "metered":
        if period is None:
            raise InvalidInput(
                "usagePeriod is required for a metered entitlement", field="usagePeriod"
            )
        if feature.meterSlug is None:
            raise InvalidInput(
                f"featureKey: feature {feature.key!r} has no meter; a metered entitlement "
                "needs one",
                field="featureKey",
            )
        check_metered_meter(await request.app[METERS].get(feature.meterSlug), feature.key)
        record.measureUsageFrom = _measure_from(body.measureUsageFrom, period, now, step)
        record.isSoftLimit = body.isSoftLimit
        record.issueAfterReset = body.issueAfterReset
        record.issueAfterResetPriority = body.issueAfterResetPriority
        if body.issue is not None:
            record.issueAfterReset = body.issue.amount
            record.issueAfterResetPriority = body.issue.priority
        record.preserveOverageAtReset = body.preserveOverageAtReset
    return record


async def new_grant(request: web.Request, ent: EntitlementRecord, body: GrantIn) -> GrantRecord:
    if ent.type != "metered":
        raise InvalidInput(
            f"entitlement {ent.id} is {ent.type}: only a metered entitlement takes grants",
            field="entitlementIdOrFeatureKey",
        )
    if body.maxRolloverAmount < body.minRolloverAmount:
        raise InvalidInput(
            "maxRolloverAmount: must be at least minRolloverAmount", field="maxRolloverAmount"
        )
    now = datetime.now(UTC)
    step = _step(request)
    effective = ceil_time(body.effectiveAt.astimezone(UTC), step)
    _, _, last = period_of(ent, now)
    if ent.resets and effective < last:
        raise InvalidInput(
            f"effectiveAt: {effective:%Y-%m-%dT%H:%M:%SZ} is before the entitlement's last "
            f"reset ({last:%Y-%m-%dT%H:%M:%SZ})",
            field="effectiveAt",
        )
    expires = None
    if body.expiration is not None:
        expires = core.expires_at(effective, body.expiration.duration, body.expiration.count)
    recurrence = None
    if body.recurrence is not None:
        anchor = body.recurrence.anchor or effective
        recurrence = Period(body.recurrence.interval, floor_time(anchor.astimezone(UTC), step))
    return GrantRecord(
        id=new_id(),
        entitlementId=ent.id,
        amount=body.amount,
        priority=body.priority,
        effectiveAt=effective,
        createdAt=now,
        updatedAt=now,
        expiration=(
            Expiration(body.expiration.duration, body.expiration.count) if body.expiration else None
        ),
        expiresAt=expires,
        minRolloverAmount=body.minRolloverAmount,
        maxRolloverAmount=body.maxRolloverAmount,
        recurrence=recurrence,
        metadata=body.metadata,
    )


async def reset_entitlement(
    request: web.Request, ent: EntitlementRecord, body: ResetIn
) -> EntitlementRecord:
    if ent.type != "metered":
        raise InvalidInput(
            f"entitlement {ent.id} is {ent.type}: only a metered entitlement is reset",
            field="entitlementId",
        )
    now = datetime.now(UTC)
    at = floor_time((body.effectiveAt or now).astimezone(UTC), _step(request))
    if at > now:
        raise InvalidInput("effectiveAt: a reset cannot be in the future", field="effectiveAt")
    reset = ResetRecord(at, body.retainAnchor, body.preserveOverage)

    def add(current: EntitlementRecord) -> EntitlementRecord:
        assert current.measureUsageFrom is not None
        latest = max([r.at for r in current.resets], default=current.measureUsageFrom)
        if at <= latest:
            raise InvalidInput(
                f"effectiveAt: {at:%Y-%m-%dT%H:%M:%SZ} is not after the last reset or the "
                f"start of measurement ({latest:%Y-%m-%dT%H:%M:%SZ})",
                field="effectiveAt",
            )
        return msgspec.structs.replace(current, resets=[*current.resets, reset], updatedAt=now)

    return await store_of(request).change_entitlement(ent, add)


def time_param(request: web.Request, name: str) -> datetime | None:
    value = request.query.get(name)
    if value is None:
        return None
    try:
        return parse_time(name, value)
    except QueryError as exc:
        raise InvalidInput(str(exc), field=exc.field) from None


async def entitlement_value(
    request: web.Request, ent: EntitlementRecord, subjects: list[str] | None = None
) -> EntitlementValue:
    return await value_at(
        request.app[JS],
        request.app[SETTINGS],
        ent,
        time_param(request, "time"),
        subjects=subjects,
        budget=read_budget(request),
        wire=await request.app[LEAN].wire(),
    )


_WINDOWS = ("HOUR", "DAY", "MONTH")
MAX_HISTORY_WINDOWS = 1000


def history_edges(start: datetime, end: datetime, size: str, tz: ZoneInfo) -> list[datetime]:
    """Window edges from the window holding ``start`` (in ``tz``) to ``end``: whole windows,
    the last cut at ``end``."""
    local = start.astimezone(tz)
    if size == "HOUR":
        first = local.replace(minute=0, second=0, microsecond=0)
    elif size == "DAY":
        first = local.replace(hour=0, minute=0, second=0, microsecond=0)
    else:
        first = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    edges = []
    k = 0
    while True:
        if size == "MONTH":
            edge = core.add_interval(first.replace(tzinfo=None), "MONTH", k).replace(tzinfo=tz)
        elif size == "DAY":
            edge = (first.replace(tzinfo=None) + timedelta(days=k)).replace(tzinfo=tz)
        else:
            edge = first + timedelta(hours=k)
        edge = edge.astimezone(UTC)
        if edge >= end:
            break
        edges.append(edge)
        k += 1
        if len(edges) > MAX_HISTORY_WINDOWS:
            raise InvalidInput(
                f"from: more than {MAX_HISTORY_WINDOWS} {size} windows; narrow from/to or ask "
                "for a larger windowSize",
                field="from",
            )
    return [*edges, end]


async def entitlement_history(
    request: web.Request, ent: EntitlementRecord, subjects: list[str] | None = None
) -> BalanceHistory:
    """The windowed usage and balance, and the burn-down segments, from ``from`` (default
    the current usage period's start) to ``to`` (default now)."""
    if ent.type != "metered":
        raise InvalidInput(
            f"entitlement {ent.id} is {ent.type}: only a metered one has a history",
            field="entitlementId",
        )
    size = request.query.get("windowSize", "")
    if size.upper() not in _WINDOWS:
        raise InvalidInput(f"windowSize: {size!r} is not HOUR, DAY or MONTH", field="windowSize")
    size = size.upper()
    name = request.query.get("windowTimeZone") or "UTC"
    try:
        tz = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput(
            f"windowTimeZone: {name!r} is not an IANA time zone", field="windowTimeZone"
        ) from None
    step = _step(request)
    now = datetime.now(UTC)
    end = ceil_time(time_param(request, "to") or now, step)
    start = time_param(request, "from")
    if start is None:
        start, _, _ = period_of(ent, now)
    if start >= end:
        raise InvalidInput("from: must be before to", field="from")
    edges = history_edges(start, end, size, tz)
    store = store_of(request)
    feature = await store.feature(ent.featureId, include_archived=True)
    if feature.meterSlug is None:
        raise InvalidInput(f"feature {feature.key!r} has no meter", field="featureKey")
    meter = await request.app[METERS].get(feature.meterSlug)
    budget = read_budget(request)
    result = await metered_run(
        request.app[JS],
        request.app[SETTINGS],
        meter,
        feature,
        ent,
        await store.grants(ent.id, budget=budget),
        end,
        subjects=subjects,
        splits=edges,
        budget=budget,
        wire=await request.app[LEAN].wire(),
    )
    windows = [
        BalanceWindow(Span(w.start, w.end), w.usage, w.balance_at_start)
        for w in core.windowed(result, edges)
    ]
    segments = [
        BurnDownSegment(
            period=Span(s.start, s.end),
            usage=s.usage,
            overage=s.overage,
            balanceAtStart=s.balance_at_start,
            grantBalancesAtStart=s.grant_balances_at_start,
            balanceAtEnd=s.balance_at_end,
            grantBalancesAtEnd=s.grant_balances_at_end,
            grantUsages=[GrantUsage(u.grant_id, u.usage) for u in s.grant_usages],
        )
        for s in result.segments
        if s.end > edges[0] and s.start < end
    ]
    return BalanceHistory(windowedHistory=windows, burndownHistory=segments)


async def create_with_grants(
    request: web.Request, body: EntitlementIn, owner: str, customer_id: str | None = None
) -> EntitlementRecord:
    """A new entitlement from ``body``, stored, with the grants it names (checked first)."""
    record = await new_entitlement(request, body, owner, customer_id)
    grants = [await new_grant(request, record, g) for g in body.grants or []]
    store = store_of(request)
    created = await store.create_entitlement(record)
    for grant in grants:
        await store.create_grant(grant)
    return created


async def override_entitlement(
    request: web.Request,
    owner: str,
    existing: EntitlementRecord,
    body: EntitlementIn,
    customer_id: str | None = None,
) -> EntitlementRecord:
    """``existing`` replaced by a new entitlement from ``body`` (its grants go with it)."""
    record = await new_entitlement(request, body, owner, customer_id)
    grants = [await new_grant(request, record, g) for g in body.grants or []]
    store = store_of(request)
    await store.delete_entitlement(existing)
    created = await store.create_entitlement(record)
    for grant in grants:
        await store.create_grant(grant)
    return created


# --- features ---------------------------------------------------------------------------------

FEATURE_PATH = ("the feature's id or key",)


@routes.get(
    "/api/v1/features",
    access=USER,
    tenant=NO_TENANT_DATA,
    op=Op(
        "List features (OpenMeter)",
        "entitlements",
        response=array(ref("Feature")),
        query=(
            Param("meterSlug", array(STR), "only features of these meters"),
            Param("includeArchived", {"type": "boolean"}, "deleted features too"),
        ),
    ),
)
async def list_features(request: web.Request) -> web.Response:
    archived = request.query.get("includeArchived", "false").lower() == "true"
    slugs = set(request.query.getall("meterSlug", []))
    found = await store_of(request).features(include_archived=archived)
    return json_response([feature_view(f) for f in found if not slugs or f.meterSlug in slugs])


@routes.post(
    "/api/v1/features",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Create a feature (OpenMeter)",
        "entitlements",
        status=201,
        response=ref("Feature"),
        body=ref("FeatureIn"),
        errors=(400, 409),
        description="meterSlug names an existing meter; meterGroupByFilters its groups.",
    ),
)
async def create_feature(request: web.Request) -> web.Response:
    body = decode_body(await request.read(), _feature_decoder)
    if body.meterSlug is not None:
        try:
            meter = await request.app[METERS].get(body.meterSlug)
        except NotFound:
            raise InvalidInput(
                f"meterSlug: no meter {body.meterSlug!r}", field="meterSlug"
            ) from None
        for group in body.meterGroupByFilters or {}:
            if group not in meter.groupBy:
                raise InvalidInput(
                    f"meterGroupByFilters: meter {meter.id!r} has no group {group!r}",
                    field="meterGroupByFilters",
                )
    elif body.meterGroupByFilters:
        raise InvalidInput(
            "meterGroupByFilters: only with a meterSlug", field="meterGroupByFilters"
        )
    now = datetime.now(UTC)
    record = FeatureRecord(
        id=new_id(),
        key=body.key,
        name=body.name,
        createdAt=now,
        updatedAt=now,
        meterSlug=body.meterSlug,
        meterGroupByFilters=body.meterGroupByFilters,
        metadata=body.metadata,
    )
    created = await store_of(request).create_feature(record)
    return json_response(feature_view(created), status=201)


@routes.get(
    "/api/v1/features/{featureId}",
    access=USER,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Get a feature (OpenMeter)",
        "entitlements",
        response=ref("Feature"),
        path=FEATURE_PATH,
        errors=(404,),
    ),
)
async def get_feature(request: web.Request) -> web.Response:
    feature = await store_of(request).feature(request.match_info["featureId"], True)
    return json_response(feature_view(feature))


@routes.delete(
    "/api/v1/features/{featureId}",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Delete (archive) a feature (OpenMeter)",
        "entitlements",
        status=204,
        path=FEATURE_PATH,
        errors=(404,),
        description="The feature is archived: its entitlements keep it, a new feature may "
        "take its key.",
    ),
)
async def delete_feature(request: web.Request) -> web.Response:
    await store_of(request).archive_feature(request.match_info["featureId"], datetime.now(UTC))
    return web.Response(status=204)


# --- entitlements and grants: every subject's ---------------------------------------------------

_LIST_PARAMS = (
    Param("feature", array(STR), "only these features (keys or ids)"),
    Param("subject", array(STR), "only these subjects"),
    Param("entitlementType", array({"enum": ["metered", "boolean", "static"]}), "only these types"),
)


@routes.get(
    "/api/v1/entitlements",
    access=USER,
    tenant=CALLER,
    op=Op(
        "List entitlements (OpenMeter)",
        "entitlements",
        response=array(ref("Entitlement")),
        query=_LIST_PARAMS,
        description="Every subject's for an admin; a user token: its own subject's.",
    ),
)
async def list_entitlements(request: web.Request) -> web.Response:
    scope = await tenant_subjects(request)
    subjects = request.query.getall("subject", [])
    if scope is not None:
        subjects = [s for s in subjects or scope if s in scope]
        if not subjects:
            return json_response([])
    found = await store_of(request).entitlements(subjects or None, budget=read_budget(request))
    features = set(request.query.getall("feature", []))
    types = set(request.query.getall("entitlementType", []))
    now = datetime.now(UTC)
    return json_response(
        [
            entitlement_view(e, now)
            for e in found
            if (not features or features & {e.featureKey, e.featureId})
            and (not types or e.type in types)
        ]
    )


ENTITLEMENT_PATH = ("the entitlement's id",)


@routes.get(
    "/api/v1/entitlements/{entitlementId}",
    access=USER,
    tenant=CALLER,
    op=Op(
        "Get an entitlement (OpenMeter)",
        "entitlements",
        response=ref("Entitlement"),
        path=ENTITLEMENT_PATH,
        errors=(404,),
    ),
)
async def get_any_entitlement(request: web.Request) -> web.Response:
    ent = await store_of(request).entitlement(None, request.match_info["entitlementId"])
    await visible_subject(request, ent.subjectKey)
    return json_response(entitlement_view(ent))


@routes.get(
    "/api/v1/grants",
    access=ADMIN,
    tenant=CALLER,
    op=Op(
        "List grants (OpenMeter)",
        "entitlements",
        response=array(ref("Grant")),
        query=(
            Param("feature", array(STR), "only grants of these features (keys or ids)"),
            Param("subject", array(STR), "only grants of these subjects"),
            Param("includeDeleted", {"type": "boolean"}, "voided grants too"),
        ),
    ),
)
async def list_grants(request: web.Request) -> web.Response:
    store = store_of(request)
    budget = read_budget(request)
    subjects = request.query.getall("subject", [])
    features = set(request.query.getall("feature", []))
    voided = request.query.get("includeDeleted", "false").lower() == "true"
    wanted = {
        e.id
        for e in await store.entitlements(subjects or None, budget=budget)
        if not features or features & {e.featureKey, e.featureId}
    }
    now = datetime.now(UTC)
    return json_response(
        [
            grant_view(g, now)
            for g in await store.grants(budget=budget)
            if g.entitlementId in wanted and (voided or g.voidedAt is None)
        ]
    )


@routes.delete(
    "/api/v1/grants/{grantId}",
    access=ADMIN,
    tenant=CALLER,
    op=Op(
        "Void a grant (OpenMeter)",
        "entitlements",
        status=204,
        path=("the grant's id",),
        query=(Param("at", TIME, "when it is voided (default now)"),),
        errors=(400, 404),
        description="From then on the grant holds nothing; what it held is lost.",
    ),
)
async def void_grant(request: web.Request) -> web.Response:
    store = store_of(request)
    grant = await store.grant(request.match_info["grantId"])
    at = time_param(request, "at") or datetime.now(UTC)
    await store.void_grant(grant, ceil_time(at, _step(request)))
    return web.Response(status=204)


# --- a subject's entitlements -------------------------------------------------------------------

SUBJECT = "the subject's key"
ENT_OR_FEATURE = "the entitlement's id, or its feature's key"


async def _subject(request: web.Request) -> str:
    return await visible_subject(request, request.match_info["subjectIdOrKey"])


async def _subject_entitlement(request: web.Request, name: str) -> EntitlementRecord:
    subject = await _subject(request)
    return await store_of(request).entitlement(subject, request.match_info[name])


@routes.post(
    "/api/v1/subjects/{subjectIdOrKey}/entitlements",
    access=ADMIN,
    tenant=CALLER,
    op=Op(
        "Create a subject's entitlement (OpenMeter)",
        "entitlements",
        status=201,
        response=ref("Entitlement"),
        path=(SUBJECT,),
        body=ref("EntitlementIn"),
        errors=(400, 404, 409),
        description="One entitlement per subject and feature (409 otherwise: override it).",
    ),
)
async def create_entitlement(request: web.Request) -> web.Response:
    subject = await _subject(request)
    body = decode_body(await request.read(), _entitlement_decoder)
    created = await create_with_grants(request, body, subject)
    return json_response(entitlement_view(created), status=201)


@routes.get(
    "/api/v1/subjects/{subjectIdOrKey}/entitlements",
    access=USER,
    tenant=CALLER,
    op=Op(
        "List a subject's entitlements (OpenMeter)",
        "entitlements",
        response=array(ref("Entitlement")),
        path=(SUBJECT,),
        errors=(404,),
    ),
)
async def list_subject_entitlements(request: web.Request) -> web.Response:
    subject = await _subject(request)
    found = await store_of(request).entitlements([subject], budget=read_budget(request))
    now = datetime.now(UTC)
    return json_response([entitlement_view(e, now) for e in found])


@routes.get(
    "/api/v1/subjects/{subjectIdOrKey}/entitlements/{entitlementId}",
    access=USER,
    tenant=CALLER,
    op=Op(
        "Get a subject's entitlement (OpenMeter)",
        "entitlements",
        response=ref("Entitlement"),
        path=(SUBJECT, ENT_OR_FEATURE),
        errors=(404,),
    ),
)
async def get_entitlement(request: web.Request) -> web.Response:
    return json_response(entitlement_view(await _subject_entitlement(request, "entitlementId")))


@routes.delete(
    "/api/v1/subjects/{subjectIdOrKey}/entitlements/{entitlementId}",
    access=ADMIN,
    tenant=CALLER,
    op=Op(
        "Delete a subject's entitlement (OpenMeter)",
        "entitlements",
        status=204,
        path=(SUBJECT, ENT_OR_FEATURE),
        errors=(404,),
        description="The entitlement and its grants.",
    ),
)
async def delete_entitlement(request: web.Request) -> web.Response:
    ent = await _subject_entitlement(request, "entitlementId")
    await store_of(request).delete_entitlement(ent)
    return web.Response(status=204)


@routes.put(
    "/api/v1/subjects/{subjectIdOrKey}/entitlements/{entitlementIdOrFeatureKey}/override",
    access=ADMIN,
    tenant=CALLER,
    op=Op(
        "Override a subject's entitlement (OpenMeter)",
        "entitlements",
        status=201,
        response=ref("Entitlement"),
        path=(SUBJECT, ENT_OR_FEATURE),
        body=ref("EntitlementIn"),
        errors=(400, 404, 409),
        description="The entitlement is replaced by a new one (its grants and resets go).",
    ),
)
async def override_subject_entitlement(request: web.Request) -> web.Response:
    existing = await _subject_entitlement(request, "entitlementIdOrFeatureKey")
    body = decode_body(await request.read(), _entitlement_decoder)
    created = await override_entitlement(request, existing.subjectKey, existing, body)
    return json_response(entitlement_view(created), status=201)


@routes.get(
    "/api/v1/subjects/{subjectIdOrKey}/entitlements/{entitlementIdOrFeatureKey}/grants",
    access=USER,
    tenant=CALLER,
    op=Op(
        "List an entitlement's grants (OpenMeter)",
        "entitlements",
        response=array(ref("Grant")),
        path=(SUBJECT, ENT_OR_FEATURE),
        query=(Param("includeDeleted", {"type": "boolean"}, "voided grants too"),),
        errors=(404,),
    ),
)
async def list_entitlement_grants(request: web.Request) -> web.Response:
    ent = await _subject_entitlement(request, "entitlementIdOrFeatureKey")
    voided = request.query.get("includeDeleted", "false").lower() == "true"
    found = await store_of(request).grants(ent.id, budget=read_budget(request))
    now = datetime.now(UTC)
    return json_response([grant_view(g, now) for g in found if voided or g.voidedAt is None])


@routes.post(
    "/api/v1/subjects/{subjectIdOrKey}/entitlements/{entitlementIdOrFeatureKey}/grants",
    access=ADMIN,
    tenant=CALLER,
    op=Op(
        "Grant usage to an entitlement (OpenMeter)",
        "entitlements",
        status=201,
        response=ref("Grant"),
        path=(SUBJECT, ENT_OR_FEATURE),
        body=ref("GrantIn"),
        errors=(400, 404),
    ),
)
async def create_entitlement_grant(request: web.Request) -> web.Response:
    ent = await _subject_entitlement(request, "entitlementIdOrFeatureKey")
    body = decode_body(await request.read(), _grant_decoder)
    grant = await store_of(request).create_grant(await new_grant(request, ent, body))
    return json_response(grant_view(grant), status=201)


VALUE_PARAMS = (
    Param("time", TIME, "the value at this time (default now; usage to the end of its minute)"),
)


@routes.get(
    "/api/v1/subjects/{subjectIdOrKey}/entitlements/{entitlementIdOrFeatureKey}/value",
    access=USER,
    tenant=CALLER,
    op=Op(
        "An entitlement's value: access, balance, usage, overage (OpenMeter)",
        "entitlements",
        response=ref("EntitlementValue"),
        path=(SUBJECT, ENT_OR_FEATURE),
        query=VALUE_PARAMS,
        errors=(400, 404),
    ),
)
async def get_entitlement_value(request: web.Request) -> web.Response:
    ent = await _subject_entitlement(request, "entitlementIdOrFeatureKey")
    return json_response(await entitlement_value(request, ent))


HISTORY_PARAMS = (
    Param("windowSize", {"enum": list(_WINDOWS)}, "window size", required=True),
    Param("from", TIME, "start (default: the current usage period's start)"),
    Param("to", TIME, "end (default now)"),
    Param("windowTimeZone", description="IANA time zone of the windows (default UTC)"),
)


@routes.get(
    "/api/v1/subjects/{subjectIdOrKey}/entitlements/{entitlementId}/history",
    access=USER,
    tenant=CALLER,
    op=Op(
        "An entitlement's usage and balance by window, and its burn-down (OpenMeter)",
        "entitlements",
        response=ref("BalanceHistory"),
        path=(SUBJECT, ENT_OR_FEATURE),
        query=HISTORY_PARAMS,
        errors=(400, 404),
    ),
)
async def get_entitlement_history(request: web.Request) -> web.Response:
    ent = await _subject_entitlement(request, "entitlementId")
    return json_response(await entitlement_history(request, ent))


@routes.post(
    "/api/v1/subjects/{subjectIdOrKey}/entitlements/{entitlementId}/reset",
    access=ADMIN,
    tenant=CALLER,
    op=Op(
        "Reset an entitlement's usage (OpenMeter)",
        "entitlements",
        status=204,
        path=(SUBJECT, ENT_OR_FEATURE),
        body=ref("ResetIn"),
        body_required=False,
        errors=(400, 404),
        description="Usage starts again from the reset; grants roll over; overage is "
        "forgiven unless preserved.",
    ),
)
async def reset_subject_entitlement(request: web.Request) -> web.Response:
    ent = await _subject_entitlement(request, "entitlementId")
    body = decode_body(await request.read() or b"{}", _reset_decoder)
    await reset_entitlement(request, ent, body)
    return web.Response(status=204)
