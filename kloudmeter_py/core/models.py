"""Strict msgspec models: parse at the edge, then trust the values."""

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from kloudmeter_py.core.aggregate import AGGREGATIONS
from kloudmeter_py.core.corrections import CORRECTION_PREFIX
from kloudmeter_py.core.paths import PathError, compile_path

Name = Annotated[str, Meta(min_length=1, max_length=256)]
MeterId = Annotated[str, Meta(min_length=1, max_length=128)]
AwareTime = Annotated[datetime, Meta(tz=True)]

# Any case, KloudMeter's and OpenMeter's names.
_AGGREGATION_ALIASES = {
    "count": "count",
    "sum": "sum",
    "avg": "avg",
    "average": "avg",
    "min": "min",
    "max": "max",
    "unique": "unique",
    "unique_count": "unique",
    "uniquecount": "unique",
    "latest": "latest",
    "duration": "duration",
}


class InvalidField(ValueError):
    """Input that names the offending field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def check_event_time(time: datetime | None) -> None:
    """For __post_init__: msgspec turns the ValueError into a ValidationError."""
    # Years 2..9998 keep every window and offset in range; an int check is cheap per event
    # (comparing aware datetimes costs microseconds).
    if time is not None and not 1 < time.year < 9999:
        raise ValueError("time must be within the years 0002 to 9998")


class Correction(Struct, forbid_unknown_fields=True):
    """What a correction event corrects (core.corrections): the original's id and, when the
    publisher knows it, its stream sequence (else the worker finds it by id among the
    events of the correction's own subject)."""

    action: Literal["cancel", "amend"]
    of: Name
    seq: Annotated[int, Meta(ge=1)] | None = None


class Event(Struct):
    """A KloudMeter usage event, as posted to /api/register-event or published to NATS."""

    id: Name
    eventType: Name
    subject: Name
    time: AwareTime | None = None
    data: dict[str, Any] = {}
    correction: Correction | None = None

    def __post_init__(self) -> None:
        check_event_time(self.time)
        if (self.correction is not None) != self.id.startswith(CORRECTION_PREFIX):
            raise ValueError(
                f"id: an id starting with {CORRECTION_PREFIX!r} is a correction's, and a "
                "correction's id must start with it"
            )


class CloudEvent(Struct):
    """A CloudEvents 1.0 event in JSON (OpenMeter's ingest format)."""

    id: Name
    source: Name
    specversion: Annotated[str, Meta(pattern=r"^1\.0$")]
    type: Name
    subject: Name
    time: AwareTime | None = None
    data: dict[str, Any] = {}
    datacontenttype: str | None = None
    dataschema: str | None = None

    def __post_init__(self) -> None:
        check_event_time(self.time)
        if cloud_event_id(self.source, self.id).startswith(CORRECTION_PREFIX):
            raise ValueError(f"source: {CORRECTION_PREFIX[:-1]!r} is reserved for corrections")

    def to_event(self) -> Event:
        return Event(
            id=cloud_event_id(self.source, self.id),
            eventType=self.type,
            subject=self.subject,
            time=self.time,
            data=self.data,
        )


def cloud_event_id(source: str, event_id: str) -> str:
    """CloudEvents are unique by source + id; this is their id for dedup."""
    return f"{source}#{event_id}"


class MeterIn(Struct, forbid_unknown_fields=True):
    """Body of POST /api/create-meter."""

    id: MeterId
    eventType: Name
    aggregation: str
    description: str = ""
    name: str = ""
    valueProperty: str | None = None
    groupBy: dict[Annotated[str, Meta(min_length=1, max_length=64)], str] = {}
    # Lifecycle ("duration") meters: which resource an event is about, which action it is,
    # and how action names map to start / change / stop / end.
    resourceProperty: str | None = None
    actionProperty: str | None = None
    actions: dict[str, str] | None = None


class Meter(Struct, kw_only=True):
    """A stored meter (value in the ``meters`` bucket)."""

    id: str
    eventType: str
    aggregation: str
    description: str = ""
    name: str = ""
    valueProperty: str | None = None
    groupBy: dict[str, str] = {}
    resourceProperty: str | None = None
    actionProperty: str | None = None
    actions: dict[str, str] | None = None
    createdAt: datetime
    # Events at stream sequences above this are applied live; older ones only by backfill.
    # Also tells a reading written for an earlier meter of the same id from the current one.
    startSeq: int = 0
    # When its name, description or groups last changed (None: never).
    updatedAt: datetime | None = None


def normalize_aggregation(name: Any) -> str:
    if not isinstance(name, str):
        raise InvalidField("aggregation", "must be a string")
    canonical = _AGGREGATION_ALIASES.get(name.strip().lower())
    if canonical is None or canonical not in AGGREGATIONS:
        allowed = ", ".join(sorted(AGGREGATIONS))
        raise InvalidField("aggregation", f"unknown aggregation {name!r}; one of {allowed}")
    return canonical


def validate_meter(body: MeterIn, *, now: datetime | None = None, start_seq: int = 0) -> Meter:
    """Check a meter definition completely, so nothing is discovered per event."""
    aggregation = normalize_aggregation(body.aggregation)
    value_property = body.valueProperty or None
    resource_property = action_property = None
    actions = None
    if aggregation == "duration":
        resource_property = body.resourceProperty or "$.resource_id"
        action_property = body.actionProperty or "$.event_type"
        actions = dict(body.actions) if body.actions else None
        for name, kind in (actions or {}).items():
            if kind not in ("start", "change", "stop", "end"):
                raise InvalidField(f"actions.{name}", "one of start, change, stop, end")
        for fname, path in (
            ("resourceProperty", resource_property),
            ("actionProperty", action_property),
        ):
            try:
                compile_path(path)
            except PathError as exc:
                raise InvalidField(fname, str(exc)) from exc
    elif body.resourceProperty or body.actionProperty or body.actions:
        raise InvalidField("resourceProperty", "only for aggregation 'duration'")
    if aggregation not in ("count", "duration") and value_property is None:
        raise InvalidField("valueProperty", f"required for aggregation {aggregation!r}")
    if value_property is not None:
        try:
            compile_path(value_property)
        except PathError as exc:
            raise InvalidField("valueProperty", str(exc)) from exc
    for group, path in body.groupBy.items():
        try:
            compile_path(path)
        except PathError as exc:
            raise InvalidField(f"groupBy.{group}", str(exc)) from exc
    return Meter(
        id=body.id,
        eventType=body.eventType,
        aggregation=aggregation,
        description=body.description,
        name=body.name,
        valueProperty=value_property,
        groupBy=dict(sorted(body.groupBy.items())),
        resourceProperty=resource_property,
        actionProperty=action_property,
        actions=actions,
        createdAt=now or datetime.now(UTC),
        startSeq=start_seq,
    )


# What a meter's update may not change, and why (update_meter).
_FIXED_REASONS = {
    "slug": "a meter's slug is its id",
    "eventType": "it decides which stored events the meter reads: that is a new meter (create "
    "one and backfill it)",
    "aggregation": "changing a meter's aggregation or value means a new meter and a backfill",
    "valueProperty": "changing a meter's aggregation or value means a new meter and a backfill",
}


def update_meter(
    meter: Meter,
    *,
    name: str | None = None,
    description: str | None = None,
    group_by: dict[str, str] | None = None,
    fixed: dict[str, str | None] | None = None,
    now: datetime,
) -> Meter:
    """``meter`` with a new name, description or more group-by keys (None: unchanged).

    ``fixed`` holds the fields of the update that may not change (``slug``, ``eventType``,
    ``aggregation``, ``valueProperty``), as given: each must say what the meter already
    has, else InvalidField naming it. ``group_by``, when given, is the whole new set: every
    existing key with its path as it is (a key's path cannot change, nor a key go: its
    readings were split by it), plus any new keys, whose paths are checked here. The new
    meter keeps ``startSeq``: whether new groups need a new generation is the store's to say
    (it depends on what the stream holds)."""
    current: dict[str, str | None] = {
        "slug": meter.id,
        "eventType": meter.eventType,
        "aggregation": meter.aggregation,
        "valueProperty": meter.valueProperty,
    }
    for fname, given in (fixed or {}).items():
        if given is None:
            continue
        have = current[fname]
        want: str | None = given
        if fname == "aggregation":
            want = normalize_aggregation(given)
        if want != have:
            raise InvalidField(
                fname, f"cannot change from {have!r} to {given!r}: {_FIXED_REASONS[fname]}"
            )
    groups = dict(meter.groupBy)
    if group_by is not None:
        for key, path in meter.groupBy.items():
            if key not in group_by:
                raise InvalidField(
                    f"groupBy.{key}",
                    "a group-by key cannot be removed: the meter's readings are split by it "
                    "(give every existing key, with its path, and the keys to add)",
                )
            if group_by[key] != path:
                raise InvalidField(
                    f"groupBy.{key}",
                    f"an existing group-by key's path cannot change ({path!r} to "
                    f"{group_by[key]!r}): its readings were split by the old path; create a "
                    "new meter with the new path and backfill it",
                )
        for key, path in group_by.items():
            if key in groups:
                continue
            try:
                compile_path(path)
            except PathError as exc:
                raise InvalidField(f"groupBy.{key}", str(exc)) from exc
            groups[key] = path
    return msgspec.structs.replace(
        meter,
        name=meter.name if name is None else name,
        description=meter.description if description is None else description,
        groupBy=dict(sorted(groups.items())),
        updatedAt=now,
    )


class Reading(Struct, kw_only=True, omit_defaults=True):
    """A running reading (value in the ``readings`` bucket), one per meter x subject x group."""

    meterId: str
    subject: str
    groupBy: dict[str, str | None]
    aggregation: str
    count: int
    value: float | int | None
    sum: float | None = None
    avg: float | None = None
    min: float | None = None
    max: float | None = None
    unique: int | None = None
    latest: float | None = None
    latestTime: datetime | None = None
    firstTime: datetime | None = None
    lastTime: datetime | None = None
    updatedAt: datetime
    # Highest stream sequence folded in: a replayed event at or below it changes nothing.
    lastSeq: int
    # The meter's startSeq when this reading was written.
    meterStartSeq: int
    # Distinct values (unique meters only).
    distinct: list[str] | None = None
    # Stream sequences of dead letters replayed into this reading (each applies once).
    replayed: list[int] | None = None
    # Summaries only: the window, half-open [windowStart, windowEnd).
    windowStart: datetime | None = None
    windowEnd: datetime | None = None
    # Readings only: events too old for every summary level (still counted here).
    late: int = 0


_kloudmeter_event_decoder = msgspec.json.Decoder(Event)
cloud_event_decoder = msgspec.json.Decoder(CloudEvent)


class _EventDecoder:
    """Either format: a body with ``specversion`` is a CloudEvent, anything else KloudMeter's."""

    def decode(self, data: bytes) -> Event:
        if b'"specversion"' in data:
            return cloud_event_decoder.decode(data).to_event()
        return _kloudmeter_event_decoder.decode(data)


event_decoder = _EventDecoder()
meter_in_decoder = msgspec.json.Decoder(MeterIn)
meter_decoder = msgspec.json.Decoder(Meter)
reading_decoder = msgspec.json.Decoder(Reading)
encoder = msgspec.json.Encoder()
