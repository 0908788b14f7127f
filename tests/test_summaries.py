"""The stored form of window summaries: compact arrays, and objects written before still read."""

from datetime import UTC, datetime

import msgspec
import pytest

from kloudmeter_py.core.aggregate import Acc, fold
from kloudmeter_py.core.keys import reading_key
from kloudmeter_py.core.meters import to_reading
from kloudmeter_py.core.models import Meter, encoder
from kloudmeter_py.core.summaries import (
    decode_window,
    encode_window,
    parse_summary_key,
    summary_reading,
)
from kloudmeter_py.core.windows import window_token

START = 1_764_633_600  # 2025-12-02T00:00:00Z


def _meter(aggregation: str, group_by: dict[str, str] | None = None) -> Meter:
    return Meter(
        id="m",
        eventType="t",
        aggregation=aggregation,
        valueProperty=None if aggregation == "count" else "$.v",
        groupBy=group_by or {},
        startSeq=7,
        createdAt=datetime(2025, 12, 1, tzinfo=UTC),
    )


def _acc(values: list[tuple[float | int | None, str | None]]) -> Acc:
    acc = Acc()
    for i, (number, key) in enumerate(values):
        fold(acc, number, key, START * 1000 + i * 1000, 100 + i)
    return acc


CASES = [
    ("count", [(None, None), (None, None)]),
    ("sum", [(3, None), (4.5, None), (-1, None)]),
    ("avg", [(1, None), (2, None)]),
    ("min", [(5, None), (2, None), (9, None)]),
    ("max", [(5, None), (2.25, None), (9, None)]),
    ("latest", [(5, None), (2, None)]),
    ("unique", [(None, "a"), (None, "b"), (None, "a"), (None, "a.b c")]),
]


@pytest.mark.parametrize(("aggregation", "values"), CASES)
def test_a_window_survives_its_compact_form(aggregation: str, values: list[object]) -> None:
    """Every aggregation's state comes back equal from the array, replays included."""
    acc = _acc(values)  # type: ignore[arg-type]
    data = encode_window(acc, 123, 7, [99, 101])
    assert data.startswith(b"[1,7,123,")
    state = decode_window(data)
    assert state.acc == acc
    assert (state.last_seq, state.meter_start_seq, state.replayed) == (123, 7, [99, 101])


@pytest.mark.parametrize(("aggregation", "values"), CASES)
def test_a_window_written_as_a_reading_object_is_still_read(
    aggregation: str, values: list[object]
) -> None:
    """Summaries stored by the previous version (reading objects) decode to the same result,
    and read back as the same reading."""
    meter = _meter(aggregation)
    acc = _acc(values)  # type: ignore[arg-type]
    old = to_reading(acc, meter, "s", (), 123, datetime.now(UTC), window=(START, 86400))
    data = encoder.encode(old)
    state = decode_window(data)
    assert (state.last_seq, state.meter_start_seq) == (123, 7)
    assert state.acc.count == acc.count and state.acc.sum == acc.sum
    assert state.acc.distinct == acc.distinct
    key = reading_key("m", "s", ()) + "." + window_token(START)
    assert summary_reading(key, data, meter, 86400).value == old.value
    new = summary_reading(key, encode_window(acc, 123, 7), meter, 86400)
    assert (new.value, new.count, new.windowStart, new.windowEnd) == (
        old.value,
        old.count,
        old.windowStart,
        old.windowEnd,
    )


def test_a_summary_key_names_its_subject_groups_and_window() -> None:
    """Encoded subjects and group values (dots, spaces, missing) come back from the key."""
    key = reading_key("m", "a b.c", ("eu", None)) + "." + window_token(START)
    assert parse_summary_key(key, 2) == ("a b.c", ("eu", None), START)
    with pytest.raises(ValueError, match="2 groups"):
        parse_summary_key(reading_key("m", "s", ()) + "." + window_token(START), 2)


def test_an_unknown_format_is_refused() -> None:
    """A value of a format this version does not know is an error, not a wrong number."""
    with pytest.raises(msgspec.ValidationError):
        decode_window(b"[2,7,123,1]")
