"""Usage alerts, detected by the worker in the round that crosses a threshold.

The runner calls :meth:`Alerter.after_round` when a round's keys (readings and summaries)
are stored and before its checkpoint is written, with the (meter, subject) pairs the rounds
since the last checkpoint touched, as meter id -> subjects. For each enabled
``entitlements.balance.threshold`` rule that applies, the standing of the subject's usage
(:class:`UsageSource`) is compared with the rule's thresholds (core.alerts) and each
threshold reached makes its event, created under its one id with a create-if-absent, and a
delivery per channel of the rule.

Crashes: a worker that dies after storing a round but before the events exist has not
written the round's checkpoint, so the round is read again, folds nothing new, touches the
same pairs, and the events are made from the stored usage; an event already there is left
as it is. So each (rule, subject, period, threshold) has exactly one event.
"""

import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec
import structlog
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError as NoStream

from kloudmeter_py.config import Settings
from kloudmeter_py.core.alerts import (
    BALANCE_THRESHOLD,
    RESET,
    Standing,
    Threshold,
    crossed,
    reset_event_id,
    threshold_event_id,
)
from kloudmeter_py.core.models import Meter
from kloudmeter_py.core.windows import QueryError
from kloudmeter_py.errors import InvalidInput, NotFound
from kloudmeter_py.store.alerts import AlertStore, Rule, StoredEvent, now, rule_view
from kloudmeter_py.store.entitlements import EntitlementStore, metered_run, usage_subjects
from kloudmeter_py.store.layout import Layout
from kloudmeter_py.store.meters import MeterRegistry

log = structlog.get_logger(__name__)

# Rules are read again at most this often (a rule made meanwhile fires at the next round).
_RULES_FOR_S = 1.0


@dataclass(frozen=True)
class Found:
    """A subject's standing on one feature: what alerts compare with thresholds, and what
    their payload shows (the entitlement and its value, in OpenMeter's shapes)."""

    feature: str
    standing: Standing
    value: dict[str, Any]
    entitlement: dict[str, Any] | None = None
    feature_view: dict[str, Any] = field(default_factory=dict)
    resets: tuple[datetime, ...] = ()  # the entitlement's manual resets

    @property
    def feature_id(self) -> str:
        return str(self.feature_view.get("id", self.feature))


class UsageSource(Protocol):
    """Where a subject's standing on the features of a meter comes from."""

    async def prepare(self) -> None:
        """Called once before the pairs of a round are looked at."""

    def holders(self, meter_id: str, subject: str) -> set[str]:
        """The subject keys holding entitlements that ``subject``'s usage of the meter
        counts for: its own, and the key of the customer owning it."""

    async def standings(self, meter: Meter, holder: str, at: datetime) -> list[Found]: ...


def month_start(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


class Entitled:
    """The standing of a subject on each of its metered entitlements whose feature counts
    the meter: its usage in the current usage period and what its grants make available
    there (store.entitlements.metered_run: the burn-down over the window summaries), so
    PERCENT thresholds are shares of the grants.

    Cost, while rules exist: per check, the last sequences of the features and entitlements
    buckets (which subjects have metered entitlements of which meter is read again only when
    one of them moved); then, for each (meter, subject) a round touched that has one, a
    listing of the subject's entitlements, and for each one counting the meter its feature,
    grants and one summary read per stretch of its burn-down. Subjects without entitlements
    cost nothing more."""

    def __init__(self, js: JetStreamContext, settings: Settings) -> None:
        self.js = js
        self.settings = settings
        self.layout = Layout(settings)
        self.store = EntitlementStore(js, self.layout)
        self._seen: tuple[int, ...] | None = None
        # meter -> subject whose usage counts -> the subject keys holding such entitlements
        # (the subject itself, or the key of the customer owning it: usage_subjects)
        self._by_meter: dict[str, dict[str, set[str]]] = {}
        self._usage: dict[str, list[str]] = {}  # entitlement id -> whose usage it counts

    async def prepare(self) -> None:
        """Read which subjects have metered entitlements of which meter again, when the
        features or entitlements changed since it was last read."""
        seqs = []
        buckets = (
            self.layout.features_bucket,
            self.layout.entitlements_bucket,
            self.layout.customers_bucket,  # a customer's subjects count for its entitlements
        )
        for bucket in buckets:
            try:
                info = await self.js.stream_info(f"KV_{bucket}")
            except NoStream:  # set up before entitlements: none yet
                self._by_meter, self._seen = {}, None
                return
            seqs.append(int(info.state.last_seq or 0))
        seen = tuple(seqs)
        if seen != self._seen:
            meters = {f.id: f.meterSlug for f in await self.store.features(include_archived=True)}
            by_meter: dict[str, dict[str, set[str]]] = {}
            usage: dict[str, list[str]] = {}
            for e in await self.store.entitlements():
                counted = meters.get(e.featureId)
                if e.type == "metered" and counted is not None:
                    by_subject = by_meter.setdefault(counted, {})
                    usage[e.id] = await usage_subjects(self.js, self.layout, e)
                    for subject in usage[e.id]:
                        by_subject.setdefault(subject, set()).add(e.subjectKey)
            self._by_meter, self._usage, self._seen = by_meter, usage, seen

    def holders(self, meter_id: str, subject: str) -> set[str]:
        return self._by_meter.get(meter_id, {}).get(subject, set())

    async def standings(self, meter: Meter, holder: str, at: datetime) -> list[Found]:
        """The standings of ``holder``'s metered entitlements of the meter, each over the
        usage of the subjects it counts (read by ``prepare``)."""
        out: list[Found] = []
        for ent in await self.store.entitlements([holder]):
            if ent.type != "metered" or ent.subjectKey != holder:
                continue
            feature = await self.store.feature(ent.featureId, include_archived=True)
            if feature.meterSlug != meter.id:
                continue
            grants = await self.store.grants(ent.id)
            run = await metered_run(
                self.js,
                self.settings,
                meter,
                feature,
                ent,
                grants,
                at,
                subjects=self._usage.get(ent.id),
            )
            v = run.value
            value = {
                "hasAccess": v.has_access,
                "balance": v.balance,
                "usage": v.usage,
                "overage": v.overage,
                "totalAvailableGrantAmount": v.total_available_grant_amount,
            }
            standing = Standing(v.period_start, v.usage, v.total_available_grant_amount)
            out.append(
                Found(
                    feature.key,
                    standing,
                    value,
                    entitlement=msgspec.to_builtins(ent),
                    feature_view=msgspec.to_builtins(feature),
                    resets=tuple(r.at for r in ent.resets),
                )
            )
        return out


class Alerter:
    """Makes the threshold and reset events of the (meter, subject) pairs a round touched."""

    def __init__(self, store: AlertStore, registry: MeterRegistry, usage: UsageSource) -> None:
        self.store = store
        self.registry = registry
        self.usage = usage
        self._rules: list[Rule] = []
        self._rules_at = -_RULES_FOR_S
        # The last standing seen per (rule, subject, feature), and the events known to exist:
        # both only spare work (an event made twice is refused by its id).
        self._last: dict[tuple[str, str, str, str], Standing] = {}
        self._made: set[str] = set()
        self.created = 0  # events this worker created (tests, logs)

    async def rules(self) -> list[Rule]:
        if time.monotonic() - self._rules_at >= _RULES_FOR_S:
            every = await self.store.rules()
            kinds = (BALANCE_THRESHOLD, RESET)
            self._rules = [r for r in every if r.type in kinds and not r.disabled]
            self._rules_at = time.monotonic()
        return self._rules

    async def after_round(self, touched: Mapping[str, Collection[str]]) -> None:
        """Make the events of the thresholds the touched (meter id -> subjects) reach (see
        the module doc)."""
        if not any(touched.values()):
            return
        rules = await self.rules()
        if not rules:
            return
        at = datetime.now(UTC)
        await self.usage.prepare()
        # Each holder once: a customer's subjects touched together make one valuation.
        pairs = {
            (meter_id, holder)
            for meter_id, subjects in touched.items()
            for touched_subject in subjects
            for holder in self.usage.holders(meter_id, touched_subject)
        }
        for meter_id, subject in sorted(pairs):
            cm = self.registry.by_id.get(meter_id)
            if cm is None:
                continue
            try:
                standings = await self.usage.standings(cm.meter, subject, at)
            except (InvalidInput, NotFound, QueryError) as exc:
                # What the stored entitlements say cannot be valued (a bad record): no
                # alert for it, rather than a round that never completes.
                log.error("alert.standing_failed", meter=meter_id, subject=subject, error=str(exc))
                continue
            for found in standings:
                for rule in rules:
                    if rule.features and not {found.feature, found.feature_id} & set(rule.features):
                        continue
                    if rule.type == RESET:
                        await self._check_resets(rule, subject, found, at)
                    else:
                        await self._check(rule, subject, found)

    async def _make(self, ev: StoredEvent, rule: Rule) -> None:
        """Create ``ev`` unless it exists, and its deliveries."""
        made = await self.store.create_event(ev)
        await self.store.open_deliveries(ev.id, rule.channels)
        self._made.add(ev.id)
        if made:
            self.created += 1
            log.info("alert.created", notification=ev.id, rule=rule.id, subject=ev.subject)

    async def _check_resets(self, rule: Rule, subject: str, found: Found, at: datetime) -> None:
        """One ``entitlements.reset`` event per manual reset made since the rule exists,
        noticed at the subject's next usage after it."""
        ent_id = str((found.entitlement or {}).get("id", found.feature))
        for reset_at in found.resets:
            # Resets from the minute the rule was made (resets fall on minutes).
            since = rule.createdAt.replace(second=0, microsecond=0)
            if not since <= reset_at <= at:
                continue
            eid = reset_event_id(rule.id, subject, ent_id, reset_at)
            if eid not in self._made:
                await self._make(self._event(eid, rule, subject, found, None), rule)

    async def _check(self, rule: Rule, subject: str, found: Found) -> None:
        key = (rule.id, rule.updatedAt.isoformat(), subject, found.feature)
        thresholds = [Threshold(t.type, t.value) for t in rule.thresholds]
        for t in crossed(thresholds, self._last.get(key), found.standing):
            eid = threshold_event_id(rule.id, subject, found.standing.period_start, t)
            if eid not in self._made:
                await self._make(self._event(eid, rule, subject, found, t), rule)
        self._last[key] = found.standing

    @staticmethod
    def _event(
        eid: str, rule: Rule, subject: str, found: Found, t: Threshold | None
    ) -> StoredEvent:
        """The event of threshold ``t``, or (None) of a reset."""
        created = now()
        data: dict[str, Any] = {
            "entitlement": found.entitlement,
            "feature": found.feature_view or {"id": found.feature, "key": found.feature},
            "subject": {"key": subject},
            "value": found.value,
        }
        if t is not None:
            data["threshold"] = {"value": t.value, "type": t.type}
        kind = BALANCE_THRESHOLD if t is not None else RESET
        return StoredEvent(
            id=eid,
            type=kind,
            createdAt=created,
            ruleId=rule.id,
            subject=subject,
            feature=found.feature,
            channels=list(rule.channels),
            rule=rule_view(rule),
            payload={"id": eid, "type": kind, "timestamp": created, "data": data},
        )
