"""Backfill: apply a meter to events stored before it (or from a time), exactly once.

The meter's ``startSeq`` is moved back and the meter stored again. Its readings are then of an
older generation and count as empty; each worker that has passed the new ``startSeq`` replays
its partitions from there, in order, and the per-reading ``lastSeq`` keeps the replay from
counting anything twice, for this meter and every other.
"""

import uuid
from datetime import datetime
from typing import Any

import msgspec
import structlog
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from kloudmeter_py.core.keys import encode_token
from kloudmeter_py.core.models import Meter, encoder, meter_decoder, reading_decoder
from kloudmeter_py.errors import Conflict, NotFound
from kloudmeter_py.store.kv import get_with_revision, scan
from kloudmeter_py.store.layout import Layout

log = structlog.get_logger(__name__)


async def seq_at(js: JetStreamContext, stream: str, when: datetime) -> int:
    """The last stream sequence stored before ``when`` (0 when none)."""
    request = msgspec.json.encode({"start_time": when.isoformat()})
    msg = await js._nc.request(f"$JS.API.STREAM.MSG.GET.{stream}", request, timeout=10)
    reply: dict[str, Any] = msgspec.json.decode(msg.data)
    if "error" in reply:
        if reply["error"].get("code") == 404:
            info = await js.stream_info(stream)
            return int(info.state.last_seq)
        raise NotFound(f"stream {stream}: {reply['error'].get('description')}")
    return int(reply["message"]["seq"]) - 1


async def start(
    js: JetStreamContext, layout: Layout, meter_id: str, since: datetime | None = None
) -> tuple[Meter, int]:
    """Move the meter's start back; return it and the number of events it now has to read."""
    kv = await js.key_value(layout.meters_bucket)
    key = encode_token(meter_id)
    value, revision = await get_with_revision(kv, key)
    if value is None:
        raise NotFound(f"meter {meter_id!r} not found", field="meter")
    meter = meter_decoder.decode(value)
    start_seq = 0 if since is None else await seq_at(js, layout.stream, since)
    new = msgspec.structs.replace(meter, startSeq=start_seq)
    from nats.js.errors import KeyWrongLastSequenceError

    try:
        await kv.update(key, encoder.encode(new), last=revision)
    except KeyWrongLastSequenceError:
        raise Conflict(f"meter {meter_id!r} changed meanwhile; try again") from None
    expected = await events_after(js, layout, meter, start_seq)
    log.info("backfill.started", meter=meter_id, start_seq=start_seq, events=expected)
    return new, expected


async def events_after(js: JetStreamContext, layout: Layout, meter: Meter, seq: int) -> int:
    """How many stored events of the meter's event type come after ``seq``."""
    name = f"count-{uuid.uuid4().hex[:12]}"
    config = ConsumerConfig(
        name=name,
        filter_subject=layout.stored_subject(encode_token(meter.eventType), "*"),
        ack_policy=AckPolicy.NONE,
        inactive_threshold=5.0,
        mem_storage=True,
        num_replicas=1,
    )
    if seq > 0:
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = seq + 1
    info = await js.add_consumer(layout.stream, config)
    try:
        await js.delete_consumer(layout.stream, name)
    except NotFoundError:
        pass
    return int(info.num_pending or 0)


async def applied(js: JetStreamContext, layout: Layout, meter: Meter) -> int:
    """Events of this meter generation in its readings so far."""
    total = 0
    for _, value in await scan(js, layout.readings_bucket, f"{encode_token(meter.id)}.>"):
        reading = reading_decoder.decode(value)
        if reading.meterStartSeq == meter.startSeq:
            total += reading.count
    return total
