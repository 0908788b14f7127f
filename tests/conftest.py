"""Fixtures over real components: a fresh nats-server per test, real HTTP, a real worker."""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
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
from tests import secured

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
    # A test may have stopped the server (test_healthy_reports_nats_state): closing then
    # can find the connection already lost (ConnectionResetError from nats-py's drain, seen
    # once at teardown in a fresh-clone CI run); the test's outcome is already decided.
    with contextlib.suppress(ConnectionError):
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


# --- secured NATS: the nats/ example configs filled in with keys and certificates made here --

NATS_CONFIGS = Path(__file__).parent.parent / "nats"


def example_config(tmp_path: Path, name: str, fill: dict[str, str]) -> str:
    """nats/<name> with its placeholders replaced, minus what NatsServer passes as flags."""
    text = (NATS_CONFIGS / name).read_text()
    text = text.replace("listen: 127.0.0.1:4222\n", "")
    text = text.replace('  store_dir: ".kloudmeter/nats"\n', "")
    for placeholder, value in fill.items():
        assert placeholder in text, placeholder
        text = text.replace(placeholder, value)
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@dataclass
class SecuredNats:
    """A running secured server, the service's settings for it, and what made them."""

    server: NatsServer
    settings: Settings
    dir: Path
    keys: dict[str, secured.Key] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


def _service_settings(url: str, **secured_settings: str) -> Settings:
    return Settings(
        nats_url=url, partitions=2, batch_size=200, summary_flush_ms=0, **secured_settings
    )


@contextlib.asynccontextmanager
async def _nkey_nats(tmp_path: Path) -> AsyncIterator[SecuredNats]:
    """nats/nkeys.conf: the service and tenant acme are NKEY users."""
    tmp_path = tmp_path / "nkey-nats"
    tmp_path.mkdir()
    service, acme = secured.user_key(), secured.user_key()
    conf = example_config(
        tmp_path,
        "nkeys.conf",
        {"SERVICE_USER_PUBLIC_KEY": service.public, "ACME_USER_PUBLIC_KEY": acme.public},
    )
    seed = secured.write_secret(tmp_path / "service.nk", service.seed.decode() + "\n")
    async with NatsServer(tmp_path / "nats", config_file=conf) as server:
        yield SecuredNats(
            server,
            _service_settings(server.url, nats_nkey_seed=seed),
            tmp_path,
            keys={"service": service, "acme": acme},
        )


@contextlib.asynccontextmanager
async def _operator_nats(tmp_path: Path) -> AsyncIterator[SecuredNats]:
    """nats/operator.conf: operator mode, one account with JetStream, the service's user
    creds; ``keys["revoked"]`` is a user of the account that the account has revoked."""
    tmp_path = tmp_path / "operator-nats"
    tmp_path.mkdir()
    op, account, system = secured.operator_key(), secured.account_key(), secured.account_key()
    service, revoked = secured.user_key(), secured.user_key()
    account_jwt = secured.account_jwt(op, account, revocations={revoked.public: int(time.time())})
    conf = example_config(
        tmp_path,
        "operator.conf",
        {
            "OPERATOR_JWT": secured.operator_jwt(op),
            "SYSTEM_ACCOUNT_PUBLIC_KEY": system.public,
            "SYSTEM_ACCOUNT_JWT": secured.account_jwt(op, system, jetstream=False),
            "ACCOUNT_PUBLIC_KEY": account.public,
            "ACCOUNT_JWT": account_jwt,
        },
    )
    creds = secured.write_secret(
        tmp_path / "service.creds",
        secured.creds_text(secured.user_jwt(account, service), service),
    )
    async with NatsServer(tmp_path / "nats", config_file=conf) as server:
        yield SecuredNats(
            server,
            _service_settings(server.url, nats_creds=creds),
            tmp_path,
            keys={"operator": op, "account": account, "service": service, "revoked": revoked},
        )


@contextlib.asynccontextmanager
async def _mtls_nats(tmp_path: Path) -> AsyncIterator[SecuredNats]:
    """nats/mtls.conf: TLS with required client certificates from a CA made here."""
    tmp_path = tmp_path / "mtls-nats"
    tmp_path.mkdir()
    ca = secured.make_ca(tmp_path)
    server_cert = secured.make_cert(tmp_path, ca, "server", server=True)
    client_cert = secured.make_cert(tmp_path, ca, "kloudmeter", server=False)
    conf = example_config(
        tmp_path,
        "mtls.conf",
        {
            '"server.pem"': f'"{server_cert[0]}"',
            '"server-key.pem"': f'"{server_cert[1]}"',
            '"ca.pem"': f'"{ca[0]}"',
        },
    )
    async with NatsServer(tmp_path / "nats", config_file=conf) as server:
        files = {
            "nats_tls_cert": str(client_cert[0]),
            "nats_tls_key": str(client_cert[1]),
            "nats_tls_ca": str(ca[0]),
        }
        yield SecuredNats(
            server,
            _service_settings(f"tls://127.0.0.1:{server.port}", **files),
            tmp_path,
            files=files,
        )


_SECURED = {"nkey_nats": _nkey_nats, "operator_nats": _operator_nats, "mtls_nats": _mtls_nats}


@pytest.fixture
async def nkey_nats(tmp_path: Path) -> AsyncIterator[SecuredNats]:
    async with _nkey_nats(tmp_path) as sn:
        yield sn


@pytest.fixture
async def operator_nats(tmp_path: Path) -> AsyncIterator[SecuredNats]:
    async with _operator_nats(tmp_path) as sn:
        yield sn


@pytest.fixture
async def mtls_nats(tmp_path: Path) -> AsyncIterator[SecuredNats]:
    async with _mtls_nats(tmp_path) as sn:
        yield sn


@pytest.fixture
async def secured_nats(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[SecuredNats]:
    """One of the secured servers above, named by indirect parametrization."""
    async with _SECURED[request.param](tmp_path) as sn:
        yield sn
