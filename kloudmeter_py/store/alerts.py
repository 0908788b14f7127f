"""Usage alerts in KV: channels, rules and events (bucket ``notifications``) and each
event's delivery to each of its channels (bucket ``deliveries``).

``notifications`` keys: ``channel.<id>``, ``rule.<id>``, ``event.<id>``. An event is created
with a create-if-absent under its id (core.alerts), so it exists once however often it is
noticed.

``deliveries`` keys: ``open.<event>.<channel>`` while a delivery is to be made (attempts,
next attempt time, last answer), ``done.<event>.<channel>`` once the receiver answered 2xx.
A delivery is finished by writing ``done`` and then deleting ``open``; a crash between the
two leaves both, and the sender, which looks for ``done`` before sending, drops the ``open``.
"""

import os
import string
import time
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from kloudmeter_py.config import Settings
from kloudmeter_py.errors import Conflict, NotFound
from kloudmeter_py.store.kv import get_with_revision, scan
from kloudmeter_py.store.layout import Layout
from kloudmeter_py.store.provision import ensure_alert_buckets

T = TypeVar("T")

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ID_CHARS = frozenset(string.ascii_letters + string.digits + "-_")


def new_id() -> str:
    """A ULID-shaped id (26 characters: milliseconds, then 80 random bits), as OpenMeter's."""
    n = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(n >> (5 * i)) & 31] for i in reversed(range(26)))


class Channel(msgspec.Struct, kw_only=True):
    """A webhook channel (OpenMeter's NotificationChannelWebhook)."""

    id: str
    type: str = "WEBHOOK"
    name: str
    url: str
    disabled: bool = False
    customHeaders: dict[str, str] = {}
    signingSecret: str
    metadata: dict[str, str] | None = None
    createdAt: datetime
    updatedAt: datetime
    deletedAt: datetime | None = None


class ThresholdValue(msgspec.Struct):
    value: float
    type: str


class Rule(msgspec.Struct, kw_only=True):
    """A rule as stored: channel ids and feature keys (answered as their meta objects)."""

    id: str
    type: str
    name: str
    disabled: bool = False
    channels: list[str]
    thresholds: list[ThresholdValue] = []
    features: list[str] = []
    metadata: dict[str, str] | None = None
    createdAt: datetime
    updatedAt: datetime


class StoredEvent(msgspec.Struct, kw_only=True):
    """A notification event as stored: the rule as it was, the payload, its channels."""

    id: str
    type: str
    createdAt: datetime
    ruleId: str
    subject: str
    feature: str | None = None
    channels: list[str]
    rule: dict[str, Any]
    payload: dict[str, Any]


class AttemptResponse(msgspec.Struct, kw_only=True):
    statusCode: int | None = None
    body: str = ""
    durationMs: int = 0


class Attempt(msgspec.Struct, kw_only=True):
    state: str
    response: AttemptResponse
    timestamp: datetime


class Delivery(msgspec.Struct, kw_only=True):
    """One event's delivery to one channel."""

    event: str
    channel: str
    state: str = "PENDING"  # PENDING, SENDING, RESENDING, SUCCESS, FAILED
    reason: str = ""
    attempts: list[Attempt] = []
    nextAttempt: datetime | None = None
    updatedAt: datetime


_enc = msgspec.json.Encoder()
_channel = msgspec.json.Decoder(Channel)
_rule = msgspec.json.Decoder(Rule)
_event = msgspec.json.Decoder(StoredEvent)
_delivery = msgspec.json.Decoder(Delivery)


def now() -> datetime:
    return datetime.now(UTC)


class AlertStore:
    """The two alert buckets, opened (and created when missing) on first use."""

    def __init__(self, js: JetStreamContext, settings: Settings, *, create: bool = True) -> None:
        self.js = js
        self.settings = settings
        self.create = create  # False: a missing bucket raises BucketNotFoundError
        self._kv: tuple[KeyValue, KeyValue] | None = None
        layout = Layout(settings)
        self._names = (layout.notifications_bucket, layout.deliveries_bucket)

    async def buckets(self) -> tuple[KeyValue, KeyValue]:
        if self._kv is None:
            if self.create:
                self._kv = await ensure_alert_buckets(self.js, self.settings)
            else:
                self._kv = (
                    await self.js.key_value(self._names[0]),
                    await self.js.key_value(self._names[1]),
                )
        return self._kv

    async def deliveries_seq(self) -> int:
        """The last sequence of the deliveries bucket's stream: it moves with every change."""
        await self.buckets()
        info = await self.js.stream_info(f"KV_{self._names[1]}")
        return int(info.state.last_seq or 0)

    # ---- channels and rules ----

    async def _get(self, key: str, decoder: msgspec.json.Decoder[T], what: str) -> tuple[T, int]:
        kv, _ = await self.buckets()
        raw, rev = await get_with_revision(kv, key)
        if raw is None:
            raise NotFound(f"{what} {key.split('.', 1)[1]!r} not found")
        return decoder.decode(raw), rev

    async def _list(self, prefix: str, decoder: msgspec.json.Decoder[T]) -> list[T]:
        await self.buckets()
        return [decoder.decode(v) for _, v in await scan(self.js, self._names[0], prefix + ".*")]

    async def _put(self, key: str, value: object, revision: int | None) -> None:
        """Create (``revision`` None) or compare-and-set on ``revision``."""
        kv, _ = await self.buckets()
        try:
            if revision is None:
                await kv.create(key, _enc.encode(value))
            else:
                await kv.update(key, _enc.encode(value), last=revision)
        except KeyWrongLastSequenceError:
            raise Conflict(f"{key} was changed meanwhile; retry") from None

    async def _delete(self, key: str, what: str) -> None:
        kv, _ = await self.buckets()
        raw, rev = await get_with_revision(kv, key)
        if raw is None:
            raise NotFound(f"{what} {key.split('.', 1)[1]!r} not found")
        await kv.delete(key, last=rev)

    async def channel(self, cid: str) -> tuple[Channel, int]:
        return await self._get(f"channel.{_token(cid)}", _channel, "channel")

    async def channels(self) -> list[Channel]:
        return await self._list("channel", _channel)

    async def put_channel(self, ch: Channel, revision: int | None = None) -> None:
        await self._put(f"channel.{ch.id}", ch, revision)

    async def delete_channel(self, cid: str) -> None:
        await self._delete(f"channel.{_token(cid)}", "channel")

    async def rule(self, rid: str) -> tuple[Rule, int]:
        return await self._get(f"rule.{_token(rid)}", _rule, "rule")

    async def rules(self) -> list[Rule]:
        return await self._list("rule", _rule)

    async def put_rule(self, rule: Rule, revision: int | None = None) -> None:
        await self._put(f"rule.{rule.id}", rule, revision)

    async def delete_rule(self, rid: str) -> None:
        await self._delete(f"rule.{_token(rid)}", "rule")

    # ---- events ----

    async def create_event(self, ev: StoredEvent) -> bool:
        """Store ``ev`` unless an event of its id exists; True when this call stored it."""
        kv, _ = await self.buckets()
        try:
            await kv.create(f"event.{ev.id}", _enc.encode(ev))
        except KeyWrongLastSequenceError:
            return False
        return True

    async def event(self, eid: str) -> StoredEvent:
        return (await self._get(f"event.{_token(eid)}", _event, "event"))[0]

    async def events(self) -> list[StoredEvent]:
        return await self._list("event", _event)

    # ---- deliveries ----

    async def open_deliveries(self, event_id: str, channels: list[str]) -> None:
        """A delivery to be made to each channel, unless one is open or done already."""
        _, kv = await self.buckets()
        for cid in channels:
            if (await get_with_revision(kv, f"done.{event_id}.{cid}"))[0] is not None:
                continue
            d = Delivery(event=event_id, channel=cid, nextAttempt=now(), updatedAt=now())
            try:
                await kv.create(f"open.{event_id}.{cid}", _enc.encode(d))
            except KeyWrongLastSequenceError:
                pass

    async def deliveries(self, event_id: str) -> list[Delivery]:
        """The event's deliveries, per channel (a finished one over an open one)."""
        await self.buckets()
        eid = _token(event_id)
        found: dict[str, Delivery] = {}
        for prefix in ("open", "done"):
            for _, raw in await scan(self.js, self._names[1], f"{prefix}.{eid}.*"):
                d = _delivery.decode(raw)
                found[d.channel] = d
        return [found[c] for c in sorted(found)]

    async def due(self) -> list[tuple[Delivery, int]]:
        """Every open delivery, with its revision."""
        _, kv = await self.buckets()
        out = []
        for key, raw in await scan(self.js, self._names[1], "open.*.*"):
            d = _delivery.decode(raw)
            rev = (await get_with_revision(kv, key))[1]
            out.append((d, rev))
        return out

    async def is_done(self, d: Delivery) -> bool:
        _, kv = await self.buckets()
        return (await get_with_revision(kv, f"done.{d.event}.{d.channel}"))[0] is not None

    async def update_open(self, d: Delivery, revision: int) -> int | None:
        """Compare-and-set an open delivery; None when another sender changed it first."""
        _, kv = await self.buckets()
        try:
            return await kv.update(f"open.{d.event}.{d.channel}", _enc.encode(d), last=revision)
        except KeyWrongLastSequenceError:
            return None

    async def finish(self, d: Delivery, revision: int) -> None:
        """Record a delivery made: ``done`` first, then the ``open`` one goes."""
        _, kv = await self.buckets()
        await kv.put(f"done.{d.event}.{d.channel}", _enc.encode(d))
        try:
            await kv.delete(f"open.{d.event}.{d.channel}", last=revision)
        except KeyWrongLastSequenceError:
            pass  # resent meanwhile: that delivery stays open

    async def drop_open(self, d: Delivery) -> None:
        _, kv = await self.buckets()
        try:
            await kv.delete(f"open.{d.event}.{d.channel}")
        except (KeyNotFoundError, KeyDeletedError):
            pass

    async def resend(self, event_id: str, channels: list[str]) -> None:
        """Deliver again to ``channels``: a fresh open delivery each (the done one goes)."""
        _, kv = await self.buckets()
        for cid in channels:
            old = (await get_with_revision(kv, f"done.{event_id}.{cid}"))[0]
            attempts = _delivery.decode(old).attempts if old is not None else []
            await kv.delete(f"done.{event_id}.{cid}")
            d = Delivery(
                event=event_id,
                channel=cid,
                state="RESENDING",
                attempts=attempts,
                nextAttempt=now(),
                updatedAt=now(),
            )
            await kv.put(f"open.{event_id}.{cid}", _enc.encode(d))


def rule_view(rule: Rule) -> dict[str, Any]:
    """A rule in OpenMeter's shape: its channels and features as meta objects."""
    out: dict[str, Any] = msgspec.to_builtins(rule)
    out["channels"] = [{"id": c, "type": "WEBHOOK"} for c in rule.channels]
    out["features"] = [{"id": f, "key": f} for f in rule.features]
    if rule.type != "entitlements.balance.threshold":
        out.pop("thresholds", None)
    return out


def _token(text: str) -> str:
    """An id from a path as a key token: anything but plain id characters is unknown."""
    if not text or not all(c in _ID_CHARS for c in text):
        raise NotFound(f"{text!r} not found")
    return text
