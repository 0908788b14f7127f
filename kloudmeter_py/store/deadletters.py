"""Dead letters: list and count them, and replay them into readings exactly once.

A dead letter names the meter the event failed for and the event's stream sequence. Replaying
folds the event into that meter's reading and records the sequence in the reading's
``replayed`` list in the same compare-and-set write, so a replay repeated after a crash (or an
event that the worker later reads again) is never counted twice. The dead letter is deleted
only after that write is stored.

A letter whose event was corrected since (cancelled or amended: core.corrections) is resolved:
the correction took the event's place, an amendment folded in like any event. It is listed
with ``correctedBy`` (the corrections' stream sequences) and a replay deletes it as obsolete
instead of folding the original in beside its amendment.
"""

from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyWrongLastSequenceError

from kloudmeter_py.core.aggregate import Acc, ValueError_, fold
from kloudmeter_py.core.corrections import history_decoder
from kloudmeter_py.core.keys import decode_token, encode_token
from kloudmeter_py.core.meters import CompiledMeter, from_reading, to_reading
from kloudmeter_py.core.models import Meter, encoder, event_decoder, reading_decoder
from kloudmeter_py.store.kv import get_with_revision, read
from kloudmeter_py.store.layout import Layout
from kloudmeter_py.store.meters import MeterStore

log = structlog.get_logger(__name__)


class DeadLetter(msgspec.Struct, kw_only=True):
    seq: int  # sequence in the dead-letter stream
    meter: str | None  # None: the event itself was unusable
    eventSeq: int
    subject: str
    reason: str
    storedAt: str
    event: Any = None  # the original payload, when it is JSON
    # the corrections applied to the event since (resolved: see the module docstring)
    correctedBy: list[int] | None = None


class ReplayReport(msgspec.Struct, kw_only=True):
    replayed: int = 0
    alreadyApplied: int = 0
    obsolete: int = 0
    stillFailing: list[dict[str, Any]] = []


async def counts(js: JetStreamContext, layout: Layout) -> dict[str, Any]:
    info = await js.stream_info(layout.errors_stream, subjects_filter=">")
    prefix = layout.error_subject("")
    by_meter: dict[str, int] = {}
    for subject, n in sorted((info.state.subjects or {}).items()):
        token = subject[len(prefix) :]
        name = "_event" if token == "_event" else (decode_token(token) or "")
        by_meter[name] = n
    return {"total": info.state.messages, "byMeter": by_meter}


async def iterate(
    js: JetStreamContext, layout: Layout, meter: str | None = None, limit: int | None = None
) -> list[DeadLetter]:
    """Dead letters, oldest first (all, or those of one meter), each with the corrections
    of its event (one history read a letter)."""
    token = encode_token(meter) if meter is not None else ">"
    msgs = await read(js, layout.errors_stream, layout.error_subject(token), limit=limit)
    letters = [_letter(m.metadata.sequence.stream, m.headers, m.data) for m in msgs]
    if letters:
        try:
            history = await js.key_value(layout.corrections_bucket)
        except BucketNotFoundError:
            return letters  # set up before corrections, and no worker has started since
        for letter in letters:
            letter.correctedBy = await corrected_by(history, letter.eventSeq)
    return letters


async def corrected_by(history: Any, event_seq: int) -> list[int] | None:
    """The stream sequences of the corrections applied to the event at ``event_seq``."""
    value, _ = await get_with_revision(history, str(event_seq))
    if value is None:
        return None
    return [seq for seq, _ in history_decoder.decode(value).applied] or None


def _letter(seq: int, headers: dict[str, str] | None, data: bytes) -> DeadLetter:
    h = headers or {}
    try:
        event = msgspec.json.decode(data)
    except msgspec.DecodeError:
        event = None
    return DeadLetter(
        seq=seq,
        meter=h.get("Kloudmeter-Meter") or None,
        eventSeq=int(h.get("Kloudmeter-Stream-Seq", "0") or 0),
        subject=h.get("Kloudmeter-Subject", ""),
        reason=h.get("Kloudmeter-Error", ""),
        storedAt=h.get("Kloudmeter-Stored-At", ""),
        event=event,
    )


async def replay(
    js: JetStreamContext,
    layout: Layout,
    meter_id: str | None = None,
    *,
    unique_limit: int = 10_000,
) -> ReplayReport:
    """Fold replayable dead letters into their readings, once each; delete the ones applied.

    Letters of a meter that was deleted, or created again / backfilled after the event, are
    obsolete (the backfill covers them) and are deleted too; so are letters of events
    corrected since. Letters whose event still fails
    stay, with the reason in the report; so do letters of unusable events (``_event``): fix the
    producer and publish them again with a new id.
    """
    report = ReplayReport()
    meters = {m.id: m for m in await MeterStore(js, layout).list()}
    readings = await js.key_value(layout.readings_bucket)
    letters = await iterate(js, layout, meter_id)
    for letter in letters:
        if letter.meter is None:
            report.stillFailing.append({"seq": letter.seq, "reason": letter.reason})
            continue
        meter = meters.get(letter.meter)
        if meter is None or letter.eventSeq <= meter.startSeq or letter.correctedBy:
            report.obsolete += 1
            await js.delete_msg(layout.errors_stream, letter.seq)
            continue
        try:
            outcome = await _apply(js, readings, meter, letter, unique_limit)
        except ValueError_ as exc:
            report.stillFailing.append({"seq": letter.seq, "reason": str(exc)})
            continue
        if outcome == "applied":
            report.replayed += 1
        else:
            report.alreadyApplied += 1
        await js.delete_msg(layout.errors_stream, letter.seq)
    log.info(
        "deadletters.replayed",
        meter=meter_id,
        replayed=report.replayed,
        obsolete=report.obsolete,
        still_failing=len(report.stillFailing),
    )
    return report


async def _apply(
    js: JetStreamContext, readings: Any, meter: Meter, letter: DeadLetter, unique_limit: int
) -> str:
    if letter.event is None:
        raise ValueError_("the dead letter's payload is not JSON")
    try:
        event = event_decoder.decode(msgspec.json.encode(letter.event))
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ValueError_(f"invalid event: {exc}") from None
    cm = CompiledMeter(meter)
    key, groups, number, dkey = cm.extract(event.subject, event.data)
    if event.time is not None:
        at = event.time
    else:
        at = datetime.fromisoformat(letter.storedAt) if letter.storedAt else datetime.now(UTC)
    at_ms = int(at.timestamp() * 1000)
    for _ in range(20):
        value, revision = await get_with_revision(readings, key)
        acc, last_seq, replayed = Acc(), 0, []
        if value is not None:
            current = reading_decoder.decode(value)
            if current.meterStartSeq == meter.startSeq:
                acc, last_seq = from_reading(current), current.lastSeq
                replayed = list(current.replayed or [])
        if letter.eventSeq in replayed:
            return "already"
        fold(acc, number, dkey, at_ms, letter.eventSeq, unique_limit)
        replayed.append(letter.eventSeq)
        reading = to_reading(
            acc, meter, event.subject, groups, last_seq, datetime.now(UTC), sorted(replayed)
        )
        try:
            await readings.update(key, encoder.encode(reading), last=revision)
        except KeyWrongLastSequenceError:
            continue
        return "applied"
    raise ValueError_("the reading kept changing; try the replay again")
