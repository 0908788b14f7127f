"""Meter definitions in the ``meters`` bucket, and a live view of them fed by a KV watch."""

import asyncio
import contextlib
from collections.abc import Callable
from datetime import UTC, datetime

import msgspec
import structlog
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from kloudmeter_py.core.keys import ROLLUP, decode_token, encode_token
from kloudmeter_py.core.meters import CompiledMeter
from kloudmeter_py.core.models import (
    InvalidField,
    Meter,
    MeterIn,
    encoder,
    meter_decoder,
    validate_meter,
)
from kloudmeter_py.errors import Conflict, InvalidInput, NotFound
from kloudmeter_py.store.backfill import events_after
from kloudmeter_py.store.kv import get_with_revision, scan
from kloudmeter_py.store.layout import Layout

log = structlog.get_logger(__name__)


class MeterStore:
    """CRUD over the meters bucket, as the gateway uses it."""

    def __init__(self, js: JetStreamContext, layout: Layout) -> None:
        self.js = js
        self.layout = layout
        self._kv: KeyValue | None = None

    async def kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.js.key_value(self.layout.meters_bucket)
        return self._kv

    async def create(self, body: MeterIn) -> Meter:
        info = await self.js.stream_info(self.layout.stream)
        meter = validate_meter(body, now=datetime.now(UTC), start_seq=info.state.last_seq)
        kv = await self.kv()
        key = encode_token(meter.id)
        value, revision = await get_with_revision(kv, key)
        if value is not None:
            raise Conflict(f"meter {meter.id!r} already exists", field="id")
        try:
            await kv.update(key, encoder.encode(meter), last=revision)
        except KeyWrongLastSequenceError:
            raise Conflict(f"meter {meter.id!r} already exists", field="id") from None
        log.info("meter.created", meter=meter.id, aggregation=meter.aggregation)
        return meter

    async def update(self, meter_id: str, change: Callable[[Meter], Meter]) -> Meter:
        """Store ``change(meter)`` in place of the meter (compare-and-set on its revision:
        a concurrent change is a Conflict). ``change`` may alter the name, description and
        add group-by keys (core.models.update_meter decides what else may not change).

        New group-by keys change the keys of the readings and summaries of the events
        counted from then on (core.keys.reading_key: one token per group, in the sorted order
        of the group names), and a reader takes the pages of a meter generation (its
        ``startSeq``) with exactly as many tokens as the meter has groups. So a meter that
        has counted events cannot take a new key in place: its counts so far would drop out
        of every query (and the readings would hold two shapes). Keys are added only while the
        meter has counted nothing: no event of its type stored since its ``startSeq``. The
        meter then also starts a new generation at the stream's last sequence, read before
        that check: it counts exactly the events the old one would (none up to there, all
        after), and an event a worker folds meanwhile with the old groups is written for
        the old generation, which every reader skips (the worker replays it for the new one).
        When the stream stored nothing at all since the meter began, the generation cannot
        move and the key is refused too. Otherwise: a new meter (with the key) and a
        backfill."""
        kv = await self.kv()
        key = encode_token(meter_id)
        value, revision = await get_with_revision(kv, key)
        if value is None:
            raise NotFound(f"meter {meter_id!r} not found", field="key")
        current = meter_decoder.decode(value)
        try:
            new = change(current)
        except InvalidField as exc:
            raise InvalidInput(f"invalid meter update: {exc}", field=exc.field) from None
        if new.groupBy != current.groupBy:
            new = await self._new_generation(current, new)
        try:
            await kv.update(key, encoder.encode(new), last=revision)
        except KeyWrongLastSequenceError:
            raise Conflict(
                f"meter {meter_id!r} changed meanwhile; try again", field="key"
            ) from None
        log.info("meter.updated", meter=new.id, start_seq=new.startSeq)
        return new

    async def _new_generation(self, current: Meter, new: Meter) -> Meter:
        """``new`` (with more group-by keys) as a new generation, if the meter has counted
        nothing (see :meth:`update`); else InvalidInput naming ``groupBy``."""
        added = sorted(set(new.groupBy) - set(current.groupBy))
        last = int((await self.js.stream_info(self.layout.stream)).state.last_seq or 0)
        stored = await events_after(self.js, self.layout, current, current.startSeq)
        if stored:
            raise InvalidInput(
                f"groupBy: cannot add {', '.join(added)} to meter {current.id!r}: it has "
                f"counted {stored} stored event(s) of type {current.eventType!r}, whose "
                "readings and summaries are keyed by its groups as they are; a new key needs "
                "a new meter (create one with the key and backfill it)",
                field="groupBy",
            )
        if last <= current.startSeq:
            raise InvalidInput(
                f"groupBy: cannot add {', '.join(added)} to meter {current.id!r} yet: the "
                "stream has stored nothing since the meter began, so it cannot start a new "
                "generation; store any event (of any type) and try again, or create a new "
                "meter with the key",
                field="groupBy",
            )
        return msgspec.structs.replace(new, startSeq=last)

    async def get(self, meter_id: str) -> Meter:
        value, _ = await get_with_revision(await self.kv(), encode_token(meter_id))
        if value is None:
            raise NotFound(f"meter {meter_id!r} not found", field="key")
        return meter_decoder.decode(value)

    async def list(self) -> list[Meter]:
        return [meter_decoder.decode(v) for _, v in await scan(self.js, self.layout.meters_bucket)]

    async def delete(self, meter_id: str) -> None:
        kv = await self.kv()
        key = encode_token(meter_id)
        value, _ = await get_with_revision(kv, key)
        if value is None:
            raise NotFound(f"meter {meter_id!r} not found", field="key")
        await kv.delete(key)
        # Its readings go too; a reading written late for the old meter is told apart by
        # meterStartSeq, so a meter created again with the same id starts from zero.
        for bucket in (self.layout.readings_bucket, *self.layout.summary_buckets.values()):
            await self.js.purge_stream(f"KV_{bucket}", subject=f"$KV.{bucket}.{key}.>")
        for bucket in self.layout.summary_buckets.values():  # and its rollups
            await self.js.purge_stream(f"KV_{bucket}", subject=f"$KV.{bucket}.{key}{ROLLUP}.>")
        # And its resources' lifecycle state (a late write of the old generation is told apart
        # by meterStartSeq too).
        resources = self.layout.resources_bucket
        for subject in (f"meter.{key}.>", f"done.meter.{key}"):
            with contextlib.suppress(NotFoundError):
                await self.js.purge_stream(f"KV_{resources}", subject=f"$KV.{resources}.{subject}")
        log.info("meter.deleted", meter=meter_id)


class MeterRegistry:
    """The current meters, compiled, kept up to date by watching the bucket (no polling)."""

    def __init__(self, js: JetStreamContext, layout: Layout) -> None:
        self.js = js
        self.layout = layout
        self.by_id: dict[str, CompiledMeter] = {}
        self.by_type: dict[str, list[CompiledMeter]] = {}
        self.revision = 0
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        # Called with each meter created or changed, after the view has it.
        self.on_meter_added: list[Callable[[CompiledMeter], None]] = []

    async def start(self) -> None:
        kv = await self.js.key_value(self.layout.meters_bucket)
        watcher = await kv.watchall()
        self._task = asyncio.create_task(self._watch(watcher))
        async with asyncio.timeout(30):
            await self._ready.wait()

    async def _restart_watch(self) -> None:
        """A watch that fell behind (nats.py's ordered consumer can stall after a reconnect):
        start a new one from where this view is."""
        await self.stop()
        kv = await self.js.key_value(self.layout.meters_bucket)
        watcher = await kv.watchall()
        self._ready = asyncio.Event()
        self._task = asyncio.create_task(self._watch(watcher))
        async with asyncio.timeout(30):
            await self._ready.wait()

    async def stop(self) -> None:
        if self._task:
            for _ in range(50):
                self._task.cancel()
                done, _ = await asyncio.wait({self._task}, timeout=0.2)
                if done:
                    break

    async def _watch(self, watcher: KeyValue.KeyWatcher) -> None:
        try:
            async for entry in watcher:
                if entry is None:
                    self._ready.set()
                    continue
                self._apply(entry)
                async with self._changed:
                    self.revision = max(self.revision, entry.revision or 0)
                    self._changed.notify_all()
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    def _apply(self, entry: KeyValue.Entry) -> None:
        meter_id = decode_token(entry.key) or ""
        added: CompiledMeter | None = None
        previous = self.by_id.pop(meter_id, None)
        if entry.operation is None and entry.value:
            try:
                meter = meter_decoder.decode(entry.value)
                cm = self.by_id[meter_id] = CompiledMeter(meter)
                if previous is None or previous.meter.startSeq != meter.startSeq:
                    added = cm
            except (msgspec.DecodeError, ValueError) as exc:
                log.error("meter.unusable", meter=meter_id, error=str(exc))
        by_type: dict[str, list[CompiledMeter]] = {}
        for cm in self.by_id.values():
            by_type.setdefault(cm.meter.eventType, []).append(cm)
        self.by_type = by_type
        log.info(
            "meters.changed", meter=meter_id, op=entry.operation or "PUT", count=len(self.by_id)
        )
        if added is not None:
            for listener in self.on_meter_added:
                listener(added)

    def forget_keys(self) -> None:
        """Let go of every meter's cached reading keys (``CompiledMeter.forget_keys``): a
        worker's key cache is let go."""
        self._forget_meter_keys()

    def new_round(self) -> None:
        """A worker's round begins: the meters keep the reading keys of this round only
        (``CompiledMeter._key``)."""
        self._forget_meter_keys()

    def _forget_meter_keys(self) -> None:
        for cm in self.by_id.values():
            cm.forget_keys()

    async def catch_up(self, timeout: float = 5.0) -> None:
        """Wait until every meter change stored before now is in this view."""
        info = await self.js.stream_info(f"KV_{self.layout.meters_bucket}")
        target = info.state.last_seq
        if self.revision >= target:
            return
        async with self._changed:
            try:
                async with asyncio.timeout(timeout):
                    await self._changed.wait_for(lambda: self.revision >= target)
            except TimeoutError:
                log.warning("meters.watch_restarted", have=self.revision, want=target)
        if self.revision < target:
            await self._restart_watch()
