"""HTTP helpers every route module shares: JSON answers, error bodies, strict body decoding."""

import re
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, Literal, Protocol, TypeVar

import msgspec
from aiohttp import web

from kloudmeter_py.core.budget import ReadBudget
from kloudmeter_py.core.models import encoder
from kloudmeter_py.errors import InvalidInput
from kloudmeter_py.gateway.keys import READS, SETTINGS
from kloudmeter_py.store.kv import new_budget

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_AT_FIELD = re.compile(r"at `\$\.?([^`]*)`")
_MISSING = re.compile(r"(?:missing required|unknown) field `([^`]+)`")


def json_response(body: Any, status: int = 200) -> web.Response:
    """``body`` as JSON (msgspec: structs, datetimes, decimals as strings)."""
    return web.Response(body=encoder.encode(body), status=status, content_type="application/json")


class Error(msgspec.Struct, omit_defaults=True):
    """KloudMeter's error envelope; field names the offending input."""

    status: Literal["error"]
    message: str
    field: str | None = None


class Problem(msgspec.Struct, omit_defaults=True):
    """RFC 9457 problem details (OpenMeter's errors)."""

    type: str
    title: str
    status: int
    detail: str
    instance: str
    field: str | None = None


def error_response(status: int, message: str, field: str | None = None) -> web.Response:
    return json_response(Error(status="error", message=message, field=field or None), status)


def problem_response(status: int, message: str, field: str | None, instance: str) -> web.Response:
    """RFC 9457 problem details, as OpenMeter's API answers errors."""
    body = Problem(
        type="about:blank",
        title=HTTPStatus(status).phrase,
        status=status,
        detail=message,
        instance=instance,
        field=field or None,
    )
    return web.Response(
        body=encoder.encode(body), status=status, content_type="application/problem+json"
    )


def read_budget(request: web.Request) -> ReadBudget:
    """The budget of a read this request makes: METER_READ_TIMEOUT_MS from now, yielding to
    the event loop every slice of work, and stopped when the gateway shuts down."""
    budget = new_budget(
        request.app[SETTINGS].read_timeout_ms / 1000, what=f"{request.method} {request.path}"
    )
    request.app[READS].add(budget)
    return budget


def stop_reads(app: web.Application, reason: str) -> None:
    """Stop every read in progress: each answers 503 with ``reason`` at its next tick."""
    reads = app[READS]
    for budget in list(reads):
        budget.stop(reason)


class Decodes(Protocol[T_co]):
    def decode(self, data: bytes, /) -> T_co: ...


def decode_body(raw: bytes, decoder: Decodes[T]) -> T:
    """Decode a request body strictly; errors say which field and why."""
    if not raw.strip():
        raise InvalidInput("request body is empty; expected a JSON object")
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _AT_FIELD.search(text)
        missing = _MISSING.search(text)
        field = missing.group(1) if missing else (match.group(1) if match else None)
        raise InvalidInput(f"invalid request body: {text}", field=field) from None
    except msgspec.DecodeError as exc:
        raise InvalidInput(f"invalid JSON: {exc}") from None
