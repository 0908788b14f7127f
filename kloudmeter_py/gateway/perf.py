"""Host metrics: the liz receiver's API on the normal event pipeline, per tenant.

``POST /api/perf/{host}/{epoch}`` takes a sample such as ``{"cpu": 3.5, "mem": 41.2}`` and
publishes one ``perf-host`` event per field (``subject`` = the tenant, ``time`` = epoch,
``data`` = ``{"host": host, "label": field, "value": number}``). A host belongs to a tenant
because the tenant is the event subject, as for every other event: a user's samples are its
tenant's, and an admin (or anyone when tokens are off) names the tenant with ``?tenant=``, or
posts into the space of hosts without a tenant (subject :data:`NO_TENANT`). The built-in
``perf-hosts`` meter (``avg`` of ``$.value`` grouped by ``$.host`` and ``$.label``) is created
on first use, so the worker keeps the usual window summaries; the ``GET`` routes read one
tenant's back from the ``summaries_minute`` and ``summaries_hour`` buckets in the liz shape.

Before tenants, samples went to the meter ``perf`` (subject = host, grouped by label). Its
summaries that hold only events stored before ``perf-hosts`` was created are still read, as
hosts without a tenant, until they expire (a day at most is read).
"""

import hashlib
import math
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
from aiohttp import web

from kloudmeter_py.core.keys import encode_token, event_subject
from kloudmeter_py.core.models import Meter, MeterIn, Reading, encoder
from kloudmeter_py.core.summaries import summary_readings
from kloudmeter_py.core.windows import widths
from kloudmeter_py.errors import Conflict, InvalidInput, NotFound
from kloudmeter_py.gateway.helpers import json_response, read_budget
from kloudmeter_py.gateway.keys import JS, LAYOUT, LEAN, METERS, SETTINGS
from kloudmeter_py.gateway.routes import USER, Op, Param, Routes, TenantScope, tenant_of
from kloudmeter_py.gateway.schemas import NUM, STR, array, ref
from kloudmeter_py.store.ingest import publish_events
from kloudmeter_py.store.kv import scan

PERF_METER_ID = "perf-hosts"
PERF_EVENT_TYPE = "perf-host"
PERF_METER = MeterIn(
    id=PERF_METER_ID,
    eventType=PERF_EVENT_TYPE,
    aggregation="avg",
    description="Host metrics posted to /api/perf (kloudmeter agent, liz monitor), per tenant",
    valueProperty="$.value",
    groupBy={"host": "$.host", "label": "$.label"},
)
# The subject of samples without a tenant (tokens off, or an admin without ?tenant=): not a
# tenant name (tenants are made of A-Z a-z 0-9 _ -), so no tenant can ever read or write it.
NO_TENANT = "~"
# A user's own tenant; an admin's ?tenant=, else the hosts without a tenant.
_HOSTS = TenantScope(param="tenant", admin_default=NO_TENANT)
_PERF_HOST = ("the host name",)
_PERF_HOST_SCHEMA = {"type": "object", "additionalProperties": ref("PerfSummary")}
_HOST_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 256}  # MAX_NAME
routes = Routes()
# Before tenants: the meter `perf`, subject = host, grouped by label (read, never written).
LEGACY_METER_ID = "perf"
LEGACY_GROUP_BY = {"label": "$.label"}

# (name in the summary key, summary level, how far back it reaches in seconds)
SUMMARIES = (("by-minute", "minute", 3600), ("by-hour", "hour", 86400))

MAX_EPOCH = 253402300799  # 9999-12-31T23:59:59Z
MAX_FIELDS = 256
MAX_NAME = 256
_EPOCH = re.compile(r"[0-9]{1,12}")
_IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAX_ID = 256  # an event id is at most 256 characters (models.Name)


def perf_tenant(request: web.Request) -> str:
    """The tenant whose hosts this request sees and writes, as the routes declare it: a user's
    own; for an admin (or anyone when tokens are off) ``?tenant=``, else :data:`NO_TENANT`."""
    return tenant_of(request) or NO_TENANT


def _check_meter(meter: Meter) -> Meter:
    if (
        meter.eventType != PERF_EVENT_TYPE
        or meter.aggregation != PERF_METER.aggregation
        or meter.valueProperty != PERF_METER.valueProperty
        or meter.groupBy != PERF_METER.groupBy
    ):
        raise Conflict(
            f"meter {PERF_METER_ID!r} exists with another definition; /api/perf needs "
            f"eventType {PERF_EVENT_TYPE!r}, aggregation 'avg', valueProperty '$.value' and "
            "groupBy {'host': '$.host', 'label': '$.label'} (delete it and the gateway creates "
            "it again)",
            field="id",
        )
    return meter


async def ensure_meter(app: web.Application) -> Meter:
    """The built-in ``perf-hosts`` meter, created when it does not exist yet (idempotent)."""
    meters = app[METERS]
    try:
        return _check_meter(await meters.get(PERF_METER_ID))
    except NotFound:
        pass
    try:
        return _check_meter(await meters.create(PERF_METER))
    except Conflict:
        # Created meanwhile by another request or gateway.
        return _check_meter(await meters.get(PERF_METER_ID))


async def _current_meter(app: web.Application) -> Meter | None:
    try:
        return _check_meter(await app[METERS].get(PERF_METER_ID))
    except NotFound:
        return None


async def _legacy_meter(app: web.Application) -> Meter | None:
    """The pre-tenant ``perf`` meter, if this installation has one."""
    try:
        meter = await app[METERS].get(LEGACY_METER_ID)
    except NotFound:
        return None
    if meter.eventType != "perf" or meter.groupBy != LEGACY_GROUP_BY:
        return None  # someone's own meter called perf
    return meter


def parse_epoch(text: str) -> int:
    if not _EPOCH.fullmatch(text) or int(text) > MAX_EPOCH:
        raise InvalidInput(
            f"epoch must be an integer number of seconds since 1970 (0..{MAX_EPOCH}), got {text!r}",
            field="epoch",
        )
    return int(text)


def parse_sample(raw: bytes) -> dict[str, int | float]:
    """The sample's numeric fields; anything else is a 400 naming the field."""
    if not raw.strip():
        raise InvalidInput("request body is empty; expected a JSON object of numeric fields")
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise InvalidInput(f"invalid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidInput(
            f"expected a JSON object of numeric fields, got {type(body).__name__}", field="body"
        )
    if not body:
        raise InvalidInput('the sample has no fields; expected e.g. {"cpu": 3.5}', field="body")
    if len(body) > MAX_FIELDS:
        raise InvalidInput(f"a sample has at most {MAX_FIELDS} fields", field="body")
    sample: dict[str, int | float] = {}
    for label, value in body.items():
        if not 1 <= len(label) <= MAX_NAME:
            raise InvalidInput(f"field names are 1..{MAX_NAME} characters", field=label[:64])
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInput(
                f"field {label!r} must be a number, got {_json_type(value)}", field=label
            )
        if not math.isfinite(value):
            raise InvalidInput(f"field {label!r} must be a finite number", field=label)
        sample[label] = value
    return sample


def _json_type(value: Any) -> str:
    return {
        type(None): "null",
        bool: "a boolean",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def sample_event_id(tenant: str, host: str, epoch: int, label: str, key: str | None = None) -> str:
    """Event id (``Nats-Msg-Id``) of one field of one sample; a retried post gets the same.

    Tenant, host and label are token-encoded so the id is a safe header value and
    unambiguous (two tenants' hosts of one name never share an id); an ``Idempotency-Key``
    (the agent sends one per sample) keeps several samples in one second apart. Ids longer
    than an event id may be are hashed, still deterministically.
    """
    event_id = f"perf:{encode_token(tenant)}:{encode_token(host)}:{epoch}:{encode_token(label)}"
    if key:
        event_id += f":{key}"
    if len(event_id) > _MAX_ID:
        event_id = "perf:" + hashlib.sha256(event_id.encode()).hexdigest()
    return event_id


@routes.post(
    "/api/perf/{host}/{epoch}",
    access=USER,
    tenant=_HOSTS,
    ingests=True,
    op=Op(
        "Post a host-metrics sample",
        "perf",
        status=202,
        response=ref("PerfAccepted"),
        path=(*_PERF_HOST, "seconds since 1970"),
        # An epoch up to 99999999999 (year 5138), below MAX_EPOCH.
        path_schemas=(_HOST_SCHEMA, {"type": "string", "pattern": "^[0-9]{1,11}$"}),
        query=(
            Param(
                "Idempotency-Key",
                {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                "a retried post with the same key counts once",
                where="header",
            ),
        ),
        body={
            "type": "object",
            "additionalProperties": NUM,
            "minProperties": 1,
            "maxProperties": MAX_FIELDS,
            "propertyNames": {"minLength": 1, "maxLength": MAX_NAME},
        },
        errors=(400, 409),
    ),
)
async def post_sample(request: web.Request) -> web.Response:
    host = request.match_info["host"]
    if len(host) > MAX_NAME:
        raise InvalidInput(f"host is at most {MAX_NAME} characters", field="host")
    epoch = parse_epoch(request.match_info["epoch"])
    tenant = perf_tenant(request)
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidInput(
            "Idempotency-Key must be 1..64 of A-Z a-z 0-9 _ -", field="Idempotency-Key"
        )
    sample = parse_sample(await request.read())
    await ensure_meter(request.app)
    subject = event_subject(request.app[LAYOUT].stream, PERF_EVENT_TYPE, tenant)
    at = datetime.fromtimestamp(epoch, UTC)
    events = []
    for label, value in sample.items():
        event_id = sample_event_id(tenant, host, epoch, label, key)
        body = encoder.encode(
            {
                "id": event_id,
                "eventType": PERF_EVENT_TYPE,
                "subject": tenant,
                "time": at,
                "data": {"host": host, "label": label, "value": value},
            }
        )
        events.append((subject, event_id, body))
    acks = await publish_events(await request.app[LEAN].wire(), events)
    duplicates = sum(1 for ack in acks if ack.duplicate)
    return json_response(
        PerfAccepted(status="ok", events=len(acks), duplicates=duplicates), status=202
    )


class PerfAccepted(msgspec.Struct, omit_defaults=True):
    """A sample's fields, one event each; duplicates: those stored already (a retry)."""

    status: Literal["ok"]
    events: int
    duplicates: int = 0


class PerfAverage(msgspec.Struct, rename="kebab"):
    """One window of one summary, as liz shows it."""

    start_sec: int
    end_sec: int
    interval_size_sec: int
    num_samples: int
    avg: int | float


class PerfSummary(msgspec.Struct, rename="kebab"):
    """``summary:<by-minute|by-hour>:<label>``: the windows with data in its range."""

    averages: list[PerfAverage]
    start: int
    end: int
    timeslice_size_sec: int
    average_count: int


PerfHost = dict[str, PerfSummary]


@dataclass
class _Window:
    """One host's label in one window: sums and counts merge exactly (old and new layout)."""

    total: float = 0.0
    count: int = 0


@dataclass
class _Found:
    # host -> summary name -> window start -> window
    hosts: dict[str, dict[str, dict[int, _Window]]] = field(default_factory=dict)

    def add(self, host: str, name: str, label: str, s: Reading) -> None:
        assert s.windowStart is not None and s.sum is not None
        series = self.hosts.setdefault(host, {}).setdefault(f"summary:{name}:{label}", {})
        window = series.setdefault(int(s.windowStart.timestamp()), _Window())
        window.total += s.sum
        window.count += s.count


def _average(start: int, window: _Window, width: int) -> PerfAverage:
    avg = window.total / window.count
    return PerfAverage(
        start_sec=start,
        end_sec=start + width,
        interval_size_sec=width,
        num_samples=window.count,
        avg=int(avg) if avg.is_integer() else avg,
    )


def _usable(s: Reading, meter: Meter, oldest: int, now: float) -> bool:
    return (
        s.meterStartSeq == meter.startSeq
        and s.windowStart is not None
        and s.sum is not None
        and bool(s.count)
        and oldest <= s.windowStart.timestamp() <= now
    )


async def summaries(request: web.Request, tenant: str, host: str | None) -> dict[str, PerfHost]:
    """Per host of ``tenant``, the liz summaries (``summary:by-minute:<label>`` ...) with data."""
    app = request.app
    js, layout, settings = app[JS], app[LAYOUT], app[SETTINGS]
    budget = read_budget(request)
    meter = await _current_meter(app)
    legacy = await _legacy_meter(app) if tenant == NO_TENANT else None
    now = time.time()
    level_widths = widths(settings.interval)
    host_tok = encode_token(host) if host is not None else "*"
    found = _Found()
    ranges: dict[str, tuple[int, int]] = {}
    for name, level, span in SUMMARIES:
        width = level_widths[level]
        oldest = int(now - span)
        oldest -= oldest % width
        ranges[name] = (oldest, width)
        bucket = layout.summary_buckets[level]
        if meter is not None:
            pattern = f"{encode_token(meter.id)}.{encode_token(tenant)}.{host_tok}.*.*"
            for key, value in await scan(js, bucket, pattern, budget=budget):
                await budget.tick()
                for s in summary_readings(key, value, meter, width):
                    h, label = s.groupBy.get("host"), s.groupBy.get("label")
                    if s.subject != tenant or h is None or label is None:
                        continue
                    if _usable(s, meter, oldest, now):
                        found.add(h, name, label, s)
        if legacy is not None:
            pattern = f"{encode_token(legacy.id)}.{host_tok}.*.*"
            # Only windows with nothing stored after perf-hosts began: older samples had no
            # tenant; a `perf` event sent since could come from anyone.
            before = meter.startSeq if meter is not None else None
            for key, value in await scan(js, bucket, pattern, budget=budget):
                await budget.tick()
                for s in summary_readings(key, value, legacy, width):
                    label = s.groupBy.get("label")
                    if label is None or (before is not None and s.lastSeq > before):
                        continue
                    if _usable(s, legacy, oldest, now):
                        found.add(s.subject, name, label, s)
    out: dict[str, PerfHost] = {}
    for h, by_key in sorted(found.hosts.items()):
        for key, windows in sorted(by_key.items(), key=lambda kv: _key_order(kv[0])):
            await budget.tick()
            oldest, width = ranges[key.split(":", 2)[1]]
            averages = [_average(start, w, width) for start, w in sorted(windows.items())]
            out.setdefault(h, {})[key] = PerfSummary(
                averages=averages,
                start=oldest,
                end=int(now),
                timeslice_size_sec=width,
                average_count=len(averages),
            )
    return out


def _key_order(key: str) -> tuple[int, str]:
    _, name, label = key.split(":", 2)
    return [n for n, _, _ in SUMMARIES].index(name), label


@routes.get(
    "/api/perf",
    "/api/perf/",
    access=USER,
    tenant=_HOSTS,
    op=Op("Hosts with samples", "perf", response=array(STR)),
)
async def list_hosts(request: web.Request) -> web.Response:
    return json_response(sorted(await summaries(request, perf_tenant(request), None)))


@routes.get(
    "/api/perf/{host}",
    access=USER,
    tenant=_HOSTS,
    op=Op(
        "A host's summaries",
        "perf",
        response=_PERF_HOST_SCHEMA,
        path=_PERF_HOST,
        path_schemas=(_HOST_SCHEMA,),
        errors=(404,),
    ),
)
@routes.get(
    r"/api/perf/{host}/{label:[\s\S]+}",  # newlines too
    access=USER,
    tenant=_HOSTS,
    op=Op(
        "A host's summaries whose name contains the label",
        "perf",
        response=_PERF_HOST_SCHEMA,
        path=(*_PERF_HOST, "part of the summary name (cpu, by-hour, by-minute:mem), any case"),
        path_schemas=(_HOST_SCHEMA, {"type": "string", "minLength": 1, "pattern": "^[^\\n]+$"}),
        errors=(404,),
    ),
)
async def get_host(request: web.Request) -> web.Response:
    host = request.match_info["host"]
    data = (await summaries(request, perf_tenant(request), host)).get(host)
    if not data:
        raise NotFound(f"no data for host {host!r} in the last day", field="host")
    requested = request.match_info.get("label")
    if requested:
        wanted = requested.casefold()
        data = {k: v for k, v in data.items() if wanted in k.casefold()}
    return json_response(data)
