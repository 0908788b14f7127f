"""Lifecycle state folded once per event: one value per resource in the ``resources`` bucket.

Two kinds of resource, each a list of points kept sorted by event time (then stream order):

* a duration meter's resource (key ``meter.<meter>.<tenant>.<resource>``): the points
  ``core.rating.segments`` turns into records and charges, plus what the metadata comes from
  (the event data of the last start and of the first event, the type, region and name of the
  other starts);
* an AMP usage resource (key ``usage.<event type>.<tenant>.<resource>``): its CREATED and
  DESTROYED points with the location.

Folding is exact whatever order events are applied in: a point goes in at its place in event
time, and an event whose stream sequence is already among the points changes nothing (so a
redelivery, a replay or a second worker folding the same event is a no-op). A value written
for another generation of the meter (``meterStartSeq``: the meter was created again or
backfilled) counts as empty.

Corrections (core.corrections) fold the same way: a correction takes the point of the version
it replaces out of that version's key (its seq goes to ``gone``, so the version is never
folded in again) and, for an amendment, puts the amended point in at the correction's seq in
the amendment's key; ``corrected`` holds the corrections folded into a key, each once.
"""

import bisect
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import msgspec

from kloudmeter_py.core.keys import encode_token
from kloudmeter_py.core.models import Event, InvalidField, Meter
from kloudmeter_py.core.paths import MISSING, Finder, compile_path
from kloudmeter_py.core.rating import DEFAULT_ACTIONS, Point, to_decimal
from kloudmeter_py.core.usage import Lifecycle

USAGE_KINDS = ("CREATED", "DESTROYED")


class LifecyclePoint(msgspec.Struct, omit_defaults=True):
    """One lifecycle event of a resource (``data``: only what the metadata may need)."""

    at: datetime
    seq: int
    kind: str  # duration: start | change | stop | end; usage: CREATED | DESTROYED
    weight: Decimal | None = None
    location: str | None = None
    data: dict[str, Any] | None = None


class ResourceState(msgspec.Struct, omit_defaults=True):
    """The value of one key in the ``resources`` bucket."""

    tenant: str
    resource: str
    lastSeq: int  # the highest stream sequence folded in
    points: list[LifecyclePoint]
    meter: str | None = None  # None: an AMP usage resource
    meterStartSeq: int = 0
    gone: list[int] = []  # seqs of versions corrections took out (never folded in again)
    corrected: list[int] = []  # seqs of the corrections folded in


class Marker(msgspec.Struct):
    """Key ``done.meter.<meter>`` / ``done.usage.<type>``: history of this generation read
    from the stream up to ``through`` (the live consumer has everything after)."""

    startSeq: int
    through: int


state_encoder = msgspec.json.Encoder(decimal_format="string")
state_decoder = msgspec.json.Decoder(ResourceState)
marker_decoder = msgspec.json.Decoder(Marker)


def meter_key(meter_id: str, tenant: str, resource: str) -> str:
    return f"meter.{encode_token(meter_id)}.{encode_token(tenant)}.{encode_token(resource)}"


def meter_pattern(
    meter_id: str | None = None, tenant: str | None = None, resource: str | None = None
) -> str:
    """Server-side filter over meter resource keys (``*`` where not given)."""
    parts = [encode_token(p) if p is not None else "*" for p in (meter_id, tenant, resource)]
    return "meter." + ".".join(parts)


def usage_key(event_type: str, tenant: str, resource: str) -> str:
    return f"usage.{encode_token(event_type)}.{encode_token(tenant)}.{encode_token(resource)}"


def usage_pattern(event_type: str, tenant: str) -> str:
    return f"usage.{encode_token(event_type)}.{encode_token(tenant)}.*"


def meter_marker_key(meter_id: str) -> str:
    return f"done.meter.{encode_token(meter_id)}"


def usage_marker_key(event_type: str) -> str:
    return f"done.usage.{encode_token(event_type)}"


@dataclass(frozen=True)
class Change:
    """One event's point for one key: what a batch folds."""

    key: str
    tenant: str
    resource: str
    point: LifecyclePoint | None  # None: a correction that only takes a point out
    meter: str | None = None
    meter_start_seq: int = 0
    removes: int | None = None  # a correction's: the seq of the version it takes out
    correction: int | None = None  # a correction's own seq


class DurationMeter:
    """A duration meter's paths, compiled once."""

    def __init__(self, meter: Meter) -> None:
        assert meter.aggregation == "duration"
        self.meter = meter
        self.find_resource = compile_path(meter.resourceProperty or "$.resource_id")
        self.find_action = compile_path(meter.actionProperty or "$.event_type")
        self.find_weight: Finder | None = (
            compile_path(meter.valueProperty) if meter.valueProperty else None
        )
        self.actions = meter.actions or DEFAULT_ACTIONS

    def change(self, event: Event, seq: int, stored_at: datetime) -> Change | None:
        """This event's point for the meter, or None when it is not the meter's (an earlier
        generation's, no resource, an action the meter does not map)."""
        if seq <= self.meter.startSeq:
            return None
        rid = self.find_resource(event.data)
        kind = self.actions.get(str(self.find_action(event.data)))
        if rid is MISSING or rid is None or kind is None:
            return None
        weight: Decimal | None = None
        if self.find_weight is not None:
            value = self.find_weight(event.data)
            if value is not MISSING and value is not None:
                try:
                    weight = to_decimal(value, "valueProperty")
                except InvalidField:
                    weight = None
        resource = str(rid)
        point = LifecyclePoint(
            at=event.time or stored_at, seq=seq, kind=kind, weight=weight, data=event.data
        )
        return Change(
            key=meter_key(self.meter.id, event.subject, resource),
            tenant=event.subject,
            resource=resource,
            point=point,
            meter=self.meter.id,
            meter_start_seq=self.meter.startSeq,
        )


def usage_change(
    event: Event, seq: int, stored_at: datetime, event_type: str, find_location: Finder
) -> Change | None:
    """An AMP usage event's point (CREATED / DESTROYED of ``data.resource``), or None."""
    kind = str(event.data.get("event", "")).upper()
    resource = event.data.get("resource")
    if kind not in USAGE_KINDS or not isinstance(resource, str):
        return None
    location = find_location(event.data)
    point = LifecyclePoint(
        at=event.time or stored_at,
        seq=seq,
        kind=kind,
        location=None if location is MISSING else str(location),
    )
    return Change(
        key=usage_key(event_type, event.subject, resource),
        tenant=event.subject,
        resource=resource,
        point=point,
    )


def fold(state: ResourceState | None, changes: list[Change]) -> ResourceState | None:
    """The state with the changes of one key folded in; None when nothing changes.

    ``changes`` all have the same key and generation. A state of another generation counts as
    empty. A point whose stream sequence is already in the state is skipped.
    """
    if not changes:
        return None
    first = changes[0]
    if state is not None and (
        state.meter != first.meter or state.meterStartSeq != first.meter_start_seq
    ):
        state = None
    points = list(state.points) if state is not None else []
    gone = set(state.gone) if state is not None else set()
    corrected = set(state.corrected) if state is not None else set()
    seen = {p.seq for p in points}
    last_seq = state.lastSeq if state is not None else 0
    added = False
    for c in changes:
        if c.correction is not None:
            if c.correction in corrected:
                continue  # folded before
            corrected.add(c.correction)
            if c.removes is not None:
                gone.add(c.removes)
                points = [p for p in points if p.seq != c.removes]
            last_seq = max(last_seq, c.correction)
            added = True
        if c.point is None or c.point.seq in seen or c.point.seq in gone:
            continue
        seen.add(c.point.seq)
        last_seq = max(last_seq, c.point.seq)
        # Sorted by (event time, stream sequence): a late event goes in at its place.
        bisect.insort(points, c.point, key=lambda p: (p.at, p.seq))
        added = True
    if not added:
        return None
    if first.meter is not None and points:
        points = _keep_needed_data(points)
    return ResourceState(
        tenant=first.tenant,
        resource=first.resource,
        lastSeq=last_seq,
        points=points,
        meter=first.meter,
        meterStartSeq=first.meter_start_seq,
        gone=sorted(gone),
        corrected=sorted(corrected),
    )


# What an earlier start event's data can still give the metadata: a later start without
# these fields keeps the earlier value (see resource_view).
_CARRIED = ("resource_type", "region", "resource_name")


def _keep_needed_data(points: list[LifecyclePoint]) -> list[LifecyclePoint]:
    """Event data only where the metadata (see :func:`resource_view`) can still need it: the
    whole of it on the first point in stream order and on the last start in stream order;
    the type, region and name on the other starts. A resource powered on and off for years
    keeps small values."""
    first_seq = min(p.seq for p in points)
    last_start = max((p.seq for p in points if p.kind == "start"), default=None)
    out = []
    for p in points:
        if p.data is None or p.seq in (first_seq, last_start):
            out.append(p)
            continue
        carried = None
        if p.kind == "start":
            carried = {k: p.data[k] for k in _CARRIED if k in p.data} or None
        if carried != p.data:
            p = msgspec.structs.replace(p, data=carried)
        out.append(p)
    return out


@dataclass
class ResourceView:
    """What the rating routes need of one resource."""

    meter: str
    resource_id: str
    tenant: str
    resource_type: str | None
    region: str | None
    name: str | None
    points: list[Point]
    metadata: dict[str, Any]


def resource_view(state: ResourceState) -> ResourceView:
    """A duration resource as the rating routes see it. The metadata (type, region, name,
    the filterable fields) comes from the start events in stream order, or from the first
    event when there is no start: as if the events were read from the stream in order."""
    assert state.meter is not None
    view = ResourceView(
        meter=state.meter,
        resource_id=state.resource,
        tenant=state.tenant,
        resource_type=None,
        region=None,
        name=None,
        points=[Point(p.at, p.seq, p.kind, p.weight, p.data or {}) for p in state.points],
        metadata={},
    )
    for p in sorted(state.points, key=lambda p: p.seq):
        if p.data is None or not (p.kind == "start" or not view.metadata):
            continue
        data = p.data
        view.resource_type = data.get("resource_type", view.resource_type)
        view.region = data.get("region", view.region)
        view.name = data.get("resource_name", view.name)
        view.metadata = {
            **{k: v for k, v in data.items() if isinstance(v, str | int | float)},
            "tenant": state.tenant,
            "resource_id": state.resource,
            "meter": state.meter,
        }
    return view


def usage_events(state: ResourceState) -> list[Lifecycle]:
    """An AMP usage resource's events, for ``core.usage.usage_hours``."""
    return [
        Lifecycle(resource=state.resource, kind=p.kind, at=p.at, location=p.location, seq=p.seq)
        for p in state.points
    ]
