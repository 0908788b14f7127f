"""Fixtures over real components: a fresh nats-server per test, real HTTP, a real worker."""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import nats
import pytest
from aiohttp.test_utils import TestClient, TestServer
from nats.aio.client import Client

from kloudmeter_py.config import Settings
from kloudmeter_py.gateway import create_app
from kloudmeter_py.store.provision import provision
from kloudmeter_py.store.server import NatsServer
from kloudmeter_py.worker import Worker

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]],
    check: Callable[[T], bool],
    *,
    timeout: float = 15.0,
    interval: float = 0.05,
) -> T:
    """Poll ``probe`` until ``check`` holds, or fail with the last value seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await probe()
        if check(last):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last value: {last!r}")
        await asyncio.sleep(interval)


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    async with NatsServer(tmp_path / "nats") as server:
        yield server


@pytest.fixture
def settings(nats_server: NatsServer) -> Settings:
    # Summaries written with the readings: tests of query results need not wait for a flush
    # (deferred summaries are covered by the kill and cluster tests, which use the defaults).
    return Settings(nats_url=nats_server.url, partitions=2, batch_size=200, summary_flush_ms=0)


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    client = await nats.connect(settings.nats_url)
    await provision(client.jetstream(), settings)
    yield client
    await client.close()


@pytest.fixture
async def worker(nc: Client, settings: Settings) -> AsyncIterator[Worker]:
    w = Worker(nc, settings)
    await w.start()
    yield w
    await w.stop()


@pytest.fixture
async def http(nc: Client, settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    app = create_app(settings, nc)
    async with TestClient(TestServer(app)) as client:
        yield client
