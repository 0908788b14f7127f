"""KV helpers that nats-py lacks: server-side filtered listing and revision-aware reads."""

import asyncio
import uuid
from typing import TYPE_CHECKING

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyDeletedError, KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from kloudmeter_py.core.budget import ReadBudget
from kloudmeter_py.store.pull import RawPuller
from kloudmeter_py.store.wire import Wire

if TYPE_CHECKING:
    from kloudmeter_py.config import Settings

_DELETE_OPS = ("DEL", "PURGE")


def new_budget(timeout: float | None, what: str = "the read") -> ReadBudget:
    """A read's budget (``timeout`` seconds, None: no limit) whose turns are real pauses of
    the event loop, in which other tasks' round trips to NATS complete."""
    return ReadBudget(timeout, what=what, pause=asyncio.sleep)


async def read(
    js: JetStreamContext,
    stream: str,
    filter_subject: str,
    *,
    last_per_subject: bool = False,
    after_seq: int = 0,
    limit: int | None = None,
    budget: ReadBudget | None = None,
) -> list[Msg]:
    """Every stored message matching ``filter_subject`` (or the last one per subject), oldest
    first, through an ephemeral consumer filtered on the server. [] if the stream is missing.
    With ``budget``, each batch fetched is a tick of it (a deadline stops the read)."""
    name = f"read-{uuid.uuid4().hex[:12]}"
    config = ConsumerConfig(
        name=name,
        filter_subject=filter_subject,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT if last_per_subject else DeliverPolicy.ALL,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=10.0,
        mem_storage=True,
        num_replicas=1,
    )
    if after_seq:
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = after_seq + 1
    try:
        info = await js.add_consumer(stream, config)
    except NotFoundError:
        return []
    out: list[Msg] = []
    try:
        pending = info.num_pending or 0
        if pending:
            sub = await js.pull_subscribe_bind(name, stream=stream)
            try:
                give_up = asyncio.get_running_loop().time() + 15
                while pending > 0 and (limit is None or len(out) < limit):
                    try:
                        msgs = await sub.fetch(min(pending, 1000), timeout=1)
                    except nats.errors.TimeoutError:
                        # Counted when the consumer was made, maybe gone since (a key that
                        # expired, a purge): ask the server what is still to come.
                        pending = (await sub.consumer_info()).num_pending or 0
                        if pending and asyncio.get_running_loop().time() > give_up:
                            raise
                        continue
                    for msg in msgs:
                        out.append(msg)
                        pending = msg.metadata.num_pending
                    if budget is not None:
                        await budget.tick()  # fetch yields per message: here for the deadline
            finally:
                await sub.unsubscribe()
    finally:
        try:
            await js.delete_consumer(stream, name)
        except NotFoundError:
            pass
    return out if limit is None else out[:limit]


async def scan(
    js: JetStreamContext, bucket: str, pattern: str = ">", *, budget: ReadBudget | None = None
) -> list[tuple[str, bytes]]:
    """Latest value of every live key matching ``pattern`` (NATS wildcards), in key order.

    The filter runs on the server, so the cost is the number of keys that match, not the size
    of the bucket (nats-py's ``keys(filters=)`` filters client-side). With ``budget``, each key
    is a tick of it.
    """
    prefix = f"$KV.{bucket}."
    out: dict[str, bytes] = {}
    msgs = await read(js, f"KV_{bucket}", prefix + pattern, last_per_subject=True, budget=budget)
    for msg in msgs:
        if budget is not None:
            await budget.tick()
        key = msg.subject[len(prefix) :]
        if (msg.headers or {}).get("KV-Operation") in _DELETE_OPS:
            out.pop(key, None)
        else:
            out[key] = msg.data
    return sorted(out.items())


async def get_with_revision(kv: KeyValue, key: str) -> tuple[bytes | None, int]:
    """(value, revision); (None, revision of the delete marker or 0) when there is no value."""
    try:
        entry = await kv.get(key)
    except (KeyNotFoundError, KeyDeletedError) as exc:
        marker = getattr(exc, "entry", None)
        return None, (marker.revision or 0) if marker is not None else 0
    return entry.value, entry.revision or 0


async def connect(
    url: str, *, name: str, settings: "Settings | None" = None, **kw: object
) -> Client:
    """A nats-py connection that reconnects forever once up. With ``settings``, it presents the
    configured NATS credentials and client certificate, and a server that refuses them stops
    it with ``NatsRefused`` naming the setting (store.credentials), instead of retrying."""
    from kloudmeter_py.store.credentials import connect_nats

    return await connect_nats(
        [u.strip() for u in url.split(",") if u.strip()],
        name=name,
        settings=settings,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        **kw,
    )


class LeanLink:
    """A lean connection (store.wire), opened on first use and again after a failure: the
    worker's hot path, and the gateway's for bulk KV reads and for publishing ingested events
    (store.ingest). Through nats-py each message of
    a read costs its header parsing and a turn of the event loop (a read of 3,000 pages
    spent ~0.3 s of its ~0.5 s there); pulled here in batches of 1,000, as the worker pulls
    events."""

    def __init__(self, settings: "Settings", name: str) -> None:
        self.settings = settings
        self.name = name
        self._wire: Wire | None = None
        self._lock = asyncio.Lock()

    async def wire(self) -> Wire:
        from kloudmeter_py.store.credentials import load as load_credentials

        async with self._lock:
            if self._wire is None or self._wire.error is not None:
                self._wire = await Wire.connect(
                    self.settings.nats_url,
                    name=self.name,
                    credentials=load_credentials(self.settings),
                )
            return self._wire

    async def close(self) -> None:
        if self._wire is not None:
            await self._wire.close()
            self._wire = None


_READS_AT_ONCE = 4


async def scan_lean(
    js: JetStreamContext,
    wire: Wire,
    bucket: str,
    pattern: str | list[str],
    *,
    budget: ReadBudget | None = None,
    one_per_key: bool = False,
) -> list[tuple[str, bytes]]:
    """``scan`` (latest value of each live key matching the filters), with the messages
    pulled on ``wire`` in batches of 1,000; each batch is a tick of ``budget``. Unordered.

    ``one_per_key``: the bucket keeps one message per key (history 1), so every stored
    message is a key's latest and the consumer delivers them all in stream order, which
    costs nats-server far less than finding the last message of each subject."""
    patterns = [pattern] if isinstance(pattern, str) else pattern
    if len(patterns) > 1:
        # One consumer per filter, a few at a time: nats-server serves a consumer with
        # several filter subjects far more slowly (two filters of 10,000 keys each in a
        # bucket of 125,000: 3.4 s; each alone: 0.14 s).
        slots = asyncio.Semaphore(_READS_AT_ONCE)

        async def one(p: str) -> list[tuple[str, bytes]]:
            async with slots:
                return await scan_lean(js, wire, bucket, p, budget=budget, one_per_key=one_per_key)

        parts = await asyncio.gather(*(one(p) for p in dict.fromkeys(patterns)))
        return [kv for part in parts for kv in part]
    prefix = f"$KV.{bucket}."
    stream = f"KV_{bucket}"
    name = f"read-{uuid.uuid4().hex[:12]}"
    config = ConsumerConfig(
        name=name,
        filter_subject=prefix + patterns[0],
        deliver_policy=DeliverPolicy.ALL if one_per_key else DeliverPolicy.LAST_PER_SUBJECT,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=10.0,
        mem_storage=True,
        num_replicas=1,
    )
    try:
        info = await js.add_consumer(stream, config)
    except NotFoundError:
        return []
    out: dict[str, bytes] = {}
    try:
        left = info.num_pending or 0
        if left:
            puller = RawPuller(wire, stream, name, 1000)
            await puller.start()
            give_up = asyncio.get_running_loop().time() + 15
            try:
                while left > 0:
                    msgs = await puller.take(left, timeout=1)
                    if not msgs:
                        # Counted when the consumer was made: a key may have expired since.
                        left = (await js.consumer_info(stream, name)).num_pending or 0
                        if left and asyncio.get_running_loop().time() > give_up:
                            raise TimeoutError(f"{bucket}: {left} values not delivered")
                        continue
                    for msg in msgs:
                        key = msg.subject[len(prefix) :]
                        if msg.data:
                            out[key] = msg.data
                        else:  # a delete or purge marker
                            out.pop(key, None)
                    left -= len(msgs)
                    if budget is not None:
                        await budget.tick()
            finally:
                await puller.stop()
    finally:
        try:
            await js.delete_consumer(stream, name)
        except NotFoundError:
            pass
    return list(out.items())
