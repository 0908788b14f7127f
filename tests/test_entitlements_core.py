"""Entitlement balances from tables, with no server: periods and anchors, priorities, expiries,
rollover, resets, overage, soft and hard limits (core.entitlements)."""

from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from kloudmeter_py.core.entitlements import (
    Grant,
    Metered,
    Recurrence,
    Reset,
    Value,
    add_interval,
    current_period,
    evaluate,
    expires_at,
    run,
    usage_segments,
    windowed,
)


def t(day: int, hour: int = 0, month: int = 1, year: int = 2026) -> datetime:
    return datetime(year, month, day, hour, tzinfo=UTC)


MONTHLY = Recurrence("MONTH", t(1))
ENT = Metered(id="e1", measure_from=t(1), usage_period=MONTHLY)


def value(
    ent: Metered,
    grants: Sequence[Grant],
    events: Sequence[tuple[datetime, float]],
    at: datetime,
    resets: Sequence[Reset] = (),
) -> Value:
    """The value at ``at`` with the usage of each segment summed from raw events."""
    segments = usage_segments(ent, grants, resets, at)
    usage = {(a, b): float(sum(v for when, v in events if a <= when < b)) for a, b in segments}
    return evaluate(ent, grants, resets, at, usage)


@pytest.mark.parametrize(
    ("start", "interval", "n", "expected"),
    [
        (t(31), "MONTH", 1, t(28, month=2)),
        (t(31), "MONTH", 2, t(31, month=3)),
        (t(31), "MONTH", 3, t(30, month=4)),
        (t(31), "MONTH", -2, t(30, month=11, year=2025)),
        (datetime(2024, 2, 29, tzinfo=UTC), "YEAR", 1, datetime(2025, 2, 28, tzinfo=UTC)),
        (t(1), "WEEK", 1, t(8)),
        (t(1), "DAY", -1, t(31, month=12, year=2025)),
        (t(1), "HOUR", 5, t(1, 5)),
    ],
)
def test_intervals_step_by_calendar_months_clamping_the_day(
    start: datetime, interval: str, n: int, expected: datetime
) -> None:
    """Months from an anchor on the 31st land on each month's last day, then back on the 31st."""
    assert add_interval(start, interval, n) == expected


@pytest.mark.parametrize(
    ("anchor", "interval", "at", "period"),
    [
        (t(31, 10), "MONTH", t(15, month=2), (t(31, 10), t(28, 10, month=2))),
        (t(31, 10), "MONTH", t(28, 10, month=2), (t(28, 10, month=2), t(31, 10, month=3))),
        (t(31, 10), "MONTH", t(31, 9, month=3), (t(28, 10, month=2), t(31, 10, month=3))),
        (t(15), "MONTH", t(3), (t(15, month=12, year=2025), t(15))),  # before the anchor
        (t(1), "WEEK", t(20, 5), (t(15), t(22))),
        (t(1, 6), "DAY", t(3, 5), (t(2, 6), t(3, 6))),
        (t(1), "YEAR", t(1, month=7, year=2027), (t(1, year=2027), t(1, year=2028))),
    ],
)
def test_the_usage_period_holding_a_time(
    anchor: datetime, interval: str, at: datetime, period: tuple[datetime, datetime]
) -> None:
    """Periods run from the anchor, forwards and backwards, across month ends."""
    ent = Metered(id="e", measure_from=t(1, year=2020), usage_period=Recurrence(interval, anchor))
    start, end, _ = current_period(ent, [], at)
    assert (start, end) == period


G100 = Grant("a", 100, t(1), priority=1, created_at=t(1))
G50 = Grant("b", 50, t(1), priority=2, created_at=t(1))

# (case, grants, events, at, balance, usage, overage, has_access)
CASES: list[
    tuple[str, list[Grant], list[tuple[datetime, float]], datetime, float, float, float]
] = [
    ("no usage", [G100, G50], [], t(2), 150, 0, 0),
    ("priority first", [G100, G50], [(t(2), 30)], t(3), 120, 30, 0),
    ("into the second grant", [G100, G50], [(t(2), 120)], t(3), 30, 120, 0),
    ("overage past both", [G100, G50], [(t(2), 170)], t(3), 0, 170, 20),
    (
        "same priority: earliest expiry first",
        [
            Grant("late", 10, t(1), expires_at=t(20), created_at=t(1)),
            Grant("soon", 10, t(1), expires_at=t(10), created_at=t(1)),
        ],
        [(t(2), 5)],
        t(11),  # "soon" held 5 and expired: "late" is whole
        10,
        5,
        0,
    ),
    (
        "same priority: a grant that never expires burns last",
        [
            Grant("forever", 10, t(1), created_at=t(1)),
            Grant("month", 10, t(1), expires_at=t(20), created_at=t(1)),
        ],
        [(t(2), 5)],
        t(21),
        10,
        5,
        0,
    ),
    (
        "priority beats expiry",
        [
            Grant("p2", 10, t(1), priority=2, expires_at=t(10)),
            Grant("p1", 10, t(1), priority=1, expires_at=t(20)),
        ],
        [(t(2), 5)],
        t(11),  # p1 burnt first; p2 expired whole
        5,
        5,
        0,
    ),
    (
        "an expired grant's balance is lost",
        [Grant("x", 10, t(1), expires_at=expires_at(t(1), "DAY", 3))],
        [(t(2), 4)],
        t(5),
        0,
        4,
        0,
    ),
    (
        "a voided grant stops holding",
        [Grant("x", 10, t(1), voided_at=t(3)), Grant("y", 5, t(1), priority=2)],
        [(t(2), 4), (t(4), 2)],
        t(5),
        3,
        6,
        0,
    ),
    (
        "a later grant pays off the overage of the period",
        [Grant("x", 10, t(1)), Grant("y", 10, t(5))],
        [(t(2), 15)],
        t(6),
        5,
        15,
        0,
    ),
    (
        "a grant in the future holds nothing yet",
        [Grant("x", 10, t(10))],
        [(t(2), 3)],
        t(5),
        0,
        3,
        3,
    ),
    (
        "period end: no rollover by default",
        [Grant("x", 100, t(1))],
        [(t(2), 30)],
        t(2, month=2),
        0,
        0,
        0,
    ),
    (
        "period end: rollover capped by maxRolloverAmount",
        [Grant("x", 100, t(1), max_rollover=50)],
        [(t(2), 30), (t(3, month=2), 10)],
        t(5, month=2),
        40,
        10,
        0,
    ),
    (
        "period end: minRolloverAmount tops the balance up",
        [Grant("x", 100, t(1), min_rollover=100, max_rollover=100)],
        [(t(2), 90), (t(3, month=2), 10)],
        t(5, month=2),
        90,
        10,
        0,
    ),
    (
        "period end forgives overage",
        [Grant("x", 10, t(1), min_rollover=10, max_rollover=10)],
        [(t(2), 15)],
        t(2, month=2),
        10,
        0,
        0,
    ),
    (
        "a recurring grant refills",
        [Grant("x", 10, t(1), recurrence=Recurrence("WEEK", t(1)), max_rollover=0)],
        [(t(2), 8), (t(9), 3)],
        t(10),
        7,
        11,
        0,
    ),
    (
        "decimal exactness across segments",
        [Grant("x", 0.3, t(1)), Grant("y", 1, t(3), priority=2)],  # y cuts a segment at t(3)
        [(t(2), 0.1), (t(3), 0.2)],
        t(4),
        1,
        0.3,
        0,
    ),
]


@pytest.mark.parametrize(
    ("case", "grants", "events", "at", "balance", "usage", "overage"),
    CASES,
    ids=[c[0] for c in CASES],
)
def test_balance_burns_grants_by_priority_then_expiry(
    case: str,
    grants: list[Grant],
    events: list[tuple[datetime, float]],
    at: datetime,
    balance: float,
    usage: float,
    overage: float,
) -> None:
    """Each case's balance, usage and overage, computed by hand."""
    got = value(ENT, grants, events, at)
    assert (got.balance, got.usage, got.overage) == (balance, usage, overage), case
    assert got.has_access is (balance > 0)


def test_soft_limit_keeps_access_past_the_balance() -> None:
    """A soft limit has access with nothing left; a hard one does not."""
    grants = [Grant("x", 10, t(1))]
    hard = value(ENT, grants, [(t(2), 12)], t(3))
    soft = value(Metered("e", t(1), MONTHLY, soft_limit=True), grants, [(t(2), 12)], t(3))
    assert (hard.has_access, hard.overage) == (False, 2)
    assert (soft.has_access, soft.overage, soft.balance) == (True, 2, 0)


def test_issue_after_reset_is_a_fresh_grant_each_period() -> None:
    """issueAfterReset gives its amount at the start and again at every period start."""
    ent = Metered("e", t(1), MONTHLY, issue_after_reset=100)
    events = [(t(2), 70), (t(3, month=2), 20)]
    assert value(ent, [], events, t(5)).balance == 30
    got = value(ent, [], events, t(5, month=2))
    assert (got.balance, got.usage, got.period_start) == (80, 20, t(1, month=2))


def test_manual_reset_forgives_or_preserves_overage() -> None:
    """A reset starts usage again; overage is forgiven unless preserved (then it burns the
    next balances)."""
    ent = Metered("e", t(1), MONTHLY, issue_after_reset=10)
    events = [(t(2), 14), (t(6), 1)]
    forgiven = value(ent, [], events, t(7), [Reset(t(5))])
    kept = value(ent, [], events, t(7), [Reset(t(5), preserve_overage=True)])
    assert (forgiven.balance, forgiven.usage, forgiven.overage) == (9, 1, 0)
    assert (kept.balance, kept.usage, kept.overage) == (5, 1, 0)
    by_default = value(
        Metered("e", t(1), MONTHLY, issue_after_reset=10, preserve_overage=True),
        [],
        events,
        t(7),
        [Reset(t(5))],
    )
    assert by_default.balance == 5


def test_reset_without_retaining_the_anchor_moves_the_periods() -> None:
    """retainAnchor false: periods run from the reset; true: from the old anchor."""
    moved = Metered("e", t(1), MONTHLY)
    start, end, last = current_period(moved, [Reset(t(10))], t(20))
    assert (start, end, last) == (t(10), t(10, month=2), t(10))
    start, end, last = current_period(moved, [Reset(t(10), retain_anchor=True)], t(20))
    assert (start, end, last) == (t(10), t(1, month=2), t(10))
    # The moved anchor's next boundary resets: usage of Feb 10 onwards only.
    got = value(
        Metered("e", t(1), MONTHLY, issue_after_reset=50),
        [],
        [(t(5, month=2), 5), (t(12, month=2), 7)],
        t(15, month=2),
        [Reset(t(10))],
    )
    assert (got.usage, got.balance) == (7, 43)


def test_usage_before_measure_from_does_not_count() -> None:
    """Segments start at measureUsageFrom; a value before it is the grants' whole amount."""
    ent = Metered("e", t(5), MONTHLY)
    grants = [Grant("x", 10, t(1))]
    assert usage_segments(ent, grants, [], t(7))[0][0] == t(5)
    assert value(ent, grants, [(t(2), 4), (t(6), 1)], t(7)).balance == 9
    assert value(ent, grants, [], t(3)).balance == 10


def test_history_windows_add_up_to_the_usage() -> None:
    """Windows split at their edges: usage per window, balance at each start."""
    grants = [Grant("x", 100, t(1))]
    edges = [t(1), t(2), t(3), t(4)]
    events = [(t(1, 5), 10), (t(2, 5), 20), (t(3, 5), 30)]
    segments = usage_segments(ENT, grants, [], t(4), splits=edges)
    usage = {(a, b): float(sum(v for w, v in events if a <= w < b)) for a, b in segments}
    result = run(ENT, grants, [], t(4), usage, splits=edges)
    windows = windowed(result, edges)
    assert [(w.usage, w.balance_at_start) for w in windows] == [(10, 100), (20, 90), (30, 70)]
    assert result.value.balance == 40
