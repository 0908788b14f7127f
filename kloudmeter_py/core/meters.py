"""A meter compiled for the hot path: JSONPaths parsed once, aggregation looked up once."""

from datetime import UTC, datetime
from typing import Any

from kloudmeter_py.core.aggregate import (
    AGGREGATIONS,
    Acc,
    Number,
    ValueError_,
    distinct_key,
    shared,
    to_number,
)
from kloudmeter_py.core.keys import reading_key
from kloudmeter_py.core.models import Meter, Reading
from kloudmeter_py.core.paths import MISSING, Finder, PathError, compile_path


def group_text(value: Any) -> str | None:
    """A group value as OpenMeter shows it: a string, or None when absent."""
    if value is MISSING or value is None:
        return None
    if isinstance(value, str):
        return value
    return distinct_key(value)


# (reading key, group values, indexes of the events or None for all, numbers, distinct keys)
Extracted = tuple[
    str, tuple[str | None, ...], list[int] | None, list[Number] | None, list[str] | None
]


# Reading keys a meter keeps made (see CompiledMeter._key), a round's: the series of a
# worker's share of the live bench shape (1,000 subjects) fit, and a round of many more is
# bounded by its parts (runner._ROUND_PARTS) anyway; beyond, they are made again as needed.
_KEYS_HELD = 8_192


class CompiledMeter:
    __slots__ = ("_keys", "agg", "group_names", "groups", "meter", "value")

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.agg = AGGREGATIONS[meter.aggregation]
        self.value: Finder | None = (
            compile_path(meter.valueProperty)
            if meter.valueProperty and meter.aggregation not in ("count", "duration")
            else None
        )
        self.group_names = tuple(sorted(meter.groupBy))
        self.groups = tuple(compile_path(meter.groupBy[name]) for name in self.group_names)
        self._keys: dict[tuple[str, tuple[str | None, ...]], str] = {}

    def extract(
        self, subject: str, data: dict[str, Any]
    ) -> tuple[str, tuple[str | None, ...], Number | None, str | None]:
        """(reading key, group values, number, distinct key) for one event, or ValueError_."""
        groups: tuple[str | None, ...] = ()
        if self.groups:
            try:
                groups = tuple([group_text(find(data)) for find in self.groups])
            except PathError as exc:
                raise ValueError_(f"groupBy: {exc}") from exc
            for value in groups:
                if value is not None and len(value) > 256:
                    raise ValueError_("groupBy: group value longer than 256 characters")
        number: Number | None = None
        dkey: str | None = None
        if self.value is not None:
            try:
                raw = self.value(data)
            except PathError as exc:
                raise ValueError_(f"valueProperty: {exc}") from exc
            if raw is MISSING or raw is None:
                raise ValueError_(
                    f"valueProperty {self.meter.valueProperty}: no value in event data"
                )
            if self.agg.uses_distinct:
                dkey = distinct_key(raw)
            else:
                try:
                    number = to_number(raw)
                except ValueError_ as exc:
                    raise ValueError_(f"valueProperty {self.meter.valueProperty}: {exc}") from None
        return self._key(subject, groups), groups, number, dkey

    def extract_many(self, subject: str, datas: list[dict[str, Any]]) -> list[Extracted] | None:
        """:meth:`extract` for many events of one subject at once: per reading key, its group
        values, the indexes of its events (None: all of them) and their numbers or distinct
        keys. None when any event does not fit the meter: the caller then goes event by event,
        so that exactly those events are dead-lettered."""
        try:
            if not self.groups:
                return [self._values(self._key(subject, ()), (), None, datas)]
            by_groups: dict[tuple[str | None, ...], list[int]] = {}
            for i, data in enumerate(datas):
                groups = tuple([group_text(find(data)) for find in self.groups])
                indexes = by_groups.get(groups)
                if indexes is None:
                    by_groups[groups] = [i]
                else:
                    indexes.append(i)
            out = []
            for groups, indexes in by_groups.items():
                for value in groups:
                    if value is not None and len(value) > 256:
                        return None
                picked = datas if len(indexes) == len(datas) else [datas[i] for i in indexes]
                out.append(self._values(self._key(subject, groups), groups, indexes, picked))
            return out
        except (PathError, ValueError_):
            return None

    def _values(
        self,
        key: str,
        groups: tuple[str | None, ...],
        indexes: list[int] | None,
        datas: list[dict[str, Any]],
    ) -> Extracted:
        if self.value is None:
            return key, groups, indexes, None, None
        find = self.value
        raws = [find(data) for data in datas]
        if any(raw is MISSING or raw is None for raw in raws):
            raise ValueError_("no value")
        if self.agg.uses_distinct:
            keys = shared([raw if type(raw) is str else distinct_key(raw) for raw in raws])
            return key, groups, indexes, None, keys
        numbers = [raw if type(raw) is int else to_number(raw) for raw in raws]
        return key, groups, indexes, numbers, None

    def forget_keys(self) -> None:
        """Let go of the reading keys made so far (see ``_key``)."""
        self._keys.clear()

    def _key(self, subject: str, groups: tuple[str | None, ...]) -> str:
        """The reading key of a series, made once and kept until ``forget_keys`` or until
        _KEYS_HELD are: a worker lets them go at every round (runner._gather), since they
        grow with the series it has seen, and a round's are what it folds again and again.
        On the wide bench shape at 10,000 subjects they were ~70,000 keys, ~15 MB with their
        tuples, of a worker's ~195 MB peak; later up to _KEYS_HELD a meter, ~190 bytes a
        series besides the key (tracemalloc, 10,000 sum series), where its share of 1,000
        subjects is ~3,500 series in all. Made again, a key takes ~0.4 us against ~0.05
        found (this machine): a live round of ~3,500 series makes them again in ~1.5 ms."""
        key = self._keys.get((subject, groups))
        if key is None:
            if len(self._keys) >= _KEYS_HELD:
                self._keys.clear()
            key = self._keys[(subject, groups)] = reading_key(self.meter.id, subject, groups)
        return key


def _ms_to_dt(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


def _dt_to_ms(dt: datetime | None) -> int | None:
    return None if dt is None else round(dt.timestamp() * 1000)


def to_reading(
    acc: Acc,
    meter: Meter,
    subject: str,
    groups: tuple[str | None, ...],
    last_seq: int,
    now: datetime,
    replayed: list[int] | None = None,
    *,
    window: tuple[int, int] | None = None,
    late: int = 0,
) -> Reading:
    agg = AGGREGATIONS[meter.aggregation]
    numeric = acc.min is not None
    return Reading(
        meterId=meter.id,
        subject=subject,
        groupBy=dict(zip(sorted(meter.groupBy), groups, strict=True)),
        aggregation=meter.aggregation,
        count=acc.count,
        value=agg.result(acc) if acc.count else None,
        sum=acc.sum if numeric else None,
        avg=acc.sum / acc.count if numeric and acc.count else None,
        min=acc.min,
        max=acc.max,
        unique=len(acc.distinct) if acc.distinct is not None else None,
        latest=acc.latest,
        latestTime=_ms_to_dt(acc.latest_at) if acc.latest is not None else None,
        firstTime=_ms_to_dt(acc.first_at),
        lastTime=_ms_to_dt(acc.last_at),
        updatedAt=now,
        lastSeq=last_seq,
        meterStartSeq=meter.startSeq,
        distinct=sorted(acc.distinct) if acc.distinct is not None else None,
        replayed=replayed or None,
        windowStart=datetime.fromtimestamp(window[0], UTC) if window else None,
        windowEnd=datetime.fromtimestamp(window[0] + window[1], UTC) if window else None,
        late=late,
    )


def from_reading(reading: Reading) -> Acc:
    acc = Acc()
    acc.count = reading.count
    acc.min = reading.min
    acc.max = reading.max
    if reading.min is not None and reading.sum is not None:
        acc.sum = reading.sum
    acc.latest = reading.latest
    if reading.latest is not None:
        acc.latest_at = _dt_to_ms(reading.latestTime) or 0
        acc.latest_seq = reading.lastSeq
    acc.first_at = _dt_to_ms(reading.firstTime)
    acc.last_at = _dt_to_ms(reading.lastTime)
    if reading.distinct is not None:
        acc.distinct = set(shared(reading.distinct))
    return acc
