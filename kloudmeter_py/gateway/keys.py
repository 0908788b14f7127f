"""Typed keys of what the app factory wires in, in a module of their own.

Route modules and middleware read the app's settings, NATS handles and stores through these;
``app.py`` (the factory) sets them. Keeping them here means no route module imports the
factory, and the factory imports the route modules: imports go one way.
"""

import weakref

from aiohttp import web
from nats.aio.client import Client
from nats.js import JetStreamContext

from kloudmeter_py.config import Settings
from kloudmeter_py.core.budget import ReadBudget
from kloudmeter_py.core.portal import PortalTokenRecord
from kloudmeter_py.store.alerts import AlertStore
from kloudmeter_py.store.auth import AuthStore, Principal
from kloudmeter_py.store.customers import CustomerStore
from kloudmeter_py.store.kv import LeanLink
from kloudmeter_py.store.layout import Layout
from kloudmeter_py.store.meters import MeterStore
from kloudmeter_py.store.portal import PortalStore

SETTINGS = web.AppKey("settings", Settings)
LEAN = web.AppKey("lean", LeanLink)
NC = web.AppKey("nc", Client)
JS = web.AppKey("js", JetStreamContext)
LAYOUT = web.AppKey("layout", Layout)
METERS = web.AppKey("meters", MeterStore)
AUTH = web.AppKey("auth", AuthStore)
ALERTS = web.AppKey("alerts", AlertStore)
CUSTOMERS = web.AppKey("customers", CustomerStore)
PORTAL = web.AppKey("portal", PortalStore)
# The OpenAPI document, built at its first request.
OPENAPI_CACHE = web.AppKey("openapi_cache", list[bytes])
# The reads in progress (helpers.read_budget), stopped when the app shuts down.
READS = web.AppKey("reads", weakref.WeakSet[ReadBudget])
# The caller, set by the auth middleware when tokens are on.
PRINCIPAL = web.RequestKey("principal", Principal)
# The portal token of a portal route's request (set by the auth middleware, always).
PORTAL_TOKEN = web.RequestKey("portal_token", PortalTokenRecord)
