"""Lifecycle folding: the ``resources`` bucket, kept by the worker off its hot path.

Duration meters and the AMP usage summary read one KV value per resource
(``core.lifecycle``) instead of the event stream, so their routes cost what they ask for and
do not depend on ``METER_RETENTION``. This component keeps those values:

1. **Live.** One durable pull consumer per lifecycle event type (the event types of the
   duration meters, and ``KLOUDMETER_USAGE_EVENT_TYPE``), filtered on the server, shared by
   every worker. Each batch fetched: catch the meter view up (so a meter stored before the
   events were fetched is known), fold each event into the keys it changes, write each key
   once with compare-and-set on its revision, then acknowledge. A lost race re-reads the key
   and folds again; since a point goes in at its place in event time and a sequence already
   among the points is skipped, the order in which workers apply events does not matter and
   each event counts once. A consumer created for the first time starts at the beginning of
   the stream: that is the migration of an install without the bucket.
2. **History of a meter generation.** A duration meter created after its consumer exists, or
   moved back by a backfill, needs the events from its ``startSeq`` the consumer has already
   passed: they are read again through an ephemeral consumer up to the stream's last sequence
   (read once the meter is in the view: everything after it reaches the live consumer while
   the meter is known), then a marker ``done.meter.<meter>`` records the generation. A missing
   marker (an emptied bucket, a crash halfway) reads it again; the folds skip what is there.
3. **Generations.** A value of another generation of its meter counts as empty. Before one is
   overwritten, the meter view is caught up: a worker whose view was stale leaves the batch
   unacknowledged (redelivered soon), so it never wipes a newer generation's state.
"""

import asyncio
import contextlib
import dataclasses
import hashlib
import uuid
from collections.abc import AsyncIterator, Coroutine
from datetime import UTC, datetime
from typing import Any

import msgspec
import nats.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from kloudmeter_py.config import Settings
from kloudmeter_py.core.keys import encode_token
from kloudmeter_py.core.lifecycle import (
    Change,
    DurationMeter,
    Marker,
    fold,
    marker_decoder,
    meter_marker_key,
    state_decoder,
    state_encoder,
    usage_change,
    usage_marker_key,
)
from kloudmeter_py.core.meters import CompiledMeter
from kloudmeter_py.core.models import Event, event_decoder
from kloudmeter_py.core.paths import compile_path
from kloudmeter_py.store.kv import get_with_revision
from kloudmeter_py.store.layout import Layout
from kloudmeter_py.store.meters import MeterRegistry
from kloudmeter_py.store.provision import ensure_resources_bucket
from kloudmeter_py.worker.corrections import Corrector, NotYet, Unresolved

log = structlog.get_logger(__name__)

BATCH = 256
_ACK_WAIT = 10.0
# Idle fetches (of a second each) between two checks that the consumer still exists.
_CHECK_IDLE = 5
# nats-server: "message size exceeds maximum allowed" (the bucket's max value size)
_VALUE_TOO_LARGE = 10054
_marker_encoder = msgspec.json.Encoder()


class StaleView(Exception):
    """The meter view is older than a value about to be overwritten: fold the batch later."""


def consumer_name(event_type: str) -> str:
    """The shared durable consumer of one event type (a legal name whatever the type)."""
    return "lifecycle-" + hashlib.sha256(event_type.encode()).hexdigest()[:20]


# (stream seq, time stored, event, stored subject)
_Row = tuple[int, datetime, Event, str]


class LifecycleFolder:
    """Keeps the ``resources`` bucket: a pull loop per lifecycle event type, and a history
    read for each meter generation that needs one."""

    def __init__(
        self, js: JetStreamContext, settings: Settings, layout: Layout, registry: MeterRegistry
    ) -> None:
        self.js = js
        self.settings = settings
        self.layout = layout
        self.registry = registry
        self.usage_type = settings.usage_event_type
        self.find_location = compile_path(settings.usage_location)
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._compiled: dict[tuple[str, int], DurationMeter] = {}
        self.kv: KeyValue | None = None
        # Resolves corrections as the runner did (set by the worker; None: they are skipped).
        self.corrector: Corrector | None = None
        self.folded = 0  # events folded into at least one key (tests, logs)
        self.too_large = 0  # writes refused: a resource's value over the size limit

    async def start(self) -> None:
        self.kv = await ensure_resources_bucket(self.js, self.settings)
        self.registry.on_meter_added.append(self._meter_added)
        created = await self._ensure_consumer(self.usage_type)
        self._background(self._check_usage(created))
        for cm in list(self.registry.by_id.values()):
            self._meter_added(cm)

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.registry.on_meter_added.remove(self._meter_added)
        tasks = [*self._loops.values(), *self._tasks]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 10)
        self._loops.clear()
        self._tasks.clear()

    # ---- which meters and types ----

    def _meter_added(self, cm: CompiledMeter) -> None:
        if cm.meter.aggregation != "duration":
            return
        self._schedule_check(cm.meter.id, cm.meter.startSeq)

    def _schedule_check(self, meter_id: str, start_seq: int) -> None:
        self._background(self._check_generation(meter_id, start_seq))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _duration(self, event_type: str) -> list[DurationMeter]:
        out = []
        for cm in self.registry.by_type.get(event_type, ()):
            m = cm.meter
            if m.aggregation != "duration":
                continue
            dm = self._compiled.get((m.id, m.startSeq))
            if dm is None or dm.meter is not m:
                dm = self._compiled[(m.id, m.startSeq)] = DurationMeter(m)
            out.append(dm)
        return out

    async def _ensure_consumer(self, event_type: str) -> bool:
        """Start the pull loop of this event type; True when its durable consumer did not
        exist (it was made now, from the beginning of the stream)."""
        created = await self._make_consumer(event_type)
        if event_type not in self._loops:
            self._loops[event_type] = asyncio.create_task(
                self._pull_loop(event_type), name=f"lifecycle-{event_type}"
            )
        return created

    async def _make_consumer(self, event_type: str) -> bool:
        """Create the event type's durable consumer if it is missing; True if it was."""
        name = consumer_name(event_type)
        try:
            await self.js.consumer_info(self.layout.stream, name)
            return False
        except NotFoundError:
            pass
        # From the beginning of the stream: whatever it delivers again changes nothing.
        await self.js.add_consumer(
            self.layout.stream,
            ConsumerConfig(
                durable_name=name,
                description=f"kloudmeter lifecycle state of {event_type!r}",
                filter_subject=self.layout.stored_subject(encode_token(event_type), "*"),
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.EXPLICIT,
                # Short: a batch a crashed worker had taken comes back soon, and one that a
                # slow worker is still folding may well be folded twice (changing nothing).
                ack_wait=_ACK_WAIT,
                max_deliver=-1,
                max_ack_pending=4 * BATCH,
                num_replicas=self.settings.replicas,
            ),
        )
        log.info("lifecycle.consumer_created", event_type=event_type)
        return True

    # ---- live ----

    async def _pull_loop(self, event_type: str) -> None:
        name = consumer_name(event_type)
        sub: JetStreamContext.PullSubscription | None = None
        idle = 0
        while True:
            try:
                if sub is None:
                    sub = await self.js.pull_subscribe_bind(name, stream=self.layout.stream)
                try:
                    msgs = await sub.fetch(BATCH, timeout=1)
                except (nats.errors.TimeoutError, TimeoutError):
                    # (nats-py raises the builtin one too when the wait ends mid-batch)
                    idle += 1
                    if idle % _CHECK_IDLE == 0:
                        # Deleted meanwhile (by hand, or lost with a server): make it again.
                        await self._make_consumer(event_type)
                    continue
                idle = 0
                await self._live_batch(event_type, msgs)
            except asyncio.CancelledError:
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                raise
            except Exception as exc:
                log.warning("lifecycle.batch_failed", event_type=event_type, error=repr(exc))
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                    sub = None
                await asyncio.sleep(1)  # back off; unacknowledged events come again
                with contextlib.suppress(Exception):
                    await self._make_consumer(event_type)

    async def _live_batch(self, event_type: str, msgs: list[Msg]) -> None:
        await self.registry.catch_up()
        rows = [r for r in (_row(m) for m in msgs) if r is not None]
        try:
            await self._fold(event_type, rows, meter_id=None, usage=event_type == self.usage_type)
        except (StaleView, NotYet):
            # NotYet: a correction the runner has not recorded; it will, fold it then.
            for m in msgs:
                await m.nak(delay=0.2)
            return
        for m in msgs:
            await m.ack()

    # ---- history ----

    async def _check_usage(self, consumer_created: bool) -> None:
        """The usage summary's history (from the start of the stream), read once."""
        key = usage_marker_key(self.usage_type)
        try:
            marker = await self._marker(key)
            if marker is not None:
                return
            through = 0
            if not consumer_created:
                through = await self._replay(self.usage_type, 0, meter_id=None, usage=True)
            await self._put_marker(key, Marker(startSeq=0, through=through))
            log.info("lifecycle.usage_history_read", event_type=self.usage_type)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("lifecycle.history_failed", event_type=self.usage_type, error=repr(exc))
            await asyncio.sleep(5)
            self._background(self._check_usage(False))

    async def _check_generation(self, meter_id: str, start_seq: int) -> None:
        try:
            cm = self.registry.by_id.get(meter_id)
            if cm is None or cm.meter.startSeq != start_seq:
                return  # changed again meanwhile: that change checks its own generation
            event_type = cm.meter.eventType
            created = await self._ensure_consumer(event_type)
            key = meter_marker_key(meter_id)
            marker = await self._marker(key)
            if marker is not None and marker.startSeq == start_seq:
                return
            through = start_seq
            if not created:
                through = await self._replay(event_type, start_seq, meter_id=meter_id)
            cm = self.registry.by_id.get(meter_id)
            if cm is not None and cm.meter.startSeq == start_seq:
                await self._put_marker(key, Marker(startSeq=start_seq, through=through))
                log.info("lifecycle.generation_read", meter=meter_id, start_seq=start_seq)
        except asyncio.CancelledError:
            raise
        except StaleView:
            return
        except Exception as exc:
            # No marker was written: try again (the folds skip what is already there).
            log.error("lifecycle.history_failed", meter=meter_id, error=repr(exc))
            await asyncio.sleep(5)
            self._schedule_check(meter_id, start_seq)

    async def _replay(
        self, event_type: str, after_seq: int, *, meter_id: str | None, usage: bool = False
    ) -> int:
        """Fold the stored events of ``event_type`` after ``after_seq`` into one meter's (or
        the usage summary's) keys; return the stream sequence read up to."""
        info = await self.js.stream_info(self.layout.stream)
        through = int(info.state.last_seq)
        if through <= after_seq:
            return through
        filter_subject = self.layout.stored_subject(encode_token(event_type), "*")
        async for msgs in _read(self.js, self.layout.stream, filter_subject, after_seq, through):
            rows = [r for r in (_row(m) for m in msgs) if r is not None]
            await self._fold(event_type, rows, meter_id=meter_id, usage=usage)
        return through

    # ---- folding ----

    async def _fold(
        self, event_type: str, rows: list[_Row], *, meter_id: str | None, usage: bool
    ) -> None:
        """Fold rows into their keys: one compare-and-set write per key touched.
        ``meter_id``: only that meter (a history read); None: every duration meter."""
        meters = self._duration(event_type)
        if meter_id is not None:
            meters = [dm for dm in meters if dm.meter.id == meter_id]
        by_key: dict[str, list[Change]] = {}
        for seq, stored, event, subject in rows:
            if event.correction is not None:
                for fix in await self._corrected(seq, event, subject, meters, usage):
                    by_key.setdefault(fix.key, []).append(fix)
                continue
            for dm in meters:
                c = dm.change(event, seq, stored)
                if c is not None:
                    by_key.setdefault(c.key, []).append(c)
            if usage:
                c = usage_change(event, seq, stored, self.usage_type, self.find_location)
                if c is not None:
                    by_key.setdefault(c.key, []).append(c)
        if by_key:
            await asyncio.gather(*(self._write(key, cs) for key, cs in by_key.items()))
            self.folded += len(rows)

    async def _corrected(
        self, seq: int, event: Event, subject: str, meters: list[DurationMeter], usage: bool
    ) -> list[Change]:
        """A correction's changes (core.lifecycle): the replaced version's point taken out of
        its key and, for an amendment, the new point put in at the correction's seq (one
        change when both are of one key). The replaced version is the one the runner took
        out (worker.corrections); a correction the runner failed changes nothing here."""
        if self.corrector is None:
            return []
        try:
            _, _, removed, added = await self.corrector.versions(None, seq, event, subject)
        except Unresolved:
            return []
        out: list[Change] = []

        def both(take: Change | None, put: Change | None) -> None:
            removes = removed[2] if removed is not None else None
            if put is not None:
                put = dataclasses.replace(put, removes=removes, correction=seq)
                out.append(put)
            if take is not None and (put is None or take.key != put.key):
                out.append(dataclasses.replace(take, point=None, removes=removes, correction=seq))

        def at(ms: int) -> datetime:
            return datetime.fromtimestamp(ms / 1000, UTC)

        for dm in meters:
            both(
                dm.change(removed[1], removed[2], at(removed[0])) if removed else None,
                dm.change(added[1], seq, at(added[0])) if added else None,
            )
        if usage:
            loc = self.find_location
            both(
                usage_change(removed[1], removed[2], at(removed[0]), self.usage_type, loc)
                if removed
                else None,
                usage_change(added[1], seq, at(added[0]), self.usage_type, loc) if added else None,
            )
        return out

    async def _write(self, key: str, changes: list[Change]) -> None:
        assert self.kv is not None
        first = changes[0]
        while True:
            value, revision = await get_with_revision(self.kv, key)
            state = state_decoder.decode(value) if value is not None else None
            if (
                state is not None
                and first.meter is not None
                and (state.meterStartSeq != first.meter_start_seq)
            ):
                # Another generation: overwrite it only if this worker's view is current.
                await self.registry.catch_up()
                cm = self.registry.by_id.get(first.meter)
                if cm is None or cm.meter.startSeq != first.meter_start_seq:
                    raise StaleView(key)
            new = fold(state, changes)
            if new is None:
                return  # every event already there: a redelivery or a replay
            try:
                await self.kv.update(key, state_encoder.encode(new), last=revision)
                return
            except KeyWrongLastSequenceError:
                continue  # another worker wrote it: read again and fold again
            except (nats.errors.MaxPayloadError, APIError) as exc:
                if isinstance(exc, APIError) and exc.err_code != _VALUE_TOO_LARGE:
                    raise
                # The resource's points no longer fit in one value. Retrying cannot help and
                # would stop every other resource of the event type: these events are left
                # out of it (they stay in the stream while it keeps them), loudly.
                log.error(
                    "lifecycle.value_too_large",
                    key=key,
                    points=len(new.points),
                    skipped_seqs=[c.correction or c.point.seq for c in changes if c.point],
                )
                self.too_large += 1
                return

    async def _marker(self, key: str) -> Marker | None:
        assert self.kv is not None
        value, _ = await get_with_revision(self.kv, key)
        return marker_decoder.decode(value) if value is not None else None

    async def _put_marker(self, key: str, marker: Marker) -> None:
        assert self.kv is not None
        await self.kv.put(key, _marker_encoder.encode(marker))


def _row(msg: Msg) -> _Row | None:
    """The event of a stored message, or None for one the main worker dead-letters: not an
    event, or one whose body names another event type or subject (tenant) than the subject it
    was published on (NATS permissions are per subject: a tenant must not write another's
    resources)."""
    try:
        event = event_decoder.decode(msg.data)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
        return None
    tokens = msg.subject.rsplit(".", 2)
    if len(tokens) != 3 or tokens[1:] != [
        encode_token(event.eventType),
        encode_token(event.subject),
    ]:
        return None
    return msg.metadata.sequence.stream, msg.metadata.timestamp, event, msg.subject


async def _read(
    js: JetStreamContext, stream: str, filter_subject: str, after_seq: int, through: int
) -> AsyncIterator[list[Msg]]:
    """Stored messages on ``filter_subject`` in (after_seq, through], in batches, oldest first,
    through an ephemeral consumer."""
    name = f"lifecycle-read-{uuid.uuid4().hex[:12]}"
    config = ConsumerConfig(
        name=name,
        filter_subject=filter_subject,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=30.0,
        mem_storage=True,
        num_replicas=1,
    )
    if after_seq:
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = after_seq + 1
    info = await js.add_consumer(stream, config)
    pending = info.num_pending or 0
    sub = await js.pull_subscribe_bind(name, stream=stream)
    try:
        while pending > 0:
            try:
                msgs = await sub.fetch(min(pending, 500), timeout=2)
            except nats.errors.TimeoutError:
                pending = (await sub.consumer_info()).num_pending or 0
                continue
            batch = [m for m in msgs if m.metadata.sequence.stream <= through]
            if batch:
                yield batch
            if len(batch) < len(msgs):
                return
            pending = msgs[-1].metadata.num_pending
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(stream, name)
