"""The gateway as the observability tests need it: ``create_app`` wires metrics and the
OpenAPI route itself; a worker in the same process is watched by its metrics."""

from aiohttp import web
from nats.aio.client import Client

from kloudmeter_py.config import Settings
from kloudmeter_py.gateway import create_app
from kloudmeter_py.metrics import METRICS
from kloudmeter_py.worker import Worker


def observable_app(settings: Settings, nc: Client, worker: Worker | None = None) -> web.Application:
    app = create_app(settings, nc)
    if worker is not None:
        app[METRICS].watch_worker(worker)
    return app
