"""The dashboard: one page of our own HTML, CSS and JavaScript, and a server-sent-events stream
of reading changes fed by a KV watch (no polling of the bucket)."""

import asyncio
import contextlib
from pathlib import Path

from aiohttp import web
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from kloudmeter_py.core.models import encoder, reading_decoder
from kloudmeter_py.gateway.keys import JS, LAYOUT
from kloudmeter_py.gateway.kloudmeter import reading_view
from kloudmeter_py.gateway.routes import (
    CALLER,
    NO_TENANT_DATA,
    OPEN,
    USER,
    Op,
    Routes,
    tenant_subjects,
)
from kloudmeter_py.gateway.schemas import STR

routes = Routes()
STATIC = Path(__file__).with_name("static")
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


@routes.get(
    "/",
    access=OPEN,
    tenant=NO_TENANT_DATA,
    op=Op("The dashboard page", "dashboard", response=STR, media="text/html", nats=False),
)
async def index(request: web.Request) -> web.Response:
    return _static("index.html")


@routes.get(
    "/static/{name}",
    access=OPEN,
    tenant=NO_TENANT_DATA,
    op=Op(
        "A dashboard asset (app.js, style.css)",
        "dashboard",
        response=STR,
        media="text/javascript",
        alt_media=("text/css",),
        path=("the asset's file name",),
        errors=(404,),
        nats=False,
    ),
)
async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ("app.js", "style.css"):
        raise web.HTTPNotFound()
    return _static(name)


def _static(name: str) -> web.Response:
    path = STATIC / name
    return web.Response(
        body=path.read_bytes(),
        content_type=_TYPES[path.suffix],
        headers={"Cache-Control": "no-cache"},
    )


@routes.get(
    "/api/stream/readings",
    access=USER,
    tenant=CALLER,
    op=Op(
        "Reading changes as server-sent events (one `reading` event per write)",
        "dashboard",
        response=STR,
        media="text/event-stream",
    ),
)
async def stream_readings(request: web.Request) -> web.StreamResponse:
    """text/event-stream: one `reading` event per reading write, as it happens."""
    js = request.app[JS]
    bucket = request.app[LAYOUT].readings_bucket
    scope = await tenant_subjects(request)
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=10_000)

    async def on_msg(msg: Msg) -> None:
        if not msg.data:
            return
        try:
            reading = reading_decoder.decode(msg.data)
        except ValueError:
            return
        if scope is not None and reading.subject not in scope:
            return
        key = msg.subject[len(f"$KV.{bucket}.") :]
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait(encoder.encode(reading_view(key, reading)))

    sub = await js.subscribe(
        f"$KV.{bucket}.>", cb=on_msg, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW
    )
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    try:
        await response.write(b": connected\n\n")
        while True:
            try:
                async with asyncio.timeout(15):
                    data = await queue.get()
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            await response.write(b"event: reading\ndata: " + data + b"\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return response
