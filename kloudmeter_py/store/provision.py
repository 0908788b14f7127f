"""Idempotent provisioning of the event stream, the dead-letter stream and the KV buckets."""

import re
from typing import Any

import structlog
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    SubjectTransform,
)
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from kloudmeter_py.config import Settings
from kloudmeter_py.errors import ConfigError
from kloudmeter_py.store.layout import Layout
from kloudmeter_py.store.migrate import migrate_summaries

log = structlog.get_logger(__name__)


async def provision(js: JetStreamContext, settings: Settings) -> Layout:
    """Create what is missing; leave what exists; refuse a changed partition count."""
    layout = Layout(settings)
    src, dest = layout.partition_transform
    events = StreamConfig(
        name=layout.stream,
        description="kloudmeter usage events (source of truth)",
        subjects=[layout.events_subjects],
        subject_transform=SubjectTransform(src=src, dest=dest),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=float(settings.retention) if settings.retention else None,
        duplicate_window=float(settings.dedup_window),
        num_replicas=settings.replicas,
        discard=DiscardPolicy.OLD,
        # Direct gets: OpenMeter's event list reads the newest events in ranges (store.events).
        allow_direct=True,
    )
    await _ensure_stream(js, events, check_transform=True)
    await _allow_direct(js, layout.stream)
    errors = StreamConfig(
        name=layout.errors_stream,
        description="kloudmeter dead letters: events that could not be applied, with the reason",
        subjects=[layout.errors_subjects],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        duplicate_window=float(settings.dedup_window),
        num_replicas=settings.replicas,
    )
    await _ensure_stream(js, errors)
    for bucket, history, description in (
        (layout.meters_bucket, 5, "kloudmeter meter definitions"),
        (layout.readings_bucket, 1, "kloudmeter running readings"),
        (layout.offsets_bucket, 1, "kloudmeter worker checkpoints per partition"),
        (layout.auth_bucket, 1, "kloudmeter API users and token hashes"),
        (layout.prices_bucket, 5, "kloudmeter price book"),
        (layout.templates_bucket, 1, "kloudmeter rating templates"),
        (layout.features_bucket, 5, "kloudmeter features (OpenMeter entitlements)"),
        (layout.entitlements_bucket, 5, "kloudmeter entitlements with their resets"),
        (layout.grants_bucket, 5, "kloudmeter entitlement grants"),
        (layout.customers_bucket, 1, "kloudmeter customers, their subjects, subject entities"),
        (layout.portal_bucket, 1, "kloudmeter portal tokens (hashes)"),
    ):
        await _ensure_bucket(
            js,
            KeyValueConfig(
                bucket=bucket,
                history=history,
                description=description,
                storage=StorageType.FILE,
                replicas=settings.replicas,
            ),
        )
    await ensure_resources_bucket(js, settings)
    await ensure_corrections_bucket(js, settings)
    await ensure_alert_buckets(js, settings)
    widths = {"minute": settings.interval, "hour": 3600, "day": 86400}
    for level, bucket in layout.summary_buckets.items():
        # A window is written while it is open (and by late events); it expires this long
        # after its last write, so it is kept at least `retention` after it closes.
        await _ensure_bucket(
            js,
            KeyValueConfig(
                bucket=bucket,
                history=1,
                description=f"kloudmeter {level} summaries",
                storage=StorageType.FILE,
                replicas=settings.replicas,
                ttl=float(settings.summary_retention(level) + widths[level]),
            ),
        )
    await _ensure_bucket(
        js,
        KeyValueConfig(
            bucket=layout.leases_bucket,
            history=1,
            description="kloudmeter partition leases and worker heartbeats",
            storage=StorageType.FILE,
            replicas=settings.replicas,
            ttl=float(settings.lease_ttl),
        ),
    )
    if settings.dedup_horizon:
        await _ensure_bucket(
            js,
            KeyValueConfig(
                bucket=layout.dedup_bucket,
                history=1,
                description="kloudmeter event ids seen (long dedup), first stream sequence",
                storage=StorageType.FILE,
                replicas=settings.replicas,
                ttl=float(settings.dedup_horizon),
            ),
        )
    # Atomic batches (nats-server 2.12+) let the worker write up to 1000 readings with one
    # acknowledgement, each still conditional on its key's revision.
    for bucket in (layout.readings_bucket, *layout.summary_buckets.values()):
        await _allow_atomic_and_direct(js, f"KV_{bucket}")
    # Summaries of an earlier layout (a key per window) are folded into pages.
    await migrate_summaries(js, layout, settings.interval)
    log.info("setup.done", stream=layout.stream, partitions=layout.partitions)
    return layout


async def ensure_resources_bucket(js: JetStreamContext, settings: Settings) -> KeyValue:
    """The ``resources`` bucket (lifecycle state per resource), created when missing: the
    worker's lifecycle consumers then fill it from the beginning of the stream."""
    return await _kept_bucket(
        js,
        settings,
        Layout(settings).resources_bucket,
        "kloudmeter lifecycle state per resource (duration meters, usage)",
    )


async def ensure_corrections_bucket(js: JetStreamContext, settings: Settings) -> KeyValue:
    """The ``corrections`` bucket (core.corrections.History per corrected event, by stream
    sequence), created when missing: an installation set up before corrections gets it when
    a worker starts."""
    return await _kept_bucket(
        js,
        settings,
        Layout(settings).corrections_bucket,
        "kloudmeter corrections applied per stored event",
    )


async def ensure_alert_buckets(
    js: JetStreamContext, settings: Settings
) -> tuple[KeyValue, KeyValue]:
    """The ``notifications`` bucket (alert channels, rules and events) and the ``deliveries``
    bucket (each event's delivery per channel), created when missing."""
    layout = Layout(settings)
    notifications = await _kept_bucket(
        js, settings, layout.notifications_bucket, "kloudmeter alert channels, rules and events"
    )
    deliveries = await _kept_bucket(
        js, settings, layout.deliveries_bucket, "kloudmeter alert deliveries per channel"
    )
    return notifications, deliveries


async def _kept_bucket(
    js: JetStreamContext, settings: Settings, bucket: str, description: str
) -> KeyValue:
    """A bucket of one value a key, kept without expiry, created when missing."""
    await _ensure_bucket(
        js,
        KeyValueConfig(
            bucket=bucket,
            history=1,
            description=description,
            storage=StorageType.FILE,
            replicas=settings.replicas,
        ),
    )
    return await js.key_value(bucket)


async def _ensure_stream(js: JetStreamContext, config: StreamConfig, **kw: Any) -> None:
    assert config.name is not None
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)
        log.info("setup.stream_created", stream=config.name)
        return
    if kw.get("check_transform"):
        want = config.subject_transform
        assert want is not None
        _check_transform(config.name, info.config.subject_transform, want.dest)
    if info.config.duplicate_window != config.duplicate_window or (info.config.max_age or 0) != (
        config.max_age or 0
    ):
        info.config.duplicate_window = config.duplicate_window
        info.config.max_age = config.max_age
        await js.update_stream(info.config)
        log.info("setup.stream_updated", stream=config.name)


_PARTITION_COUNT = re.compile(r"\{\{partition\((\d+),")


def _check_transform(stream: str, have: SubjectTransform | None, want: str) -> None:
    """Refuse a stream whose stored-subject transform is not ``want``: another partition
    count (fixed at setup), or an earlier layout."""
    if have is not None and have.dest == want:
        return
    if have is not None and have.dest.endswith("{{wildcard(2)}}"):
        found = _PARTITION_COUNT.search(have.dest)
        fix = f"METER_PARTITIONS={found.group(1)}" if found else "its partition count"
        raise ConfigError(
            f"METER_PARTITIONS: stream {stream!r} was set up with transform {have.dest!r}, and "
            f"the partition count is fixed at setup: use {fix} with this stream (the default "
            "was 4 before it became 16), or set up a new one (METER_NATS_STREAM)"
        )
    raise ConfigError(
        f"stream {stream!r} stores events as {have.dest if have else None!r}, an "
        "earlier layout (partition last): set up a new stream (METER_NATS_STREAM) with "
        "this version and publish the events again"
    )


async def check_partitions(js: JetStreamContext, settings: Settings) -> None:
    """Refuse to run a worker against a stream set up with another METER_PARTITIONS.

    Its leases, consumers and checkpoints cover partitions 0 .. METER_PARTITIONS - 1, and its
    rollup keys name a subject's partition: with a smaller count it would leave the stream's
    other partitions unread, with a larger one file rollups under partitions the gateway's
    reads do not sum, in either case without an error. ``kloudmeter setup`` and ``up`` check
    the same when they find the stream (``provision``)."""
    layout = Layout(settings)
    try:
        info = await js.stream_info(layout.stream)
    except NotFoundError:
        raise ConfigError(
            f"METER_NATS_STREAM: stream {layout.stream!r} not found on {settings.nats_url}: "
            "run `kloudmeter setup` (or `kloudmeter up`) with the same settings first"
        ) from None
    _check_transform(layout.stream, info.config.subject_transform, layout.partition_transform[1])


async def _allow_direct(js: JetStreamContext, stream: str) -> None:
    """Direct gets on a stream set up before they were asked for."""
    info = await js.stream_info(stream)
    if info.config.allow_direct:
        return
    info.config.allow_direct = True
    await js.update_stream(info.config)
    log.info("setup.stream_updated", stream=stream, allow_direct=True)


async def _allow_atomic_and_direct(js: JetStreamContext, stream: str) -> None:
    """Atomic batch writes, and direct gets (the worker loads many keys in one request)."""
    info = await js.stream_info(stream)
    if info.config.allow_atomic and info.config.allow_direct:
        return
    info.config.allow_atomic = True
    info.config.allow_direct = True
    try:
        await js.update_stream(info.config)
    except Exception as exc:
        log.warning("setup.atomic_unsupported", stream=stream, error=str(exc))


async def _ensure_bucket(js: JetStreamContext, config: KeyValueConfig) -> None:
    try:
        await js.key_value(config.bucket)
    except BucketNotFoundError:
        await js.create_key_value(config)
        log.info("setup.bucket_created", bucket=config.bucket)
