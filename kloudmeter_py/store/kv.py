"""KV helpers that nats-py lacks: server-side filtered listing and revision-aware reads."""

import uuid

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyDeletedError, KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

_DELETE_OPS = ("DEL", "PURGE")


async def scan(js: JetStreamContext, bucket: str, pattern: str = ">") -> list[tuple[str, bytes]]:
    """Latest value of every live key matching ``pattern`` (NATS wildcards), in key order.

    Uses an ephemeral consumer filtered on the server, so the cost is the number of keys that
    match, not the size of the bucket (nats-py's ``keys(filters=)`` filters client-side).
    """
    stream = f"KV_{bucket}"
    prefix = f"$KV.{bucket}."
    name = f"scan-{uuid.uuid4().hex[:12]}"
    try:
        info = await js.add_consumer(
            stream,
            ConsumerConfig(
                name=name,
                filter_subject=prefix + pattern,
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                ack_policy=AckPolicy.NONE,
                inactive_threshold=10.0,
                mem_storage=True,
                num_replicas=1,
            ),
        )
    except NotFoundError:
        return []
    out: dict[str, bytes] = {}
    try:
        pending = info.num_pending or 0
        if pending:
            sub = await js.pull_subscribe_bind(name, stream=stream)
            try:
                while pending > 0:
                    msgs = await sub.fetch(min(pending, 1000), timeout=5)
                    for msg in msgs:
                        key = msg.subject[len(prefix) :]
                        op = (msg.headers or {}).get("KV-Operation")
                        if op in _DELETE_OPS:
                            out.pop(key, None)
                        else:
                            out[key] = msg.data
                        pending = msg.metadata.num_pending
            finally:
                await sub.unsubscribe()
    finally:
        try:
            await js.delete_consumer(stream, name)
        except NotFoundError:
            pass
    return sorted(out.items())


async def get_with_revision(kv: KeyValue, key: str) -> tuple[bytes | None, int]:
    """(value, revision); (None, revision of the delete marker or 0) when there is no value."""
    try:
        entry = await kv.get(key)
    except (KeyNotFoundError, KeyDeletedError) as exc:
        marker = getattr(exc, "entry", None)
        return None, (marker.revision or 0) if marker is not None else 0
    return entry.value, entry.revision or 0


async def connect(url: str, *, name: str, **kw: object) -> Client:
    import nats

    nc: Client = await nats.connect(
        servers=[u.strip() for u in url.split(",") if u.strip()],
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        **kw,
    )
    return nc
