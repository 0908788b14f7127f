"""The worker's side of corrections (core.corrections): find what each correction replaces.

A round sets its correction events aside while it folds its other events; then, in stream
order, ``Corrector.resolve`` turns each into a ``core.plan.CorrectionRow``:

1. Find the original: the stored message at the correction's ``seq``, or, without one, the
   event of that id among the stored events of the correction's own NATS subject (so of the
   same event type and subject: a tenant corrects only its own events) before it.
2. Check it: the same stored subject, the id named, itself no correction, stored earlier.
3. Read the original's ``History`` (the corrections bucket, key: its stream seq) and take the
   version the correction replaces (``core.corrections.replaced``): the original, nothing
   (cancelled) or an earlier amendment, read again from the stream.
4. Record the correction in the history (compare-and-set) before the round is written, so a
   replay after a crash finds the same replaced version; the history of a correction applied
   already is left as it is.

A correction that cannot be resolved fails as a whole (dead-lettered with the reason); its
original stays as it was. Corrections are rare: each costs a few requests (a stored message
or two, a history read and write), ~2-5 ms on this machine, and a round without any costs
nothing.
"""

from datetime import datetime
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from kloudmeter_py.core.corrections import (
    History,
    epoch_ms,
    event_ms,
    history_decoder,
    replaced,
    with_applied,
)
from kloudmeter_py.core.models import Event, encoder, event_decoder
from kloudmeter_py.core.plan import CorrectionRow, Version
from kloudmeter_py.store.events import find_events
from kloudmeter_py.store.kv import get_with_revision

# (tag, correction seq, correction event, the correction's stored-at ms)
Pending = tuple[Any, int, Event, int]


class Unresolved(Exception):
    """A correction that names no usable original (the reason is the message)."""


class NotYet(Exception):
    """A correction the runner has not recorded yet (``versions`` reads, never records)."""


def _ms(at: datetime | None) -> int:
    return epoch_ms(at) if at is not None else 0


class Corrector:
    """Resolves corrections for one runner (see the module docstring for the steps)."""

    def __init__(self, js: JetStreamContext, stream: str, history: KeyValue) -> None:
        self.js = js
        self.stream = stream
        self.history = history

    async def resolve(
        self, pending: list[Pending], subjects: dict[int, str]
    ) -> tuple[list[CorrectionRow], list[tuple[Any, int, str]]]:
        """The corrections as rows to fold, in stream order, and those that failed
        ``(tag, seq, reason)``. ``subjects``: the stored subject of each correction."""
        rows: list[CorrectionRow] = []
        failed: list[tuple[Any, int, str]] = []
        for tag, seq, event, _stored_ms in sorted(pending, key=lambda p: p[1]):
            try:
                rows.append(await self._one(tag, seq, event, subjects[seq]))
            except Unresolved as exc:
                of = event.correction.of if event.correction is not None else ""
                failed.append((tag, seq, f"correction of {of!r}: {exc}"))
        return rows, failed

    async def versions(self, tag: Any, seq: int, event: Event, subject: str) -> CorrectionRow:
        """A correction resolved like ``resolve`` does, for a reader that follows the runner
        (the lifecycle folding): NotYet until the runner has recorded it in the history, so
        that both take out the same version."""
        return await self._one(tag, seq, event, subject, record=False)

    async def _one(
        self, tag: Any, seq: int, event: Event, subject: str, *, record: bool = True
    ) -> CorrectionRow:
        corr = event.correction
        assert corr is not None
        # 1-2. the original
        if corr.seq is not None:
            original_seq = corr.seq
            if original_seq >= seq:
                raise Unresolved(f"seq {original_seq} is not before the correction ({seq})")
            stored = await self._stored(original_seq)
            if stored is None:
                raise Unresolved(f"no event at stream seq {original_seq} (left retention?)")
        else:
            original_seq, stored = await self._find(corr.of, subject, seq)
        original, stored_subject, stored_at = stored
        if stored_subject != subject or not (
            original.id == corr.of or original.id.endswith("#" + corr.of)
        ):
            raise Unresolved(
                f"the event at stream seq {original_seq} is not {corr.of!r} of this event "
                "type and subject"
            )
        if original.correction is not None:
            raise Unresolved("a correction cannot be corrected")
        original_ms = event_ms(original, stored_at)
        # 3. the version it replaces
        history, revision = await self._history(original_seq)
        before = replaced(history, seq)
        removed: Version | None
        if before is None:
            removed = (original_ms, original, original_seq)
        elif before[1] == "cancel":
            removed = None
        else:
            earlier = await self._stored(before[0])
            if earlier is None:
                raise Unresolved(f"its amendment at stream seq {before[0]} left retention")
            amended = earlier[0]
            # An amendment without a time keeps the original's.
            removed = (event_ms(amended, original_ms), amended, before[0])
        added = None
        if corr.action == "amend":
            added = (event_ms(event, original_ms), event)
        # 4. recorded before the round is written
        if record:
            await self._record(original_seq, history, revision, corr.of, seq, corr.action)
        elif history is None or all(entry[0] != seq for entry in history.applied):
            raise NotYet(f"correction at stream seq {seq}")
        return (tag, seq, removed, added)

    async def _stored(self, seq: int) -> tuple[Event, str, int] | None:
        try:
            msg = await self.js.get_msg(self.stream, seq)
        except NotFoundError:
            return None
        try:
            event = event_decoder.decode(msg.data or b"")
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise Unresolved(f"the message at stream seq {seq} is not an event") from None
        return event, msg.subject or "", _ms(msg.time)

    async def _find(
        self, event_id: str, subject: str, before_seq: int
    ) -> tuple[int, tuple[Event, str, int]]:
        found = await find_events(self.js, self.stream, subject, event_id, before_seq=before_seq)
        originals = [e for e in found.events if e.event.correction is None]
        if not originals:
            raise Unresolved("no such event of this event type and subject in the stream")
        if len(originals) > 1:
            raise Unresolved("several events have this id: name the one meant by its stream seq")
        one = originals[0]
        return one.seq, (one.event, one.subject, _ms(one.time))

    async def _history(self, original_seq: int) -> tuple[History | None, int]:
        value, revision = await get_with_revision(self.history, str(original_seq))
        return (history_decoder.decode(value) if value is not None else None), revision

    async def _record(
        self,
        original_seq: int,
        history: History | None,
        revision: int,
        of: str,
        seq: int,
        action: str,
    ) -> None:
        for _ in range(5):
            updated = with_applied(history, of, seq, action)
            if history is not None and updated.applied == history.applied:
                return  # a replay: recorded before
            body = encoder.encode(updated)
            try:
                if revision:
                    await self.history.update(str(original_seq), body, last=revision)
                else:
                    await self.history.create(str(original_seq), body)
                return
            except KeyWrongLastSequenceError:
                history, revision = await self._history(original_seq)
        raise RuntimeError(f"the corrections history of stream seq {original_seq} kept changing")
