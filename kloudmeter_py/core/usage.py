"""Usage hours per location from CREATED / DESTROYED lifecycle events (AMP's usage summary)."""

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Lifecycle:
    resource: str
    kind: str  # "CREATED" or "DESTROYED"
    at: datetime
    location: str | None
    seq: int  # stream order breaks ties in time


def usage_hours(events: list[Lifecycle], start: datetime, end: datetime) -> dict[str, float]:
    """Hours each location's resources existed within [start, end).

    A resource exists from a CREATED to the next DESTROYED (or still at ``end``); order of
    arrival does not matter, event time does. The location is the CREATED event's.
    """
    by_resource: dict[str, list[Lifecycle]] = {}
    for e in events:
        by_resource.setdefault(e.resource, []).append(e)
    hours: dict[str, float] = {}
    for items in by_resource.values():
        items.sort(key=lambda e: (e.at, e.seq))
        opened: Lifecycle | None = None
        for e in items:
            if e.kind == "CREATED" and opened is None:
                opened = e
            elif e.kind == "DESTROYED" and opened is not None:
                _add(hours, opened, e.at, start, end)
                opened = None
        if opened is not None:
            _add(hours, opened, end, start, end)
    return hours


def _add(
    hours: dict[str, float], opened: Lifecycle, closed: datetime, start: datetime, end: datetime
) -> None:
    lo, hi = max(opened.at, start), min(closed, end)
    if hi > lo:
        location = opened.location or "unknown"
        hours[location] = hours.get(location, 0.0) + (hi - lo).total_seconds() / 3600
