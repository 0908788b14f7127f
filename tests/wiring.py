"""The gateway as the observability tests need it: metrics and the OpenAPI route wired in.

``create_app`` may already do this itself; then nothing is added twice.
"""

from aiohttp import web
from nats.aio.client import Client

from kloudmeter_py.config import Settings
from kloudmeter_py.gateway import create_app, openapi
from kloudmeter_py.metrics import METRICS, Metrics
from kloudmeter_py.worker import Worker


def observable_app(settings: Settings, nc: Client, worker: Worker | None = None) -> web.Application:
    app = create_app(settings, nc)
    if METRICS not in app:
        Metrics(process_collectors=False).install(app)
    if ("GET", openapi.OPENAPI_PATH) not in openapi.routes(app):
        openapi.add_routes(app)
    if worker is not None:
        app[METRICS].watch_worker(worker)
    return app
