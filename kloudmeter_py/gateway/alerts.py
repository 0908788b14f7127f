"""Usage alerts, OpenMeter's v1 notification API: channels, rules, events, resend.

Channels and rules are the installation's (admin tokens); events are about a subject, so a
user token sees its own tenant's only (another's answers as unknown: 404). Events are made
by the worker (worker.alerts) and delivered by the gateway (gateway.deliveries).
"""

import os
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import msgspec
from aiohttp import web
from msgspec import Meta

from kloudmeter_py.core.alerts import BALANCE_THRESHOLD, RESET, new_secret
from kloudmeter_py.core.query import parse_time
from kloudmeter_py.core.windows import QueryError
from kloudmeter_py.errors import InvalidInput, NotFound
from kloudmeter_py.gateway.helpers import decode_body, json_response
from kloudmeter_py.gateway.keys import ALERTS
from kloudmeter_py.gateway.routes import (
    ADMIN,
    CALLER,
    NO_TENANT_DATA,
    USER,
    Op,
    Param,
    Routes,
    tenant_subjects,
)
from kloudmeter_py.gateway.schemas import STR, TIME, array, ref
from kloudmeter_py.store.alerts import (
    Channel,
    Delivery,
    Rule,
    StoredEvent,
    ThresholdValue,
    new_id,
    now,
    rule_view,
)

routes = Routes()
TAG = "notifications"

_PORT = r"(:([0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?"
URL_PATTERN = r"^https?://[A-Za-z0-9._~%!$&'()*+,;=-]+" + _PORT + r"([/?#].*)?$"
Name = Annotated[str, Meta(min_length=1, max_length=256)]
Headers = dict[
    Annotated[str, Meta(max_length=256, pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")],
    Annotated[str, Meta(max_length=4096, pattern=r"^[\t\x20-\x7e]*$")],
]


class ChannelIn(msgspec.Struct, kw_only=True):
    """Body of POST/PUT /api/v1/notification/channels: a webhook (``signingSecret`` made
    when absent)."""

    type: Literal["WEBHOOK"]
    name: Name
    url: Annotated[str, Meta(max_length=2048, pattern=URL_PATTERN)]
    disabled: bool = False
    customHeaders: Headers | None = None
    signingSecret: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    metadata: dict[str, str] | None = None


class ThresholdIn(msgspec.Struct):
    value: Annotated[float, Meta(gt=0)]
    type: Literal["PERCENT", "NUMBER", "usage_percentage", "usage_value", "balance_value"]


class RuleIn(msgspec.Struct, kw_only=True):
    """Body of POST/PUT /api/v1/notification/rules."""

    type: Literal["entitlements.balance.threshold", "entitlements.reset"]
    name: Name
    channels: Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1)]
    thresholds: Annotated[list[ThresholdIn], Meta(max_length=10)] | None = None
    features: list[Annotated[str, Meta(min_length=1)]] | None = None
    disabled: bool = False
    metadata: dict[str, str] | None = None


class ResendIn(msgspec.Struct):
    channels: list[str] | None = None


class ChannelMeta(msgspec.Struct):
    id: str
    type: str


class FeatureMeta(msgspec.Struct):
    id: str
    key: str


class RuleView(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    type: str
    name: str
    disabled: bool
    channels: list[ChannelMeta]
    thresholds: list[ThresholdValue] | None = None
    features: list[FeatureMeta]
    metadata: dict[str, str] | None = None
    createdAt: datetime
    updatedAt: datetime


class AttemptView(msgspec.Struct):
    state: str
    response: dict[str, Any]
    timestamp: datetime


class DeliveryStatus(msgspec.Struct, kw_only=True):
    state: str
    reason: str
    updatedAt: datetime
    channel: ChannelMeta
    nextAttempt: datetime | None = None
    attempts: list[AttemptView]


class NotificationEventView(msgspec.Struct, kw_only=True):
    """A notification event (OpenMeter's NotificationEvent)."""

    id: str
    type: str
    createdAt: datetime
    rule: dict[str, Any]
    deliveryStatus: list[DeliveryStatus]
    payload: dict[str, Any]


class ChannelPage(msgspec.Struct):
    totalCount: int
    page: int
    pageSize: int
    items: list[Channel]


class RulePage(msgspec.Struct):
    totalCount: int
    page: int
    pageSize: int
    items: list[RuleView]


class EventPage(msgspec.Struct):
    totalCount: int
    page: int
    pageSize: int
    items: list[NotificationEventView]


_channel_in = msgspec.json.Decoder(ChannelIn)
_rule_in = msgspec.json.Decoder(RuleIn)
_resend_in = msgspec.json.Decoder(ResendIn)

_PAGE = (
    Param("page", {"type": "integer", "minimum": 1, "maximum": 1_000_000}, "page, from 1"),
    Param("pageSize", {"type": "integer", "minimum": 1, "maximum": 1000}, "items a page"),
    Param("order", {"enum": ["ASC", "DESC"]}, "order of the items"),
)


def _int(request: web.Request, name: str, default: int, most: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        n = int(text)
    except ValueError:
        raise InvalidInput(f"{name}: {text!r} is not an integer", field=name) from None
    if not 1 <= n <= most:
        raise InvalidInput(f"{name}: must be from 1 to {most}", field=name)
    return n


def _page(request: web.Request, items: list[Any], key: Any, default_desc: bool) -> tuple[Any, ...]:
    """(total, page, page size, the page's items) in the asked order."""
    order = request.query.get("order", "DESC" if default_desc else "ASC").upper()
    if order not in ("ASC", "DESC"):
        raise InvalidInput(f"order: {order!r} is not ASC or DESC", field="order")
    page = _int(request, "page", 1, 1_000_000)
    size = _int(request, "pageSize", 100, 1000)
    items = sorted(items, key=key, reverse=order == "DESC")
    return len(items), page, size, items[(page - 1) * size : page * size]


def _time(q: Any, name: str) -> datetime | None:
    if name not in q:
        return None
    try:
        return parse_time(name, q[name])
    except QueryError as exc:
        raise InvalidInput(f"{name}: {exc.reason}", field=name) from None


def _check_url(url: str) -> None:
    try:
        parsed = urlparse(url)
        parsed.port  # noqa: B018 - raises on a port out of range
    except ValueError:
        raise InvalidInput(f"url: {url!r} is not a valid URL", field="url") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise InvalidInput(f"url: {url!r} is not an http(s) URL with a host", field="url")


# ---- channels ----


def _channel_from(body: ChannelIn, cid: str, created: datetime, secret: str | None) -> Channel:
    _check_url(body.url)
    return Channel(
        id=cid,
        name=body.name,
        url=body.url,
        disabled=body.disabled,
        customHeaders=dict(body.customHeaders or {}),
        signingSecret=body.signingSecret or secret or new_secret(os.urandom(32)),
        metadata=body.metadata,
        createdAt=created,
        updatedAt=now(),
    )


_CHANNEL_PATH = ("channel id",)


@routes.post(
    "/api/v1/notification/channels",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Create a webhook channel",
        TAG,
        status=201,
        response=ref("Channel"),
        body=ref("ChannelIn"),
        errors=(400,),
    ),
)
async def create_channel(request: web.Request) -> web.Response:
    body = decode_body(await request.read(), _channel_in)
    ch = _channel_from(body, new_id(), now(), None)
    await request.app[ALERTS].put_channel(ch)
    return json_response(ch, status=201)


@routes.get(
    "/api/v1/notification/channels",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op("List channels", TAG, response=ref("ChannelPage"), query=_PAGE, errors=(400,)),
)
async def list_channels(request: web.Request) -> web.Response:
    items = await request.app[ALERTS].channels()
    if request.query.get("includeDisabled", "false").lower() != "true":
        items = [c for c in items if not c.disabled]
    total, page, size, shown = _page(request, items, lambda c: c.id, False)
    return json_response(ChannelPage(total, page, size, shown))


@routes.get(
    "/api/v1/notification/channels/{channel}",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op("Get a channel", TAG, response=ref("Channel"), path=_CHANNEL_PATH, errors=(404,)),
)
async def get_channel(request: web.Request) -> web.Response:
    ch, _ = await request.app[ALERTS].channel(request.match_info["channel"])
    return json_response(ch)


@routes.put(
    "/api/v1/notification/channels/{channel}",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Update a channel",
        TAG,
        response=ref("Channel"),
        path=_CHANNEL_PATH,
        body=ref("ChannelIn"),
        errors=(400, 404, 409),
        description="The whole channel; a secret left out keeps the one it has.",
    ),
)
async def update_channel(request: web.Request) -> web.Response:
    store = request.app[ALERTS]
    old, rev = await store.channel(request.match_info["channel"])
    body = decode_body(await request.read(), _channel_in)
    ch = _channel_from(body, old.id, old.createdAt, old.signingSecret)
    await store.put_channel(ch, rev)
    return json_response(ch)


@routes.delete(
    "/api/v1/notification/channels/{channel}",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op("Delete a channel", TAG, status=204, path=_CHANNEL_PATH, errors=(400, 404)),
)
async def delete_channel(request: web.Request) -> web.Response:
    store = request.app[ALERTS]
    ch, _ = await store.channel(request.match_info["channel"])
    users = [r.id for r in await store.rules() if ch.id in r.channels]
    if users:
        raise InvalidInput(
            f"channel {ch.id!r} is used by rules {users}: delete or change them first",
            field="channel",
        )
    await store.delete_channel(ch.id)
    return web.Response(status=204)


# ---- rules ----


def _rule_out(rule: Rule) -> RuleView:
    return msgspec.convert(rule_view(rule), RuleView)


async def _rule_from(request: web.Request, body: RuleIn, rid: str, created: datetime) -> Rule:
    store = request.app[ALERTS]
    known = {c.id for c in await store.channels()}
    for cid in body.channels:
        if cid not in known:
            raise InvalidInput(f"channels: channel {cid!r} not found", field="channels")
    thresholds: list[ThresholdValue] = []
    if body.type == BALANCE_THRESHOLD:
        if not body.thresholds:
            raise InvalidInput(
                "thresholds: a balance threshold rule needs 1 to 10 thresholds",
                field="thresholds",
            )
        for t in body.thresholds:
            if t.type in ("PERCENT", "usage_percentage") and t.value > 10_000:
                raise InvalidInput("thresholds: a percentage is at most 10000", field="thresholds")
        thresholds = [ThresholdValue(t.value, t.type) for t in body.thresholds]
    elif body.thresholds:
        raise InvalidInput(f"thresholds: a {RESET} rule has none", field="thresholds")
    return Rule(
        id=rid,
        type=body.type,
        name=body.name,
        disabled=body.disabled,
        channels=list(dict.fromkeys(body.channels)),
        thresholds=thresholds,
        features=list(dict.fromkeys(body.features or [])),
        metadata=body.metadata,
        createdAt=created,
        updatedAt=now(),
    )


_RULE_PATH = ("rule id",)


@routes.post(
    "/api/v1/notification/rules",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Create a rule",
        TAG,
        status=201,
        response=ref("RuleView"),
        body=ref("RuleIn"),
        errors=(400,),
    ),
)
async def create_rule(request: web.Request) -> web.Response:
    body = decode_body(await request.read(), _rule_in)
    rule = await _rule_from(request, body, new_id(), now())
    await request.app[ALERTS].put_rule(rule)
    return json_response(_rule_out(rule), status=201)


@routes.get(
    "/api/v1/notification/rules",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "List rules",
        TAG,
        response=ref("RulePage"),
        query=(
            *_PAGE,
            Param("feature", array(STR), "rules of these features (repeatable)"),
            Param("channel", array(STR), "rules sending to these channels (repeatable)"),
        ),
        errors=(400,),
    ),
)
async def list_rules(request: web.Request) -> web.Response:
    items = await request.app[ALERTS].rules()
    if request.query.get("includeDisabled", "false").lower() != "true":
        items = [r for r in items if not r.disabled]
    features = request.query.getall("feature", [])
    if features:
        items = [r for r in items if set(r.features) & set(features)]
    channels = request.query.getall("channel", [])
    if channels:
        items = [r for r in items if set(r.channels) & set(channels)]
    total, page, size, shown = _page(request, items, lambda r: r.id, False)
    return json_response(RulePage(total, page, size, [_rule_out(r) for r in shown]))


@routes.get(
    "/api/v1/notification/rules/{rule}",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op("Get a rule", TAG, response=ref("RuleView"), path=_RULE_PATH, errors=(404,)),
)
async def get_rule(request: web.Request) -> web.Response:
    rule, _ = await request.app[ALERTS].rule(request.match_info["rule"])
    return json_response(_rule_out(rule))


@routes.put(
    "/api/v1/notification/rules/{rule}",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Update a rule",
        TAG,
        response=ref("RuleView"),
        path=_RULE_PATH,
        body=ref("RuleIn"),
        errors=(400, 404, 409),
    ),
)
async def update_rule(request: web.Request) -> web.Response:
    store = request.app[ALERTS]
    old, rev = await store.rule(request.match_info["rule"])
    body = decode_body(await request.read(), _rule_in)
    if body.type != old.type:
        raise InvalidInput(f"type: a rule's type cannot change (it is {old.type})", field="type")
    rule = await _rule_from(request, body, old.id, old.createdAt)
    await store.put_rule(rule, rev)
    return json_response(_rule_out(rule))


@routes.delete(
    "/api/v1/notification/rules/{rule}",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op("Delete a rule", TAG, status=204, path=_RULE_PATH, errors=(404,)),
)
async def delete_rule(request: web.Request) -> web.Response:
    await request.app[ALERTS].delete_rule(request.match_info["rule"])
    return web.Response(status=204)


# ---- events ----


def _status(d: Delivery) -> DeliveryStatus:
    return DeliveryStatus(
        state=d.state,
        reason=d.reason,
        updatedAt=d.updatedAt,
        channel=ChannelMeta(d.channel, "WEBHOOK"),
        nextAttempt=d.nextAttempt,
        attempts=[
            AttemptView(a.state, msgspec.to_builtins(a.response), a.timestamp) for a in d.attempts
        ],
    )


async def _view(request: web.Request, ev: StoredEvent) -> NotificationEventView:
    found = {d.channel: d for d in await request.app[ALERTS].deliveries(ev.id)}
    statuses = []
    for cid in ev.channels:
        d = found.get(cid) or Delivery(event=ev.id, channel=cid, updatedAt=ev.createdAt)
        statuses.append(_status(d))
    return NotificationEventView(
        id=ev.id,
        type=ev.type,
        createdAt=ev.createdAt,
        rule=ev.rule,
        deliveryStatus=statuses,
        payload=ev.payload,
    )


async def _own_event(request: web.Request, eid: str) -> StoredEvent:
    ev = await request.app[ALERTS].event(eid)
    subjects = await tenant_subjects(request)
    if subjects is not None and ev.subject not in subjects:
        raise NotFound(f"event {eid!r} not found")
    return ev


_EVENT_PATH = ("event id",)


@routes.get(
    "/api/v1/notification/events",
    access=USER,
    tenant=CALLER,
    op=Op(
        "List notification events",
        TAG,
        response=ref("EventPage"),
        query=(
            *_PAGE,
            Param("from", TIME, "created at or after"),
            Param("to", TIME, "created before"),
            Param("subject", array(STR), "events about these subjects (repeatable)"),
            Param("feature", array(STR), "events about these features (repeatable)"),
            Param("rule", array(STR), "events of these rules (repeatable)"),
            Param("channel", array(STR), "events sent to these channels (repeatable)"),
        ),
        errors=(400,),
    ),
)
async def list_events(request: web.Request) -> web.Response:
    q = request.query
    events = await request.app[ALERTS].events()
    subjects = await tenant_subjects(request)
    if subjects is not None:
        events = [e for e in events if e.subject in subjects]
    start = _time(q, "from")
    end = _time(q, "to")
    for name, attr in (("subject", "subject"), ("feature", "feature"), ("rule", "ruleId")):
        wanted = set(q.getall(name, []))
        if wanted:
            events = [e for e in events if getattr(e, attr) in wanted]
    channels = set(q.getall("channel", []))
    events = [
        e
        for e in events
        if (start is None or e.createdAt >= start)
        and (end is None or e.createdAt < end)
        and (not channels or channels & set(e.channels))
    ]
    total, page, size, shown = _page(request, events, lambda e: (e.createdAt, e.id), True)
    return json_response(EventPage(total, page, size, [await _view(request, e) for e in shown]))


@routes.get(
    "/api/v1/notification/events/{event}",
    access=USER,
    tenant=CALLER,
    op=Op(
        "Get a notification event",
        TAG,
        response=ref("NotificationEventView"),
        path=_EVENT_PATH,
        errors=(404,),
    ),
)
async def get_event(request: web.Request) -> web.Response:
    ev = await _own_event(request, request.match_info["event"])
    return json_response(await _view(request, ev))


@routes.post(
    "/api/v1/notification/events/{event}/resend",
    access=ADMIN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "Send a notification event again",
        TAG,
        status=202,
        path=_EVENT_PATH,
        body=ref("ResendIn"),
        body_required=False,
        errors=(400, 404),
        description="To the channels named, or every channel of the event.",
    ),
)
async def resend_event(request: web.Request) -> web.Response:
    store = request.app[ALERTS]
    ev = await store.event(request.match_info["event"])
    raw = await request.read()
    body = decode_body(raw, _resend_in) if raw.strip() else ResendIn()
    channels = body.channels or ev.channels
    for cid in channels:
        if cid not in ev.channels:
            raise InvalidInput(f"channels: the event was not sent to {cid!r}", field="channels")
    await store.resend(ev.id, channels)
    return web.Response(status=202)


SCHEMA_MODELS: list[type[msgspec.Struct]] = [
    Channel,
    ChannelIn,
    ChannelPage,
    RuleIn,
    RuleView,
    RulePage,
    NotificationEventView,
    EventPage,
    ResendIn,
]
