"""Corrections: cancel or amend an event by id, as decisions with no I/O.

A correction is itself an event in the events stream, published to its original's NATS
subject (so the same partition, in order after it) in KloudMeter's event form, with a
``correction`` attribute naming the original::

    {"id": "kloudmeter-correction#812.cancel", "eventType": "api-calls", "subject": "acme",
     "correction": {"action": "cancel", "of": "evt-1", "seq": 812}}

    {"id": "kloudmeter-correction#812.amend.5f0c…", "eventType": "api-calls",
     "subject": "acme", "time": "…", "data": {"tokens": 12},
     "correction": {"action": "amend", "of": "evt-1", "seq": 812}}

An event's *versions* are the original and, after each correction in stream order, what
that correction left: nothing (cancel) or the amendment's own time and data (amend). The
worker folds a correction as the version it replaces taken out (an inverse fold) and, for an
amendment, its new version put in, both at the correction's stream sequence, so a key's
``last_seq`` makes it apply once like any event. Which version a correction replaces is the
last correction of the same original before it in the stream (``replaced``), or the
original: the worker keeps the corrections it has applied per original (``History``) in the
``corrections`` bucket, so a replay after a crash finds the same answer.
"""

import hashlib
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import msgspec

if TYPE_CHECKING:
    from kloudmeter_py.core.models import Event

# The id (and JetStream Nats-Msg-Id) of every correction starts with this: CloudEvents are
# stored under "<source>#<id>", so it is the id space of the CloudEvent source
# "kloudmeter-correction", which ingest refuses from producers. A retried correction has the
# same id and is dropped by the stream's duplicate window.
CORRECTION_PREFIX = "kloudmeter-correction#"
CORRECTION_SOURCE = CORRECTION_PREFIX[:-1]

Action = Literal["cancel", "amend"]

# Aggregations whose state a correction can take an event out of exactly (an inverse fold:
# count and sum less the event's; a duration meter's reading counts its events, and its
# resources follow corrections point by point, core.lifecycle). The others (min, max,
# unique, latest) need the remaining events read again: the worker rebuilds their states
# from the stream (core.plan.rebuilt_states).
INVERTIBLE = frozenset({"count", "sum", "avg", "duration"})


def invertible(aggregation: str) -> bool:
    """Whether corrections apply to a meter of this aggregation (its canonical name)."""
    return aggregation in INVERTIBLE


def reserved_id(event_id: str) -> bool:
    """Whether an event id is in the corrections' id space (refused from producers)."""
    return event_id.startswith(CORRECTION_PREFIX)


def correction_id(
    original_seq: int,
    action: Action,
    data: dict[str, Any] | None,
    time: datetime | None,
    after: int = 0,
) -> str:
    """The id of a correction: the same for the same correction of the same stored event
    made after the same last correction of it (``after``: that one's stream seq, 0 for
    none), so that a retry is a duplicate while a cancel, an amendment and a cancel again are
    three corrections; an amendment's id also depends on its new time and data."""
    base = f"{CORRECTION_PREFIX}{original_seq}.{action}"
    if after:
        base += f".after{after}"
    if action == "cancel":
        return base
    digest = hashlib.sha256(
        msgspec.json.encode([None if time is None else time.isoformat(), data], order="sorted")
    ).hexdigest()[:24]
    return f"{base}.{digest}"


class History(msgspec.Struct, forbid_unknown_fields=True):
    """The corrections applied to one stored event (key: its stream sequence), in stream
    order: ``[correction seq, "cancel" | "amend"]`` each."""

    of: str
    applied: list[tuple[int, str]] = []


history_decoder = msgspec.json.Decoder(History)


def replaced(history: History | None, correction_seq: int) -> tuple[int, str] | None:
    """The correction whose version the one at ``correction_seq`` replaces: the last one
    before it, or None (the original). Later ones, applied before a crash, do not count."""
    if history is None:
        return None
    before = [entry for entry in history.applied if entry[0] < correction_seq]
    return max(before) if before else None


def with_applied(history: History | None, of: str, correction_seq: int, action: str) -> History:
    """The history with this correction in it (unchanged when it already is: a replay)."""
    applied = list(history.applied) if history is not None else []
    if all(entry[0] != correction_seq for entry in applied):
        applied.append((correction_seq, action))
        applied.sort()
    return History(of=history.of if history is not None else of, applied=applied)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def epoch_ms(at: datetime) -> int:
    """An aware time in epoch ms, floored in integers as the worker floors a stored time's
    nanoseconds (no float in between: the original's stored time must give the window its
    own fold gave it)."""
    return (at - _EPOCH) // _MS


def event_ms(event: "Event", stored_ms: int) -> int:
    """An event's time in epoch ms: its own, else ``stored_ms`` (when it was stored, or for
    an amendment without a time, its original's time)."""
    if event.time is not None:
        return int(event.time.timestamp() * 1000)
    return stored_ms


# (the seq of the version, its event time ms, its event): an event as it counts now
Counted = tuple[int, int, "Event"]


def counted(rows: Iterable[tuple[int, int, "Event", str | None]]) -> list[Counted]:
    """The events of stored rows ``(seq, stored-at ms, event, CloudEvent id or None)`` of one
    subject's or one partition's events of a type, in stream order, as they count after the
    corrections among them: each version the last correction of its original left (an
    amendment at its own seq, at its time or else the original's), cancelled ones left out,
    in the originals' order. A correction is resolved as the worker resolves it: its original
    at ``seq``, or the one earlier event of its id, of its own subject; one that names none
    (the worker dead-lettered it) changes nothing."""
    current: dict[int, Counted | None] = {}
    at_of: dict[int, int] = {}
    subject_of: dict[int, str] = {}
    ids: dict[tuple[str, str], list[int]] = {}
    for seq, stored_ms, event, cloud_id in rows:
        corr = event.correction
        if corr is None:
            at = event_ms(event, stored_ms)
            current[seq] = (seq, at, event)
            at_of[seq] = at
            subject_of[seq] = event.subject
            ids.setdefault((event.subject, event.id), []).append(seq)
            if cloud_id is not None and cloud_id != event.id:
                ids.setdefault((event.subject, cloud_id), []).append(seq)
            continue
        if corr.seq is not None:
            target = corr.seq if subject_of.get(corr.seq) == event.subject else None
        else:
            named = ids.get((event.subject, corr.of), [])
            target = named[0] if len(named) == 1 else None
        if target is None:
            continue
        if corr.action == "cancel":
            current[target] = None
        else:
            current[target] = (seq, event_ms(event, at_of[target]), event)
    return [version for version in current.values() if version is not None]
