"""The fold step of a runner (worker.runner): a round's messages decoded, checked against the
long dedup, folded into parts per series and finest window (core.plan.fold_rows), its
corrections resolved and folded after them, and then spread into the keys the round changes
(core.plan.spread), which worker.write loads, applies and stores.

1. ``decode``: an unusable message is recorded for the dead letters, unless its partition's
   checkpoint shows it is only replayed.
2. ``dedup`` (with METER_DEDUP_HORIZON, a dedup horizon beyond the stream's): the first
   stream sequence of each event id is recorded before any reading changes; a later one is
   dropped.
3. ``fold_subject`` / ``fold_round``: the events of one subject together, as they arrive
   (``runner._FOLD_AT`` of a subject) or at the end of the round (all of them then, with
   the long dedup, which looks at a whole round at once).
4. ``resolve_corrections``: corrections after the round's other events; a min, max, latest
   or unique state they change is rebuilt from the stream (``rebuild``).
5. ``spread_round``: the parts into the work per key (core.plan.KeyWork).

What it holds is the round's (worker.round.Round): the parts grow with the series and windows
a round's events touch, not with its events (core.rounds.ROUND_PARTS).
"""

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING

import msgspec
from nats.js.errors import KeyWrongLastSequenceError

from kloudmeter_py.core.corrections import counted, epoch_ms, event_ms
from kloudmeter_py.core.keys import encode_token
from kloudmeter_py.core.models import Event, event_decoder
from kloudmeter_py.core.plan import (
    Failure,
    Item,
    Rebuild,
    WKey,
    exact_items,
    fold_corrections,
    fold_rows,
    rebuild_targets,
    rebuilt_states,
    rolled,
    spread,
)
from kloudmeter_py.store.events import subject_events
from kloudmeter_py.store.kv import get_with_revision
from kloudmeter_py.store.wire import WireMsg
from kloudmeter_py.worker.checkpoint import Checkpoint
from kloudmeter_py.worker.round import Dead, Restart, Round, Row

if TYPE_CHECKING:
    from kloudmeter_py.worker import Worker


class Folder:
    """Decodes and folds a runner's rounds (the steps in this module's docstring)."""

    def __init__(self, worker: "Worker", cp: Checkpoint) -> None:
        self.w = worker
        self.cp = cp
        self.settings = worker.settings
        self.layout = worker.layout

    async def fold_round(self, rnd: Round) -> None:
        """Decode the round's events and fold them, the events of one subject together (one
        subject's events at a time, so that few decoded events are alive at once)."""
        decode = self.decode
        dead = rnd.dead
        if self.w.dedup is None:
            for rows in rnd.by_subject.values():
                self.fold_subject(rnd, rows)
        else:
            decoded = []
            for msg, seq, stored_ms in rnd.rows:
                event = decode(msg, seq, dead)
                if event is not None:
                    decoded.append((msg, seq, event_ms(event, stored_ms), event))
            if decoded:
                kept = await self.dedup(decoded)
                if len(kept) < len(decoded):
                    rnd.dropped.update({row[1] for row in decoded} - {row[1] for row in kept})
                rnd.corrections = [
                    (msg, seq, event, stored_ms)
                    for msg, seq, stored_ms, event in kept
                    if event.correction is not None
                ]
                self.fold_events(rnd, [row for row in kept if row[3].correction is None])
        if rnd.corrections:
            await self.resolve_corrections(rnd)
        rnd.by_subject = {}
        self.cp.folded = rnd.last
        if self.cp.restart_from is not None:
            raise Restart("replay for a new meter")

    def fold_subject(self, rnd: Round, rows: list[tuple[WireMsg, int, int]]) -> None:
        """Decode and fold rows of one subject (without the long dedup)."""
        decode = self.decode
        dead = rnd.dead
        decoded: list[Row] = []
        for msg, seq, stored_ms in rows:
            event = decode(msg, seq, dead)
            if event is not None:
                if event.correction is not None:
                    rnd.corrections.append((msg, seq, event, stored_ms))
                    continue
                decoded.append((msg, seq, event_ms(event, stored_ms), event))
        if decoded:
            self.fold_events(rnd, decoded)
        # Folded before the round ends, and not in stream order across subjects: a meter
        # added from now on with an earlier start must replay (see meter_added).
        self.cp.folded = max(self.cp.folded, rows[-1][1])

    def decode(self, msg: WireMsg, seq: int, dead: Dead) -> Event | None:
        """The event in a message, or None after recording why it is unusable."""
        replaying = self.cp.replaying(msg.subject, seq)
        if len(msg.data) > self.settings.max_body_bytes:
            if not replaying:
                limit = self.settings.max_body_bytes
                dead[(seq, "")] = (msg, None, f"invalid event: larger than {limit} bytes")
            return None
        try:
            event = event_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            if not replaying:
                dead[(seq, "")] = (msg, None, f"invalid event: {exc}")
            return None
        tokens = msg.subject.rsplit(".", 2)  # <stream>.events.<partition>.<type>.<subject>
        if len(tokens) < 3 or (
            tokens[-2] != encode_token(event.eventType) or tokens[-1] != encode_token(event.subject)
        ):
            if not replaying:
                dead[(seq, "")] = (
                    msg,
                    None,
                    "invalid event: eventType/subject do not match the NATS subject "
                    f"(publish to {self.layout.stream}.events."
                    f"{encode_token(event.eventType)}.{encode_token(event.subject)})",
                )
            return None
        return event

    async def dedup(self, decoded: list[Row]) -> list[Row]:
        """Drop events whose id was first stored at another stream sequence (long dedup).

        The first sequence seen for an id is recorded with a create (compare-and-set), before
        any reading changes, so a replay finds its own record and is applied again normally.
        """
        kv = self.w.dedup
        assert kv is not None
        first: dict[str, int] = {}
        for _, seq, _, event in decoded:
            first.setdefault(event.id, seq)
        ids = list(first)
        results = await asyncio.gather(
            *(kv.create(encode_token(i), str(first[i]).encode()) for i in ids),
            return_exceptions=True,
        )
        for event_id, result in zip(ids, results, strict=True):
            if isinstance(result, KeyWrongLastSequenceError):
                value, _ = await get_with_revision(kv, encode_token(event_id))
                if value is not None:
                    first[event_id] = int(value)
            elif isinstance(result, BaseException):
                raise result
        kept = [row for row in decoded if first[row[3].id] == row[1]]
        self.w.stats.deduplicated += len(decoded) - len(kept)
        return kept

    def fold_events(self, rnd: Round, rows: list[Row]) -> None:
        """Fold events into the round (core.plan.fold_rows); an event a meter cannot use is
        dead-lettered, unless it was read before and is only replayed for another meter."""
        self.failed(
            rnd, fold_rows(rnd.series, rows, self.w.registry.by_type, self.settings.interval)
        )

    def failed(self, rnd: Round, failures: list[Failure]) -> None:
        dead = rnd.dead
        for msg, seq, meter_id, reason in failures:
            if meter_id in self.cp.replay_meters or not self.cp.replaying(msg.subject, seq):
                dead[(seq, meter_id)] = (msg, meter_id, reason)

    async def resolve_corrections(self, rnd: Round) -> None:
        """Resolve the round's corrections (worker.corrections) and fold them after its
        other events (core.plan.fold_corrections); one that names no usable original is
        dead-lettered as a whole."""
        subjects = {seq: msg.subject for msg, seq, _, _ in rnd.corrections}
        rows, unresolved = await self.w.corrector.resolve(rnd.corrections, subjects)
        for msg, seq, reason in unresolved:
            if not self.cp.replaying(msg.subject, seq):
                rnd.dead[(seq, "")] = (msg, None, reason)
        rnd.correction_rows = rows
        rebuilds: list[Rebuild] = []
        self.failed(
            rnd,
            fold_corrections(
                rnd.series, rows, self.w.registry.by_type, self.settings.interval, rebuilds
            ),
        )
        if rebuilds:
            await self.rebuild(rnd, rebuilds)

    async def rebuild(self, rnd: Round, rebuilds: list[Rebuild]) -> None:
        """The keys a correction changes for a min, max, latest or unique meter, rebuilt from
        the stream (core.plan.rebuilt_states): such a state cannot take one event out. The
        events read are the correction's subject's up to it, or for a meter with meter-wide
        rollups (all but unique: a rollup window holds every subject of the partition) the
        partition's events of the type. Exact only while the stream still holds every event
        of the meter: else the correction is dead-lettered for it. Costs a scan of those
        events (store.events: one subject's 4,000 in ~0.15-0.2 s; a partition's share of a
        million-event stream several seconds), for rounds with such corrections only."""
        first = int((await self.w.js.stream_info(self.layout.stream)).state.first_seq or 0)
        partitions = self.settings.partitions
        scans: dict[str, list[tuple[int, int, Event, str | None]]] = {}
        for tag, seq, cm, removed, added in rebuilds:
            if first > max(cm.meter.startSeq, 0) + 1:
                reason = (
                    f"corrections of a {cm.agg.name} meter rebuild its states from the stream, "
                    f"which no longer holds its events before stream seq {first}"
                )
                self.failed(rnd, [(tag, seq, cm.meter.id, reason)])
                continue
            stored_subject: str = tag.subject
            if rolled(cm):  # <stream>.events.<partition>.<type>.<subject>: every subject
                stored_subject = stored_subject.rsplit(".", 1)[0] + ".*"
            rows = scans.get(stored_subject)
            if rows is None:  # once a round, up to its last such correction
                through = max(s for _, s, *_ in rebuilds)
                stored = await subject_events(
                    self.w.js, self.layout.stream, stored_subject, through
                )
                rows = scans[stored_subject] = [
                    (s.seq, epoch_ms(s.time), s.event, s.cloud_id) for s in stored
                ]
            upto = [row for row in rows if row[0] <= seq]
            versions = [(v[0], v[1]) for v in (removed, added) if v is not None]
            targets = rebuild_targets(cm, versions, rnd.levels, partitions)
            rnd.rebuilt.extend(
                rebuilt_states(seq, cm, counted(upto), targets, rnd.levels, partitions)
            )

    def spread_round(self, rnd: Round) -> None:
        """The keys the round changes (core.plan.spread); the parts stay only in them."""
        rnd.work = spread(rnd.series, rnd.levels, self.settings.interval, self.settings.partitions)
        rnd.series = {}

    def round_items(self, rnd: Round) -> dict[WKey, list[Item]]:
        """Every key's events one by one (core.plan.exact_items), decoded again from the
        round's messages when a key first needs them."""
        if rnd.items is None:
            scratch: Dead = {}

            def decoded() -> Iterator[tuple[int, int, Event]]:
                for msg, seq, stored_ms in rnd.rows:
                    if seq in rnd.dropped:
                        continue
                    event = self.decode(msg, seq, scratch)
                    if event is not None:
                        yield seq, event_ms(event, stored_ms), event

            rnd.items = exact_items(
                decoded(),
                self.w.registry.by_type,
                rnd.levels,
                self.settings.partitions,
                rnd.correction_rows,
                rnd.rebuilt,
            )
        return rnd.items
