"""Host metrics: the liz receiver's API on the normal event pipeline.

``POST /api/perf/{host}/{epoch}`` takes a sample such as ``{"cpu": 3.5, "mem": 41.2}`` and
publishes one ``perf`` event per field (``subject`` = host, ``time`` = epoch,
``data`` = ``{"label": field, "value": number}``). The built-in ``perf`` meter (``avg`` of
``$.value`` grouped by ``$.label``) is created on first use, so the worker keeps the usual
window summaries; the ``GET`` routes read them back from the ``summaries_minute`` and
``summaries_hour`` buckets in the liz shape. Nothing else is stored: data goes when the
windows' TTLs say so.
"""

import asyncio
import hashlib
import math
import re
import time
from datetime import UTC, datetime
from typing import Any

import msgspec
from aiohttp import web

from kloudmeter_py.core.keys import encode_token, event_subject
from kloudmeter_py.core.models import Meter, MeterIn, Reading, encoder
from kloudmeter_py.core.summaries import summary_reading
from kloudmeter_py.core.windows import widths
from kloudmeter_py.errors import Conflict, InvalidInput, NotFound
from kloudmeter_py.gateway.app import JS, LAYOUT, METERS, SETTINGS
from kloudmeter_py.store.kv import scan

PERF_METER_ID = "perf"
PERF_EVENT_TYPE = "perf"
PERF_METER = MeterIn(
    id=PERF_METER_ID,
    eventType=PERF_EVENT_TYPE,
    aggregation="avg",
    description="Host metrics posted to /api/perf (kloudmeter agent, liz monitor)",
    valueProperty="$.value",
    groupBy={"label": "$.label"},
)

# (name in the summary key, summary level, how far back it reaches in seconds)
SUMMARIES = (("by-minute", "minute", 3600), ("by-hour", "hour", 86400))

MAX_EPOCH = 253402300799  # 9999-12-31T23:59:59Z
MAX_FIELDS = 256
MAX_NAME = 256
_EPOCH = re.compile(r"[0-9]{1,12}")
_IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAX_ID = 256  # an event id is at most 256 characters (models.Name)


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=encoder.encode(body), status=status, content_type="application/json")


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
            "groupBy {'label': '$.label'} (delete it and the gateway creates it again)",
            field="id",
        )
    return meter


async def ensure_meter(app: web.Application) -> Meter:
    """The built-in ``perf`` meter, created when it does not exist yet (idempotent)."""
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


def sample_event_id(host: str, epoch: int, label: str, key: str | None = None) -> str:
    """Event id (``Nats-Msg-Id``) of one field of one sample; a retried post gets the same.

    Host and label are token-encoded so the id is a safe header value and unambiguous; an
    ``Idempotency-Key`` (the agent sends one per sample) keeps several samples in one second
    apart. Ids longer than an event id may be are hashed, still deterministically.
    """
    event_id = f"perf:{encode_token(host)}:{epoch}:{encode_token(label)}"
    if key:
        event_id += f":{key}"
    if len(event_id) > _MAX_ID:
        event_id = "perf:" + hashlib.sha256(event_id.encode()).hexdigest()
    return event_id


async def post_sample(request: web.Request) -> web.Response:
    host = request.match_info["host"]
    if len(host) > MAX_NAME:
        raise InvalidInput(f"host is at most {MAX_NAME} characters", field="host")
    epoch = parse_epoch(request.match_info["epoch"])
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidInput(
            "Idempotency-Key must be 1..64 of A-Z a-z 0-9 _ -", field="Idempotency-Key"
        )
    sample = parse_sample(await request.read())
    await ensure_meter(request.app)
    js = request.app[JS]
    subject = event_subject(request.app[LAYOUT].stream, PERF_EVENT_TYPE, host)
    at = datetime.fromtimestamp(epoch, UTC)
    publishes = []
    for label, value in sample.items():
        event_id = sample_event_id(host, epoch, label, key)
        body = encoder.encode(
            {
                "id": event_id,
                "eventType": PERF_EVENT_TYPE,
                "subject": host,
                "time": at,
                "data": {"label": label, "value": value},
            }
        )
        publishes.append(js.publish(subject, body, headers={"Nats-Msg-Id": event_id}))
    acks = await asyncio.gather(*publishes)
    out: dict[str, Any] = {"status": "ok", "events": len(acks)}
    duplicates = sum(1 for ack in acks if ack.duplicate)
    if duplicates:
        out["duplicates"] = duplicates
    return _json(out, status=202)


def _average(s: Reading, width: int) -> dict[str, Any]:
    assert s.windowStart is not None and s.sum is not None
    start = int(s.windowStart.timestamp())
    avg = s.sum / s.count
    return {
        "start-sec": start,
        "end-sec": start + width,
        "interval-size-sec": width,
        "num-samples": s.count,
        "avg": int(avg) if avg.is_integer() else avg,
    }


async def summaries(
    request: web.Request, meter: Meter, host: str | None
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per host, the liz summaries (``summary:by-minute:<label>`` ...) that have data."""
    app = request.app
    js, layout, settings = app[JS], app[LAYOUT], app[SETTINGS]
    now = time.time()
    level_widths = widths(settings.interval)
    pattern = f"{encode_token(meter.id)}.{encode_token(host) if host else '*'}.*.*"
    found: dict[str, dict[str, list[dict[str, Any]]]] = {}
    ranges: dict[str, tuple[int, int]] = {}
    for name, level, span in SUMMARIES:
        width = level_widths[level]
        oldest = int(now - span)
        oldest -= oldest % width
        ranges[name] = (oldest, width)
        for key, value in await scan(js, layout.summary_buckets[level], pattern):
            s = summary_reading(key, value, meter, width)
            label = s.groupBy.get("label")
            if (
                s.meterStartSeq != meter.startSeq
                or s.windowStart is None
                or s.sum is None
                or not s.count
                or label is None
                or not oldest <= s.windowStart.timestamp() <= now
            ):
                continue
            series = found.setdefault(s.subject, {}).setdefault(f"summary:{name}:{label}", [])
            series.append(_average(s, width))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for subject, by_key in sorted(found.items()):
        for key, averages in sorted(by_key.items(), key=lambda kv: _key_order(kv[0])):
            oldest, width = ranges[key.split(":", 2)[1]]
            averages.sort(key=lambda a: a["start-sec"])
            out.setdefault(subject, {})[key] = {
                "averages": averages,
                "start": oldest,
                "end": int(now),
                "timeslice-size-sec": width,
                "average-count": len(averages),
            }
    return out


def _key_order(key: str) -> tuple[int, str]:
    _, name, label = key.split(":", 2)
    return [n for n, _, _ in SUMMARIES].index(name), label


async def list_hosts(request: web.Request) -> web.Response:
    meter = await _current_meter(request.app)
    if meter is None:
        return _json([])
    return _json(sorted(await summaries(request, meter, None)))


async def get_host(request: web.Request) -> web.Response:
    host = request.match_info["host"]
    meter = await _current_meter(request.app)
    data = (await summaries(request, meter, host)).get(host) if meter is not None else None
    if not data:
        raise NotFound(f"no data for host {host!r} in the last day", field="host")
    requested = request.match_info.get("label")
    if requested:
        wanted = requested.casefold()
        data = {k: v for k, v in data.items() if wanted in k.casefold()}
    return _json(data)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/perf", list_hosts)
    r.add_get("/api/perf/", list_hosts)
    r.add_post("/api/perf/{host}/{epoch}", post_sample)
    r.add_get("/api/perf/{host}", get_host)
    r.add_get(r"/api/perf/{host}/{label:[\s\S]+}", get_host)  # newlines too
