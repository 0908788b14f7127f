"""Stored events looked up by stream sequence or by id (corrections find their originals),
and the newest ones read from the end of the stream (OpenMeter's event list).

The events stream is keyed by subject, not by id: an id is found by reading the stored events
under a subject filter. :func:`find_events` does that with an ephemeral pull consumer and
keeps only the messages whose bytes could hold the id (see ``_needles``), so a scan costs one
delivery per message under the filter and a decode only for the few candidates.
"""

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from kloudmeter_py.core.budget import SLICE, ReadBudget
from kloudmeter_py.core.models import Event, cloud_event_decoder, event_decoder
from kloudmeter_py.errors import Unavailable
from kloudmeter_py.store.pull import ack_fields
from kloudmeter_py.store.wire import Wire, WireError

# Messages asked for per pull request, and how long a request may wait for them.
_BATCH = 20_000
_EXPIRES_S = 5.0


@dataclass(frozen=True)
class Stored:
    """One stored event: where and when the stream stored it, what it decodes to, its bytes.

    ``source`` and ``cloud_id`` are the CloudEvent's ``source`` and ``id`` when the body is a
    CloudEvent (its ``event.id`` is then ``"<source>#<id>"``), else None."""

    seq: int
    subject: str
    time: datetime
    event: Event
    raw: bytes
    source: str | None = None
    cloud_id: str | None = None


@dataclass
class Found:
    """What :func:`find_events` found, each in stream order: the events with the id asked for,
    and the corrections of any of them (``correction.of`` is one of their ids)."""

    events: list[Stored] = field(default_factory=list)
    corrections: list[Stored] = field(default_factory=list)


def decode_stored(seq: int, subject: str, stored_at: datetime, raw: bytes) -> Stored | None:
    """A stored message as a :class:`Stored`, or None when it is no event (undecodable)."""
    try:
        if b'"specversion"' in raw:
            cloud = cloud_event_decoder.decode(raw)
            event = cloud.to_event()
            return Stored(seq, subject, stored_at, event, raw, cloud.source, cloud.id)
        return Stored(seq, subject, stored_at, event_decoder.decode(raw), raw)
    except (msgspec.DecodeError, ValueError):  # ValueError: a CloudEvent of a reserved source
        return None


async def stored_event(js: JetStreamContext, stream: str, seq: int) -> Stored | None:
    """The event stored at ``seq``; None when there is no message there (any more) or it is
    not an event."""
    try:
        msg = await js.get_msg(stream, seq=seq)
    except NotFoundError:
        return None
    if msg.data is None or msg.subject is None:
        return None
    when = msg.time if msg.time is not None else datetime.fromtimestamp(0, UTC)
    return decode_stored(seq, msg.subject, when.astimezone(UTC), msg.data)


async def first_retained(js: JetStreamContext, stream: str) -> tuple[int, datetime | None] | None:
    """None while the stream still holds every message it stored (its first sequence is 1);
    else its first retained sequence and when that message was stored (None when the stream
    holds no message at all)."""
    state = (await js.stream_info(stream)).state
    if state.first_seq <= 1:
        return None
    if state.messages == 0:
        return state.first_seq, None
    try:
        msg = await js.get_msg(stream, seq=state.first_seq)
    except NotFoundError:
        return state.first_seq, None
    return state.first_seq, None if msg.time is None else msg.time.astimezone(UTC)


def _needles(event_id: str) -> tuple[bytes, ...]:
    """Byte strings of which a message must hold one to be an event with this id, or a
    correction of one: the id as JSON writes it (a KloudMeter event's id, a CloudEvent's id,
    a correction's ``of``, which ends with the CloudEvent's id when it names one), and each
    part after a ``#`` (the id part of ``"<source>#<id>"``). A message with a ``\\`` in it
    may spell the id with other escapes: it is always decoded."""
    parts = [event_id] + [event_id[i + 1 :] for i, c in enumerate(event_id) if c == "#"]
    return tuple(msgspec.json.encode(p)[1:-1] for p in parts if p)


def _matches(found: Stored, event_id: str) -> bool:
    return found.event.id == event_id or found.cloud_id == event_id


async def find_events(
    js: JetStreamContext,
    stream: str,
    filter_subject: str,
    event_id: str,
    *,
    before_seq: int | None = None,
    budget: ReadBudget | None = None,
) -> Found:
    """The stored events under ``filter_subject`` whose id is ``event_id`` (``Event.id``, or
    a CloudEvent's own ``id`` from any source), and the corrections of those events, each in
    stream order; only messages stored before ``before_seq`` when it is given, else before
    the scan began (events stored meanwhile do not keep it going). Undecodable messages are
    skipped. With ``budget``, its deadline (or a stop) ends the scan with its error.

    Cost: every message under the filter is delivered once (the filter narrows on the server:
    ``<stream>.events.*.<type>.<subject>`` reads one subject's events, ``<stream>.events.>``
    the whole stream), so the time grows linearly with the messages under the filter; only
    the messages whose bytes hold the id are decoded. Measured on this machine (2 shared
    cores, a local nats-server, 100-byte events, 50 subjects): the whole-stream filter over
    200,000 messages took 2.9-4.0 s in three runs, ~50,000-68,000 messages/s (nats-py's
    per-message delivery is most of it); one subject's 4,000 of them, 0.15-0.19 s.
    """
    needles = _needles(event_id)
    if before_seq is None:
        before_seq = (await js.stream_info(stream)).state.last_seq + 1

    def keep(data: bytes) -> bool:
        return b"\\" in data or any(n in data for n in needles)

    candidates = await _scan(js, stream, filter_subject, before_seq, keep, budget)
    decoded = [
        stored
        for seq, subject, stored_ns, data in candidates
        if (stored := decode_stored(seq, subject, _utc(stored_ns), data)) is not None
    ]
    found = Found(
        events=[s for s in decoded if s.event.correction is None and _matches(s, event_id)]
    )
    ids = {s.event.id for s in found.events}
    found.corrections = [
        s for s in decoded if s.event.correction is not None and s.event.correction.of in ids
    ]
    return found


async def _wait(done: asyncio.Event, budget: ReadBudget | None) -> None:
    """Wait for a request's end: ``done``, or silence for longer than the request may take
    (the server answers every request within its expiry; the caller then asks what is left).
    With a budget, its error once the deadline passes or it is stopped (looked at every
    slice of waiting)."""
    give_up = time.monotonic() + _EXPIRES_S + 2
    while time.monotonic() < give_up:
        if budget is not None:
            budget.check()
        try:
            async with asyncio.timeout(SLICE if budget is not None else _EXPIRES_S + 2):
                await done.wait()
            return
        except TimeoutError:
            continue


def _utc(stored_ns: int) -> datetime:
    """Epoch nanoseconds as a UTC datetime, truncated to microseconds as JetStream's message
    get answers it (a float division would round some a microsecond up)."""
    seconds, ns = divmod(stored_ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, UTC).replace(microsecond=ns // 1000)


async def subject_events(
    js: JetStreamContext, stream: str, filter_subject: str, through_seq: int
) -> list[Stored]:
    """Every stored event under ``filter_subject`` up to stream seq ``through_seq``, in stream
    order (undecodable messages skipped): what a correction of a unique meter is rebuilt
    from (worker.corrections). Its cost grows with the messages under the filter, as
    ``find_events``' (one subject's 4,000 events: ~0.15-0.2 s here)."""
    candidates = await _scan(js, stream, filter_subject, through_seq + 1, lambda _: True, None)
    return [
        stored
        for seq, subject, stored_ns, data in candidates
        if (stored := decode_stored(seq, subject, _utc(stored_ns), data)) is not None
    ]


async def _scan(
    js: JetStreamContext,
    stream: str,
    filter_subject: str,
    end: int,
    keep: Callable[[bytes], bool],
    budget: ReadBudget | None,
) -> list[tuple[int, str, int, bytes]]:
    """(seq, subject, stored ns, data) of the messages under ``filter_subject`` before
    stream seq ``end`` that ``keep`` keeps, through an ephemeral pull consumer."""
    nc = js._nc
    name = f"find-{uuid.uuid4().hex[:12]}"
    config = ConsumerConfig(
        name=name,
        filter_subject=filter_subject,
        ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.ALL,
        inactive_threshold=30.0,
        mem_storage=True,
        num_replicas=1,
    )
    info = await js.add_consumer(stream, config)
    candidates: list[tuple[int, str, int, bytes]] = []
    done = asyncio.Event()
    # Each request's end: its batch delivered, nothing more pending, or a status (404 no
    # messages, 408 expired) answering it.
    state = {"left": 0, "pending": int(info.num_pending or 0)}

    errors: list[Exception] = []

    async def on_msg(msg: Msg) -> None:
        if not msg.data and msg.headers and "Status" in msg.headers:
            done.set()
            return
        try:
            seq, _, stored_ns, pending = ack_fields(msg.reply)
        except ValueError as exc:  # not a consumer's delivery: stop, and say so
            errors.append(exc)
            done.set()
            return
        state["left"] -= 1
        state["pending"] = pending
        if seq >= end:
            state["pending"] = 0
            done.set()
            return
        data = msg.data
        if keep(data):
            candidates.append((seq, msg.subject, stored_ns, data))
        if pending == 0 or state["left"] <= 0:
            done.set()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_msg)
    next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}"
    try:
        while state["pending"] > 0:
            batch = min(_BATCH, state["pending"])
            state["left"] = batch
            done.clear()
            request = {"batch": batch, "expires": int(_EXPIRES_S * 1e9)}
            await nc.publish(next_subject, msgspec.json.encode(request), reply=inbox)
            await _wait(done, budget)
            if errors:
                raise errors[0]
            if state["left"] > 0 and state["pending"] > 0:
                # Answered short (a status): ask the server what is left.
                state["pending"] = int((await js.consumer_info(stream, name)).num_pending or 0)
    finally:
        await sub.unsubscribe()
        try:
            await js.delete_consumer(stream, name)
        except NotFoundError:
            pass
    return candidates


# Sequences read per direct-get request of a newest-first scan: the first request is small
# (a page of recent events is usually near the end), each next one four times larger, up to
# the cap (one answer of at most this many messages).
_FIRST_RANGE = 256
_MAX_RANGE = 8192


@dataclass
class Newest:
    """What :func:`newest_events` found: the events kept, newest first, and how many stored
    messages it read to find them."""

    events: list[Stored] = field(default_factory=list)
    read: int = 0


async def newest_events(
    wire: Wire,
    js: JetStreamContext,
    stream: str,
    filter_subject: str,
    keep: Callable[[Stored], bool],
    limit: int,
    *,
    stored_from: datetime | None = None,
    budget: ReadBudget | None = None,
) -> Newest:
    """The last ``limit`` stored events under ``filter_subject`` that ``keep`` accepts,
    newest first (by stream order: when JetStream stored them), and none stored before
    ``stored_from``. Undecodable messages are skipped.

    How: from the stream's last sequence backwards, a range of sequences at a time, each range
    one direct-get request (``batch`` from the range's first sequence, ``next_by_subj`` the
    filter: nats-server skips what the filter does not match), read newest first. The first
    range is 256 sequences and each next one four times larger (up to 8,192), so a page of
    recent events costs one or two requests and a long scan few requests per message. A
    batch has no upper sequence (``up_to_seq`` is for ``multi_last`` only), so the server
    reads on past the range until the batch is full: each range asks for about as many
    messages as the previous range's share under the filter makes likely (a subject's 2% of
    the stream: 3,500 -> 470 ms for 4,000 of 200,000 once this was done). With replicas, a
    direct get may be answered by a follower a moment behind the leader: the newest events
    can then be missing from one answer (never another subject's, nor any twice).

    Cost: it grows with the stored messages under the filter that are newer than the oldest
    one returned - about ``limit`` divided by the share of them that ``keep`` accepts - and
    not with the stream's length otherwise; ``stored_from`` ends the scan at the first older
    message. A filter nothing matches reads every message under ``filter_subject`` (a
    subject filter narrows that on the server; an event-time, id or partial-subject filter
    cannot). With ``budget``, its deadline (or a stop) ends the scan with its error.

    Measured on this machine (2 shared cores, load ~3 from other work, a local nats-server,
    200,000 stored events of ~100 bytes over 50 subjects, three runs each): the newest 100
    of all, 7-13 ms; a filter nothing matches over the whole stream, 200,000 read in
    5.1-6.8 s (~30,000-39,000 messages/s: the per-message decoding in Python is most of it);
    over one subject's 4,000 (a user's list), 0.35-0.53 s.
    """
    state = (await js.stream_info(stream)).state
    first, hi = max(int(state.first_seq or 1), 1), int(state.last_seq or 0)
    out = Newest()
    span = _FIRST_RANGE
    batch = span
    stored_from_ns = None if stored_from is None else _epoch_ns(stored_from)
    while hi >= first and len(out.events) < limit:
        if budget is not None:
            budget.check()
        lo = max(first, hi - span + 1)
        found = await _range(wire, stream, lo, hi, filter_subject, batch)
        # The next range asks for about as many messages as this one's share under the
        # filter makes likely: the server reads on past the range until it has the batch.
        share = (len(found) + 1) / (hi - lo + 1)
        span = min(span * 4, _MAX_RANGE)
        batch = min(span, int(share * span * 1.25) + 32)
        for seq, subject, stored_ns, data in reversed(found):
            if stored_from_ns is not None and stored_ns < stored_from_ns:
                return out
            out.read += 1
            if budget is not None:
                await budget.tick()
            stored = decode_stored(seq, subject, _utc(stored_ns), data)
            if stored is not None and keep(stored):
                out.events.append(stored)
                if len(out.events) >= limit:
                    return out
        hi = lo - 1
    return out


async def _range(
    wire: Wire, stream: str, lo: int, hi: int, filter_subject: str, batch: int
) -> list[tuple[int, str, int, bytes]]:
    """The stored messages under the filter from sequence ``lo`` to ``hi``, in stream order,
    asked for ``batch`` at a time. nats-server answers a batch from ``lo`` on and reads past
    ``hi`` when the filter skips messages (it has no upper bound for a batch): those are
    dropped. Another request follows while the answer filled the batch, or was cut short
    (by size) with more under the filter, short of ``hi``."""
    out: list[tuple[int, str, int, bytes]] = []
    start = lo
    while start <= hi:
        try:
            got, pending = await wire.messages_from(stream, start, batch, filter_subject)
        except WireError as exc:
            raise Unavailable(
                f"stream {stream}: stored events not read ({exc}): the stream needs direct "
                "gets (allow_direct, set by `kloudmeter setup`) and nats-server 2.11 or later"
            ) from exc
        out.extend(m for m in got if m[0] <= hi)
        if not got or got[-1][0] >= hi or (len(got) < batch and pending == 0):
            break
        start = got[-1][0] + 1
    return out


def _epoch_ns(t: datetime) -> int:
    """An aware time in epoch nanoseconds (exact: no float)."""
    delta = t.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000
