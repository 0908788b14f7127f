"""Usage alerts, the pure part (core.alerts): thresholds reached and crossed, event ids,
signatures, retry delays; from tables, with no server."""

import base64
import hashlib
import hmac
from datetime import UTC, datetime

import pytest

from kloudmeter_py.core.alerts import (
    Standing,
    Threshold,
    crossed,
    new_secret,
    reached,
    reset_event_id,
    retry_in,
    signature,
    threshold_event_id,
    verify,
)

DEC = datetime(2026, 12, 1, tzinfo=UTC)
JAN = datetime(2027, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("threshold", "usage", "granted", "expected"),
    [
        (Threshold("NUMBER", 100), 99.9, None, False),
        (Threshold("NUMBER", 100), 100, None, True),
        (Threshold("usage_value", 100), 150, 10, True),
        (Threshold("PERCENT", 50), 49, 100, False),
        (Threshold("PERCENT", 50), 50, 100, True),
        (Threshold("PERCENT", 50), 1000, None, False),  # nothing granted: never
        (Threshold("PERCENT", 50), 1, 0, False),  # granted 0: never (no division)
        (Threshold("usage_percentage", 100), 30, 30, True),
        (Threshold("PERCENT", 150), 44, 30, False),  # overage: 146%
        (Threshold("PERCENT", 150), 45, 30, True),
        (Threshold("balance_value", 10), 89, 100, False),  # 11 left
        (Threshold("balance_value", 10), 90, 100, True),
        (Threshold("balance_value", 10), 90, None, False),
    ],
)
def test_reached(threshold: Threshold, usage: float, granted: float | None, expected: bool) -> None:
    """A threshold is reached by usage (NUMBER), share of the granted (PERCENT) or balance."""
    assert reached(threshold, Standing(DEC, usage, granted)) is expected


T = [Threshold("NUMBER", 10), Threshold("NUMBER", 20), Threshold("PERCENT", 50)]


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (Standing(DEC, 0, 100), Standing(DEC, 5, 100), []),
        (Standing(DEC, 5, 100), Standing(DEC, 10, 100), [T[0]]),
        (Standing(DEC, 5, 100), Standing(DEC, 60, 100), T),  # one round crosses all three
        (Standing(DEC, 10, 100), Standing(DEC, 15, 100), []),  # past 10 already
        (Standing(DEC, 15, 100), Standing(DEC, 25, 100), [T[1]]),
        (None, Standing(DEC, 25, 100), [T[0], T[1]]),  # not known: all reached
        (Standing(DEC, 60, 100), Standing(JAN, 12, 100), [T[0]]),  # a new period starts over
        (Standing(DEC, 60, 100), Standing(DEC, 60, 200), []),  # more granted: none again
        (Standing(DEC, 30, 200), Standing(DEC, 30, 50), [T[2]]),  # less granted
    ],
)
def test_crossed(before: Standing | None, after: Standing, expected: list[Threshold]) -> None:
    """Crossed: reached after and not before in the same period."""
    assert crossed(T, before, after) == expected


def test_event_id_is_one_per_rule_subject_period_threshold() -> None:
    """The id depends on exactly (rule, subject, period start, threshold)."""
    base = threshold_event_id("r1", "acme", DEC, Threshold("NUMBER", 100))
    assert base == threshold_event_id("r1", "acme", DEC, Threshold("NUMBER", 100.0))
    assert base == threshold_event_id("r1", "acme", DEC, Threshold("NUMBER", 1e2))
    others = {
        threshold_event_id("r2", "acme", DEC, Threshold("NUMBER", 100)),
        threshold_event_id("r1", "globex", DEC, Threshold("NUMBER", 100)),
        threshold_event_id("r1", "acme", JAN, Threshold("NUMBER", 100)),
        threshold_event_id("r1", "acme", DEC, Threshold("NUMBER", 101)),
        threshold_event_id("r1", "acme", DEC, Threshold("PERCENT", 100)),
        # parts that would run together if they were simply joined
        threshold_event_id("r1a", "cme", DEC, Threshold("NUMBER", 100)),
        reset_event_id("r1", "acme", "ent", DEC),
    }
    assert base not in others and len(others) == 7
    assert base.startswith("ntf") and len(base) == 32 and base.isalnum()


def test_signature_is_hmac_sha256_over_id_timestamp_body() -> None:
    """v1,base64(HMAC-SHA256(base64-decoded secret, "<id>.<timestamp>.<body>"))."""
    key = bytes(range(32))
    secret = new_secret(key)
    assert secret == "whsec_" + base64.b64encode(key).decode()
    body = b'{"id":"ntf1"}'
    mac = hmac.new(key, b"ntf1.1764720000." + body, hashlib.sha256).digest()
    expected = "v1," + base64.b64encode(mac).decode()
    assert signature(secret, "ntf1", 1764720000, body) == expected
    assert verify(secret, "ntf1", 1764720000, body, f"v1,other {expected}")
    assert not verify(secret, "ntf1", 1764720001, body, expected)
    assert not verify(secret, "ntf2", 1764720000, body, expected)
    assert not verify(secret, "ntf1", 1764720000, body + b" ", expected)
    assert not verify(new_secret(bytes(32)), "ntf1", 1764720000, body, expected)
    # a secret of another form: its text is the key
    plain = hmac.new(b"s3cret", b"e.1." + body, hashlib.sha256).digest()
    assert signature("s3cret", "e", 1, body) == "v1," + base64.b64encode(plain).decode()


@pytest.mark.parametrize(
    ("attempts", "seconds"), [(1, 1.0), (2, 2.0), (3, 4.0), (10, 512.0), (13, 3600.0), (40, 3600.0)]
)
def test_retry_backs_off_to_an_hour(attempts: int, seconds: float) -> None:
    """Retries 1 s after the first failure, doubling, at most an hour apart."""
    assert retry_in(attempts) == seconds
    assert retry_in(attempts, first=0.2, most=1.0) == min(seconds / 5, 1.0)
