"""The pure core, with no server: aggregations, token encoding, JSONPath, meter validation."""

import math
import random
from typing import Any

import msgspec
import pytest

from kloudmeter_py.core.aggregate import (
    AGGREGATIONS,
    Acc,
    ValueError_,
    fold,
    fold_many,
    merge,
    merge_into,
    to_number,
)
from kloudmeter_py.core.keys import decode_token, encode_token, reading_key, reading_series
from kloudmeter_py.core.models import InvalidField, MeterIn, event_decoder, validate_meter
from kloudmeter_py.core.paths import MISSING, PathError, compile_path

# (aggregation, values as (time_ms, value), expected result)
CASES: list[tuple[str, list[tuple[int, Any]], Any]] = [
    ("count", [(1, None), (2, None), (3, None)], 3),
    ("sum", [(1, 1), (2, 2.5), (3, -1)], 2.5),
    ("avg", [(1, 1), (2, 2), (3, 6)], 3.0),
    ("min", [(1, 5), (2, 7), (3, 6)], 5),
    ("max", [(1, -5), (2, -7), (3, -6)], -5),
    ("latest", [(3, 1), (1, 2), (2, 3)], 1),
    ("unique", [(1, "a"), (2, "b"), (3, "a")], 2),
]


def _fold_all(name: str, values: list[tuple[int, Any]]) -> Acc:
    agg = AGGREGATIONS[name]
    acc = Acc()
    for seq, (at, value) in enumerate(values, start=1):
        number = to_number(value) if agg.numeric else None
        key = str(value) if agg.uses_distinct else None
        fold(acc, number, key, at, seq)
    return acc


@pytest.mark.parametrize(("name", "values", "expected"), CASES, ids=[c[0] for c in CASES])
def test_each_aggregation_folds_to_its_result(name: str, values: Any, expected: Any) -> None:
    """Every aggregation gives the hand-computed result."""
    assert AGGREGATIONS[name].result(_fold_all(name, values)) == expected


@pytest.mark.parametrize(("name", "values", "expected"), CASES, ids=[c[0] for c in CASES])
def test_merge_of_any_split_equals_folding_everything(
    name: str, values: Any, expected: Any
) -> None:
    """merge(a, b) is exact for every aggregation, wherever the events are split."""
    agg = AGGREGATIONS[name]
    for cut in range(len(values) + 1):
        a = Acc()
        b = Acc()
        for seq, (at, value) in enumerate(values, start=1):
            number = to_number(value) if agg.numeric else None
            key = str(value) if agg.uses_distinct else None
            fold(a if seq <= cut else b, number, key, at, seq)
        assert agg.result(merge(a, b)) == expected
        assert agg.result(merge(b, a)) == expected
        # merge_into (the worker's in-place merge) leaves exactly the state merge builds
        for first, second in ((a, b), (b, a)):
            into = merge(Acc(), first)
            merge_into(into, second)
            assert into == merge(first, second)


@pytest.mark.parametrize("seed", range(20))
def test_folding_many_at_once_equals_folding_one_by_one(seed: int) -> None:
    """fold_many (the worker's batch fold) leaves exactly the state of fold() event by event,
    onto an empty or a used state: ints and floats, repeated times, ties, distinct keys."""
    rng = random.Random(seed)
    for numeric in (True, False):
        start = Acc()
        for seq in range(1, rng.randint(1, 4)):
            value = rng.choice([rng.randint(-5, 5), rng.random() * 10])
            fold(start, value if numeric else None, None if numeric else str(value), 50, seq)
        n = rng.randint(1, 40)
        ats = [rng.choice([10, 20, 50, 50, 90]) for _ in range(n)]
        seqs = sorted(rng.sample(range(10, 1000), n))
        values: list[Any] = [
            rng.choice([rng.randint(-9, 9), round(rng.uniform(-9, 9), 3), 0.1]) for _ in range(n)
        ]
        keys = [f"k{rng.randint(0, 6)}" for _ in range(n)]
        one_by_one = merge(Acc(), start)
        for at, seq, value, key in zip(ats, seqs, values, keys, strict=True):
            fold(one_by_one, value if numeric else None, None if numeric else key, at, seq)
        at_once = merge(Acc(), start)
        fold_many(at_once, values if numeric else None, None if numeric else keys, ats, seqs)
        assert at_once == one_by_one


def test_min_and_max_start_from_the_first_value_not_zero() -> None:
    """A meter of only positive values has a positive minimum."""
    acc = _fold_all("min", [(1, 5), (2, 9)])
    assert acc.min == 5 and acc.max == 9


def test_latest_ties_on_time_go_to_the_later_stream_sequence() -> None:
    """Two events with one timestamp: the one stored later wins."""
    acc = _fold_all("latest", [(10, 1), (10, 2)])
    assert acc.latest == 2


@pytest.mark.parametrize(
    ("raw", "expected"), [(3, 3), ("12.5", 12.5), (" 7 ", 7), (2.5, 2.5), ("-1e3", -1000.0)]
)
def test_numbers_and_numeric_strings_are_values(raw: Any, expected: float) -> None:
    """JSON numbers and numeric strings are accepted."""
    assert to_number(raw) == expected


@pytest.mark.parametrize("raw", [True, "abc", None, [1], {"a": 1}, "nan", math.inf, ""])
def test_non_numbers_are_refused(raw: Any) -> None:
    """Booleans, text, objects and non-finite numbers are not values."""
    with pytest.raises(ValueError_):
        to_number(raw)


def test_unique_above_its_limit_is_refused_not_miscounted() -> None:
    """The exact distinct set has a bound, and going past it is an error."""
    acc = Acc()
    fold(acc, None, "a", 1, 1, unique_limit=2)
    fold(acc, None, "b", 1, 2, unique_limit=2)
    fold(acc, None, "a", 1, 3, unique_limit=2)
    with pytest.raises(ValueError_):
        fold(acc, None, "c", 1, 4, unique_limit=2)
    assert acc.distinct == {"a", "b"} and acc.count == 3


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        "with-dash_und",
        "a b",
        "a.b",
        "*",
        ">",
        "",
        "ünïcødé",
        "日本",
        "=x",
        "a/b",
        "x" * 200,
    ],
)
def test_tokens_round_trip_and_are_legal(value: str) -> None:
    """Any value encodes to a legal NATS token and KV key token, and decodes back."""
    token = encode_token(value)
    assert decode_token(token) == value
    assert token and all(c.isascii() and (c.isalnum() or c in "-_=") for c in token)


def test_plain_values_stay_readable() -> None:
    """Keys made of plain values read as they are."""
    assert reading_key("m", "customer-1", ("GET", None)) == "m.customer-1.GET.=-"
    assert decode_token("=-") is None


@pytest.mark.parametrize(
    ("meter", "subject", "groups"),
    [
        ("m", "customer-1", ()),
        ("m.v2", "a.b c", ("GET", None)),
        ("m", "", ("", "ünï", "x.y")),
        ("=-", "=-", (None, None)),
    ],
)
def test_a_reading_key_names_its_subject_and_group_values(
    meter: str, subject: str, groups: tuple[str | None, ...]
) -> None:
    """What the worker writes a deferred reading with (worker.write.Writer.dirty holds its key
    only)."""
    assert reading_series(reading_key(meter, subject, groups)) == (subject, groups)


def test_random_strings_round_trip() -> None:
    """Random unicode survives encoding."""
    rng = random.Random(7)
    for _ in range(500):
        value = "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(rng.randint(0, 12)))
        assert decode_token(encode_token(value)) == value


def test_simple_and_complex_jsonpaths_find_values() -> None:
    """Dotted chains take the fast path; filters and indexes use jsonpath-ng."""
    doc = {"a": {"b": 3}, "items": [{"n": 1}, {"n": 2}], "x": None}
    assert compile_path("$.a.b")(doc) == 3
    assert compile_path("$.a.c")(doc) is MISSING
    assert compile_path("$.items[1].n")(doc) == 2
    assert compile_path("$.items[?(@.n > 1)].n")(doc) == 2
    with pytest.raises(PathError):
        compile_path("$.items[*].n")(doc)


@pytest.mark.parametrize("path", ["a.b", "$..[", "$.a[?(", ""])
def test_bad_jsonpaths_are_refused_when_compiled(path: str) -> None:
    """A bad path fails at meter creation, never per event."""
    with pytest.raises(PathError):
        compile_path(path)


def test_meter_validation_names_the_field() -> None:
    """Unknown aggregation, missing valueProperty and bad groupBy each name their field."""
    with pytest.raises(InvalidField) as err:
        validate_meter(MeterIn(id="m", eventType="t", aggregation="median"))
    assert err.value.field == "aggregation"
    with pytest.raises(InvalidField) as err:
        validate_meter(MeterIn(id="m", eventType="t", aggregation="sum"))
    assert err.value.field == "valueProperty"
    with pytest.raises(InvalidField) as err:
        validate_meter(MeterIn(id="m", eventType="t", aggregation="count", groupBy={"g": "$.a["}))
    assert err.value.field == "groupBy.g"
    meter = validate_meter(
        MeterIn(id="m", eventType="t", aggregation="UNIQUE_COUNT", valueProperty="$.u")
    )
    assert meter.aggregation == "unique"


def test_event_time_must_carry_an_offset() -> None:
    """RFC 3339 without an offset is refused with the field named."""
    with pytest.raises(msgspec.ValidationError, match="time"):
        event_decoder.decode(
            b'{"id":"1","eventType":"t","subject":"s","time":"2026-01-01T00:00:00"}'
        )
    ev = event_decoder.decode(
        b'{"id":"1","eventType":"t","subject":"s","time":"2026-01-01T00:00:00.123+02:00"}'
    )
    assert ev.time is not None and ev.time.utcoffset() is not None
