"""Usage alerts, the pure part: which thresholds a standing reaches, the one id of each alert,
the signature a webhook delivery carries, and when a failed delivery is tried again.

An alert is identified by what it is about, never by when it was noticed: the id of an
``entitlements.balance.threshold`` event is a hash of (rule, subject, period start,
threshold). The worker creates the event under that id with a create-if-absent, so noticing
the same crossing again (a replay after a crash, a second round in the same period) finds
the event there and creates nothing.
"""

import base64
import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal

# Threshold types: OpenMeter's PERCENT and NUMBER (of usage), and its newer spellings.
ThresholdType = Literal["PERCENT", "NUMBER", "usage_percentage", "usage_value", "balance_value"]
THRESHOLD_TYPES: Final = ("PERCENT", "NUMBER", "usage_percentage", "usage_value", "balance_value")
_PERCENT = ("PERCENT", "usage_percentage")
_USAGE = ("NUMBER", "usage_value")

BALANCE_THRESHOLD: Final = "entitlements.balance.threshold"
RESET: Final = "entitlements.reset"

SECRET_PREFIX: Final = "whsec_"

# Delivery retries: 1 s after the first failure, doubling, at most an hour apart.
RETRY_FIRST_S: Final = 1.0
RETRY_MAX_S: Final = 3600.0


@dataclass(frozen=True)
class Standing:
    """An entitlement's usage in one period, as alerts see it.

    ``granted``: what the period allows in total (grants, or the limit); None when nothing
    is granted (a percentage threshold is then never reached)."""

    period_start: datetime
    usage: float
    granted: float | None = None

    @property
    def balance(self) -> float | None:
        return None if self.granted is None else max(self.granted - self.usage, 0.0)


@dataclass(frozen=True)
class Threshold:
    type: str
    value: float


def reached(t: Threshold, s: Standing) -> bool:
    """Whether standing ``s`` is at or past threshold ``t``.

    NUMBER / usage_value: usage >= value. PERCENT / usage_percentage: usage >= value% of
    what is granted (never, when nothing is). balance_value: the balance left <= value
    (never, when nothing is granted)."""
    if t.type in _USAGE:
        return s.usage >= t.value
    if t.type in _PERCENT:
        return s.granted is not None and s.granted > 0 and s.usage * 100 >= t.value * s.granted
    if t.type == "balance_value":
        balance = s.balance
        return balance is not None and balance <= t.value
    raise ValueError(f"unknown threshold type {t.type!r}")


def crossed(
    thresholds: list[Threshold], before: Standing | None, after: Standing
) -> list[Threshold]:
    """The thresholds a change from ``before`` to ``after`` crosses: reached at ``after`` and
    not at ``before`` in the same period. ``before`` None (not known: a worker that started
    again, a replay) or of another period: every threshold reached at ``after``; the event
    ids make noticing one again harmless."""
    same = before is not None and before.period_start == after.period_start
    return [
        t for t in thresholds if reached(t, after) and not (same and before and reached(t, before))
    ]


def _number(value: float) -> str:
    """A canonical text of a threshold value: 100, 100.0 and 1e2 are the same threshold."""
    return repr(float(value))


def threshold_event_id(rule_id: str, subject: str, period_start: datetime, t: Threshold) -> str:
    """The one id of the alert (rule, subject, period, threshold)."""
    return _id("threshold", rule_id, subject, _instant(period_start), t.type, _number(t.value))


def reset_event_id(rule_id: str, subject: str, entitlement_id: str, reset_at: datetime) -> str:
    """The one id of the reset notice of an entitlement reset at ``reset_at``."""
    return _id("reset", rule_id, subject, entitlement_id, _instant(reset_at))


def _instant(t: datetime) -> str:
    return str(int(t.timestamp() * 1000))


def _id(*parts: str) -> str:
    # NUL cannot appear in any of the parts' texts: the join is unambiguous.
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    return "ntf" + digest[:29]


def new_secret(random_bytes: bytes) -> str:
    """A signing secret in the usual webhook form: ``whsec_`` and base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(random_bytes).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a signing secret: the bytes after ``whsec_`` (base64), or the text's
    UTF-8 bytes for a secret of another form."""
    if secret.startswith(SECRET_PREFIX):
        try:
            return base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
        except ValueError:
            pass
    return secret.encode()


def signature(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """``v1,`` and base64 of HMAC-SHA256(key, "<event id>.<timestamp>.<body>")."""
    signed = f"{event_id}.{timestamp}.".encode() + body
    mac = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(secret: str, event_id: str, timestamp: int, body: bytes, header: str) -> bool:
    """Whether a signature header (space-separated ``v1,<sig>`` entries) holds one made with
    ``secret`` over this delivery."""
    want = signature(secret, event_id, timestamp, body)
    return any(hmac.compare_digest(want, given) for given in header.split())


def retry_in(attempts: int, first: float = RETRY_FIRST_S, most: float = RETRY_MAX_S) -> float:
    """Seconds before the next try, after ``attempts`` failed ones (1 s, 2 s, 4 s ... 1 h)."""
    return float(min(first * 2.0 ** min(max(attempts - 1, 0), 32), most))
