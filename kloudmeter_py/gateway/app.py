"""aiohttp app factory and the one place errors become HTTP statuses."""

import uuid
import weakref

import msgspec
import structlog
from aiohttp import web
from nats.aio.client import Client
from nats.errors import ConnectionClosedError, NoRespondersError, OutboundBufferLimitError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

from kloudmeter_py.config import Settings
from kloudmeter_py.core.models import InvalidField
from kloudmeter_py.errors import KloudmeterError, PayloadTooLarge, Unavailable
from kloudmeter_py.gateway import (
    alerts,
    auth,
    corrections,
    customer_entitlements,
    customers,
    dashboard,
    entitlements,
    export,
    kloudmeter,
    openapi,
    openmeter,
    perf,
    portal,
    query,
    rating,
    templates,
    usage,
)
from kloudmeter_py.gateway.deliveries import DELIVERER, Deliverer, delivery_ctx
from kloudmeter_py.gateway.helpers import Handler, error_response, problem_response, stop_reads
from kloudmeter_py.gateway.keys import (
    ALERTS,
    AUTH,
    CUSTOMERS,
    JS,
    LAYOUT,
    LEAN,
    METERS,
    NC,
    OPENAPI_CACHE,
    PORTAL,
    READS,
    SETTINGS,
)
from kloudmeter_py.gateway.routes import check_declared, ingest_routes
from kloudmeter_py.metrics import METRICS, Metrics
from kloudmeter_py.store.alerts import AlertStore
from kloudmeter_py.store.auth import AuthStore
from kloudmeter_py.store.customers import CustomerStore
from kloudmeter_py.store.kv import LeanLink
from kloudmeter_py.store.layout import Layout
from kloudmeter_py.store.meters import MeterStore
from kloudmeter_py.store.portal import PortalStore
from kloudmeter_py.store.wire import WireError

log = structlog.get_logger(__name__)

_NATS_DOWN = (
    ConnectionClosedError,
    NoRespondersError,
    NoStreamResponseError,
    NatsTimeout,
    TimeoutError,
    OutboundBufferLimitError,
    ServiceUnavailableError,
    WireError,
)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await _errors(request, handler)
    if response.status >= 400 and request.path.startswith("/api/v1/"):
        envelope = response if isinstance(response, web.Response) else None
        if envelope is not None and envelope.content_type == "application/json":
            err = msgspec.json.decode(envelope.body or b"{}")  # type: ignore[arg-type]
            problem = problem_response(
                response.status, err.get("message", ""), err.get("field"), request.path
            )
            for header in ("X-Request-Id", "WWW-Authenticate"):
                if header in response.headers:
                    problem.headers[header] = response.headers[header]
            return problem
    return response


async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex[:16]
    structlog.contextvars.bind_contextvars(request_id=request_id)
    try:
        response = await handler(request)
    except KloudmeterError as exc:
        response = error_response(exc.status, exc.message, exc.field)
    except InvalidField as exc:
        response = error_response(400, str(exc), exc.field)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS].max_body_bytes
        response = error_response(
            PayloadTooLarge.status,
            f"request body too large (limit {limit} bytes, METER_MAX_BODY_BYTES)",
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(exc.status, exc.reason)
    except _NATS_DOWN as exc:
        log.warning("http.nats_unavailable", path=request.path, error=repr(exc))
        response = error_response(503, f"NATS is unavailable: {type(exc).__name__}")
    except Unavailable as exc:  # pragma: no cover - subclass of KloudmeterError
        response = error_response(503, exc.message)
    except Exception:
        log.exception("http.unhandled", path=request.path)
        response = error_response(500, "internal error")
    finally:
        structlog.contextvars.unbind_contextvars("request_id")
    response.headers["X-Request-Id"] = request_id
    if response.status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="kloudmeter"'
    return response


async def _stop_reads(app: web.Application) -> None:
    """At shutdown, before aiohttp waits for the handlers: reads in progress stop at their
    next tick (within a slice) and answer 503, so that shutting down is not held up by them."""
    stop_reads(app, "the gateway is shutting down; retry")


async def _close_lean(app: web.Application) -> None:
    await app[LEAN].close()


def create_app(settings: Settings, nc: Client, metrics: Metrics | None = None) -> web.Application:
    """Wire the gateway by hand: app keys, middleware, routes."""
    if metrics is None:
        metrics = Metrics()
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        # metrics outermost: it times the whole request and sees the statuses of errors_middleware
        middlewares=[metrics.middleware, errors_middleware, auth.auth_middleware],
    )
    app[METRICS] = metrics
    js = nc.jetstream(timeout=10)
    layout = Layout(settings)
    app[SETTINGS] = settings
    app[NC] = nc
    app[JS] = js
    app[LAYOUT] = layout
    app[METERS] = MeterStore(js, layout)
    app[AUTH] = AuthStore(js, layout, settings.admin_token)
    app[CUSTOMERS] = CustomerStore(js, layout)
    app[PORTAL] = PortalStore(js, layout)
    app[OPENAPI_CACHE] = []
    app[READS] = weakref.WeakSet()
    app[LEAN] = LeanLink(settings, name="kloudmeter-gateway-lean")
    app[ALERTS] = AlertStore(js, settings)
    app[DELIVERER] = Deliverer(AlertStore(js, settings, create=False))
    app.cleanup_ctx.append(delivery_ctx)
    app.on_shutdown.append(_stop_reads)
    app.on_cleanup.append(_close_lean)
    for module in (
        kloudmeter,
        corrections,
        query,
        export,
        openmeter,
        entitlements,
        customer_entitlements,
        alerts,
        customers,
        portal,
        perf,
        auth,
        usage,
        rating,
        templates,
        dashboard,
        openapi,  # /api/openapi.json and /metrics
    ):
        app.router.add_routes(module.routes.table)
    check_declared(app)
    metrics.ingest_routes = ingest_routes(app)
    return app
