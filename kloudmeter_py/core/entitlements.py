"""Entitlements, pure: usage periods, grants burnt down by priority then expiry, resets with
rollover, and an entitlement's value (balance, usage, overage, access) at a time.

The one function to call is :func:`evaluate` (or :func:`run` for the segment history)::

    segments = usage_segments(ent, grants, resets, at)      # [(start, end), ...] to measure
    usage = {s: <the meter's usage in [start, end)> for s in segments}
    value = evaluate(ent, grants, resets, at, usage)        # Value(balance, usage, ...)

What happens on the timeline, from ``ent.measure_from`` up to ``at`` (as OpenMeter's credit
engine documents it):

- **Grants** are active from ``effective_at`` until they expire or are voided (whichever is
  first); a grant that becomes active holds its ``amount``; one that stops holds nothing, and
  what it held is lost. A recurring grant is refilled to its amount at each recurrence.
- **Burn-down**: the usage of each segment, plus any overage still owed in the usage period,
  is taken from the active grants with a balance, in order: lower ``priority`` number first,
  then the earliest expiry (no expiry last), then the earliest created, then the id. What no
  grant covers is **overage**; a grant that becomes active later in the period pays it off.
- **Resets**: at each usage period boundary (``usage_period``: DAY, WEEK, MONTH or YEAR from
  its anchor) and at each manual reset, the period's usage starts again from 0 and every
  active grant rolls over: ``min(max_rollover, max(balance, min_rollover))`` (both 0 by
  default: an unused balance is lost). ``issue_after_reset`` is a grant of that amount issued
  at the start and after every reset (priority ``issue_priority``, no rollover). Overage is
  forgiven at a reset unless ``preserve_overage`` (the entitlement's, or the reset's own):
  then it is burnt from the balances after the reset. A manual reset that does not retain
  the anchor moves the anchor of the periods after it to the reset's time.
- **Value at ``at``**: ``balance`` is what the grants active at ``at`` hold (never negative);
  ``usage`` is the usage since the last reset; ``overage`` what is owed; ``has_access`` is
  ``balance > 0``, or always for a soft limit.

Month and year periods step from the anchor by calendar months in UTC, the day clamped to
the month's last (an anchor on Jan 31: Feb 28 or 29, Mar 31, Apr 30, ...). Arithmetic is in
``Decimal`` (from each float's shortest repr), so 0.1 + 0.2 burns exactly 0.3.
"""

import calendar
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import pairwise

PERIODS = ("DAY", "WEEK", "MONTH", "YEAR")  # usage periods and recurrences
DURATIONS = ("HOUR", "DAY", "WEEK", "MONTH", "YEAR")  # grant expirations
_ISO = {"HOUR": "PT1H", "DAY": "P1D", "WEEK": "P1W", "MONTH": "P1M", "YEAR": "P1Y"}
_ZERO = Decimal(0)


def iso_interval(interval: str) -> str:
    """The ISO 8601 duration of one interval (OpenMeter's ``intervalISO``)."""
    return _ISO[interval]


def add_interval(t: datetime, interval: str, n: int = 1) -> datetime:
    """``t`` plus ``n`` intervals (``n`` may be negative); months clamp the day."""
    if interval == "HOUR":
        return t + timedelta(hours=n)
    if interval == "DAY":
        return t + timedelta(days=n)
    if interval == "WEEK":
        return t + timedelta(weeks=n)
    months = n * (12 if interval == "YEAR" else 1)
    if interval not in ("MONTH", "YEAR"):
        raise ValueError(f"unknown interval {interval!r}")
    index = t.year * 12 + (t.month - 1) + months
    year, month = divmod(index, 12)
    day = min(t.day, calendar.monthrange(year, month + 1)[1])
    return t.replace(year=year, month=month + 1, day=day)


@dataclass(frozen=True)
class Recurrence:
    """Every ``interval`` from ``anchor`` (before and after it)."""

    interval: str
    anchor: datetime

    def nth(self, k: int) -> datetime:
        return add_interval(self.anchor, self.interval, k)

    def index(self, t: datetime) -> int:
        """The largest k with ``nth(k) <= t``."""
        if self.interval in ("DAY", "WEEK", "HOUR"):
            step = {"HOUR": 3600, "DAY": 86400, "WEEK": 7 * 86400}[self.interval]
            k = int((t - self.anchor).total_seconds() // step)
        else:
            months = (t.year - self.anchor.year) * 12 + (t.month - self.anchor.month)
            k = months // 12 if self.interval == "YEAR" else months
        while self.nth(k) > t:
            k -= 1
        while self.nth(k + 1) <= t:
            k += 1
        return k

    def period(self, t: datetime) -> tuple[datetime, datetime]:
        """The period [start, end) holding ``t``."""
        k = self.index(t)
        return self.nth(k), self.nth(k + 1)

    def times(self, after: datetime, until: datetime) -> list[datetime]:
        """The recurrence times in (after, until]."""
        out = []
        k = self.index(after) + 1
        while (t := self.nth(k)) <= until:
            out.append(t)
            k += 1
        return out


@dataclass(frozen=True)
class Grant:
    id: str
    amount: float
    effective_at: datetime
    priority: int = 1
    expires_at: datetime | None = None
    voided_at: datetime | None = None
    min_rollover: float = 0.0
    max_rollover: float = 0.0
    recurrence: Recurrence | None = None
    created_at: datetime | None = None  # breaks ties after priority and expiry

    @property
    def ends_at(self) -> datetime | None:
        ends = [t for t in (self.expires_at, self.voided_at) if t is not None]
        return min(ends) if ends else None

    def active_at(self, t: datetime) -> bool:
        end = self.ends_at
        return self.effective_at <= t and (end is None or t < end)


def expires_at(effective_at: datetime, duration: str, count: int) -> datetime:
    """When a grant with expiration ``{duration, count}`` expires."""
    return add_interval(effective_at, duration, count)


@dataclass(frozen=True)
class Reset:
    """A manual reset at ``at``. ``retain_anchor=False`` moves the usage period's anchor to
    ``at``; ``preserve_overage`` None: the entitlement's setting."""

    at: datetime
    retain_anchor: bool = False
    preserve_overage: bool | None = None


@dataclass(frozen=True)
class Metered:
    """What the balance of a metered entitlement depends on, besides grants and resets."""

    id: str
    measure_from: datetime
    usage_period: Recurrence
    soft_limit: bool = False
    preserve_overage: bool = False
    issue_after_reset: float | None = None
    issue_priority: int = 1

    @property
    def issue_grant_id(self) -> str:
        return f"{self.id}-issue"


@dataclass(frozen=True)
class GrantUse:
    grant_id: str
    usage: float


@dataclass
class Segment:
    """A stretch of the timeline where nothing changes but usage."""

    start: datetime
    end: datetime
    usage: float
    overage: float  # owed at the end of the segment
    balance_at_start: float
    balance_at_end: float
    grant_balances_at_start: dict[str, float]
    grant_balances_at_end: dict[str, float]
    grant_usages: list[GrantUse]
    reset_at_start: bool


@dataclass(frozen=True)
class Value:
    has_access: bool
    balance: float
    usage: float  # since the last reset
    overage: float
    total_available_grant_amount: float  # the balance plus what grants covered since the reset
    period_start: datetime  # the current usage period
    period_end: datetime
    last_reset: datetime


@dataclass
class Run:
    value: Value
    segments: list[Segment] = field(default_factory=list)


def _dec(x: float) -> Decimal:
    return Decimal(repr(float(x)))


def _num(d: Decimal) -> float:
    return float(d)


def anchors(ent: Metered, resets: Sequence[Reset]) -> list[tuple[datetime, Recurrence]]:
    """The usage period schedule: (from, recurrence) regimes, the first from the beginning of
    time (its ``from`` is ``ent.measure_from``), then one per reset that moved the anchor."""
    out = [(ent.measure_from, ent.usage_period)]
    for r in sorted(resets, key=lambda r: r.at):
        if not r.retain_anchor:
            out.append((r.at, Recurrence(ent.usage_period.interval, r.at)))
    return out


def _recurrence_at(ent: Metered, resets: Sequence[Reset], t: datetime) -> Recurrence:
    regime = ent.usage_period
    for start, rec in anchors(ent, resets):
        if start <= t:
            regime = rec
    return regime


def reset_times(
    ent: Metered, resets: Sequence[Reset], until: datetime
) -> dict[datetime, bool | None]:
    """Every reset in (measure_from, until]: period boundaries and manual resets, mapped to
    the reset's own ``preserve_overage`` (None: the entitlement's)."""
    out: dict[datetime, bool | None] = {}
    regimes = anchors(ent, resets)
    for i, (start, rec) in enumerate(regimes):
        stop = regimes[i + 1][0] if i + 1 < len(regimes) else until
        for t in rec.times(start, min(stop, until)):
            if t < stop or i + 1 == len(regimes):
                out[t] = None
    for r in resets:
        if ent.measure_from < r.at <= until:
            out[r.at] = r.preserve_overage
    return out


def current_period(
    ent: Metered, resets: Sequence[Reset], t: datetime
) -> tuple[datetime, datetime, datetime]:
    """(start, end, last reset) of the usage period holding ``t``: the anchored period, cut
    at its start by a manual reset inside it."""
    start, end = _recurrence_at(ent, resets, t).period(t)
    for r in resets:
        if start < r.at <= t:
            start = r.at
    last = max(start, ent.measure_from) if ent.measure_from <= t else start
    return start, end, last


def _all_grants(ent: Metered, grants: Iterable[Grant]) -> list[Grant]:
    out = list(grants)
    if ent.issue_after_reset is not None and ent.issue_after_reset > 0:
        out.append(
            Grant(
                id=ent.issue_grant_id,
                amount=ent.issue_after_reset,
                effective_at=ent.measure_from,
                priority=ent.issue_priority,
                created_at=ent.measure_from,
            )
        )
    return out


def _change_times(grants: Sequence[Grant], start: datetime, until: datetime) -> set[datetime]:
    out: set[datetime] = set()
    for g in grants:
        for t in (g.effective_at, g.ends_at):
            if t is not None and start < t <= until:
                out.add(t)
        if g.recurrence is not None:
            stop = min(until, g.ends_at) if g.ends_at else until
            out.update(g.recurrence.times(max(start, g.effective_at), stop))
    return out


def usage_segments(
    ent: Metered,
    grants: Sequence[Grant],
    resets: Sequence[Reset],
    at: datetime,
    splits: Iterable[datetime] = (),
) -> list[tuple[datetime, datetime]]:
    """The stretches [start, end) whose usage :func:`run` needs, in order: from
    ``measure_from`` to ``at``, cut wherever the burn-down can change (a grant starts, ends
    or recurs; a reset) and at ``splits`` (the history's window edges)."""
    points = _points(ent, _all_grants(ent, grants), resets, at, splits)
    return list(pairwise(points))


def _points(
    ent: Metered,
    grants: Sequence[Grant],
    resets: Sequence[Reset],
    at: datetime,
    splits: Iterable[datetime],
) -> list[datetime]:
    start = ent.measure_from
    if at <= start:
        return [at]
    cuts = _change_times(grants, start, at) | set(reset_times(ent, resets, at))
    cuts.update(t for t in splits if start < t < at)
    return sorted({start, at, *cuts})


def _order(g: Grant) -> tuple[int, int, datetime, datetime, str]:
    far = datetime.max.replace(tzinfo=UTC)
    end = g.ends_at
    return (
        g.priority,
        0 if end is not None else 1,
        end or far,
        g.created_at or g.effective_at,
        g.id,
    )


def burn(
    balances: dict[str, Decimal], ordered: Sequence[Grant], amount: Decimal
) -> tuple[Decimal, list[GrantUse]]:
    """Take ``amount`` from ``balances`` in the order of ``ordered`` (changed in place);
    the part no grant covered, and what each grant gave."""
    uses = []
    for g in ordered:
        if amount <= 0:
            break
        have = balances.get(g.id, _ZERO)
        if have <= 0:
            continue
        take = min(have, amount)
        balances[g.id] = have - take
        amount -= take
        uses.append(GrantUse(g.id, _num(take)))
    return amount, uses


def run(
    ent: Metered,
    grants: Sequence[Grant],
    resets: Sequence[Reset],
    at: datetime,
    usage: Mapping[tuple[datetime, datetime], float],
    splits: Iterable[datetime] = (),
) -> Run:
    """The burn-down from ``ent.measure_from`` to ``at``: the value at ``at`` and every
    segment. ``usage`` holds the meter's usage of each of :func:`usage_segments` (called
    with the same arguments)."""
    every = _all_grants(ent, grants)
    points = _points(ent, every, resets, at, splits)
    resets_at = reset_times(ent, resets, at)
    balances: dict[str, Decimal] = {}
    overage = _ZERO
    period_usage = _ZERO
    covered = _ZERO  # burnt from grants since the last reset
    owed = _ZERO
    segments: list[Segment] = []
    for i, t in enumerate(points):
        active = [g for g in every if g.active_at(t)]
        for gid in list(balances):
            if not any(g.id == gid for g in active):
                del balances[gid]  # expired or voided: what it held is lost
        is_reset = t in resets_at and t > ent.measure_from
        if is_reset:
            preserve = resets_at[t]
            if preserve is None:
                preserve = ent.preserve_overage
            for g in active:
                if g.id in balances:
                    low, high = _dec(g.min_rollover), _dec(g.max_rollover)
                    balances[g.id] = min(high, max(balances[g.id], low))
            owed = overage if preserve else _ZERO
            period_usage = _ZERO
            covered = _ZERO
        for g in active:
            refill = g.id not in balances or (
                g.recurrence is not None and t in g.recurrence.times(t - timedelta(seconds=1), t)
            )
            if g.id == ent.issue_grant_id and (is_reset or t == ent.measure_from):
                refill = True
            if refill:
                balances[g.id] = _dec(g.amount)
        ordered = sorted(active, key=_order)
        if is_reset:
            overage, _ = burn(balances, ordered, owed)
        if i + 1 == len(points):
            # A grant active from ``at`` on pays off what is owed at once.
            overage, _ = burn(balances, ordered, overage)
            break
        end = points[i + 1]
        used = _dec(usage.get((t, end), 0.0))
        start_balances = {k: _num(v) for k, v in balances.items()}
        before = overage
        overage, uses = burn(balances, ordered, used + overage)
        period_usage += used
        covered += used + before - overage
        segments.append(
            Segment(
                start=t,
                end=end,
                usage=_num(used),
                overage=_num(overage),
                balance_at_start=sum(start_balances.values()),
                balance_at_end=_num(sum(balances.values(), _ZERO)),
                grant_balances_at_start=start_balances,
                grant_balances_at_end={k: _num(v) for k, v in balances.items()},
                grant_usages=uses,
                reset_at_start=is_reset,
            )
        )
    final = [g for g in every if g.active_at(at)]
    balance = sum((balances.get(g.id, _ZERO) for g in final), _ZERO)
    if at < ent.measure_from:
        balance = sum((_dec(g.amount) for g in final), _ZERO)
    start, end, last = current_period(ent, resets, at)
    value = Value(
        has_access=ent.soft_limit or balance > 0,
        balance=_num(max(balance, _ZERO)),
        usage=_num(period_usage),
        overage=_num(overage),
        total_available_grant_amount=_num(balance + covered),
        period_start=start,
        period_end=end,
        last_reset=last,
    )
    return Run(value=value, segments=segments)


def evaluate(
    ent: Metered,
    grants: Sequence[Grant],
    resets: Sequence[Reset],
    at: datetime,
    usage: Mapping[tuple[datetime, datetime], float],
) -> Value:
    """The value of a metered entitlement at ``at`` (see the module's docstring)."""
    return run(ent, grants, resets, at, usage).value


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime
    usage: float
    balance_at_start: float


def windowed(result: Run, edges: Sequence[datetime]) -> list[Window]:
    """The history's windows [edges[i], edges[i+1]): the usage in each and the balance at its
    start (``result`` ran with ``splits=edges``, so every edge starts a segment)."""
    out = []
    for start, end in pairwise(edges):
        inside = [s for s in result.segments if start <= s.start < end]
        balance = inside[0].balance_at_start if inside else 0.0
        if not inside:
            before = [s for s in result.segments if s.end <= start]
            balance = before[-1].balance_at_end if before else 0.0
        used = _num(sum((_dec(s.usage) for s in inside), _ZERO))
        out.append(Window(start, end, used, balance))
    return out


def with_void(grant: Grant, at: datetime) -> Grant:
    """The grant voided at ``at`` (it holds nothing from then on)."""
    return replace(grant, voided_at=at)
