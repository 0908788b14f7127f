"""Secured NATS: NKEY users, operator-mode JWT creds and mutual TLS, on every connection the
service makes (nats-py for setup, gateway, leases and KV reads; the worker's lean connection)."""

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from nats.aio.client import Client

from kloudmeter_py.config import Settings
from kloudmeter_py.gateway import create_app
from kloudmeter_py.store import credentials
from kloudmeter_py.store.credentials import NatsRefused
from kloudmeter_py.store.kv import connect
from kloudmeter_py.store.provision import provision
from kloudmeter_py.store.wire import Wire, WireError
from kloudmeter_py.worker import Worker
from tests import secured
from tests.conftest import SecuredNats, eventually
from tests.helpers import (
    create_meter,
    post_event,
    readings,
    total_count,
    until_counted,
    until_serving,
)

KINDS = ["nkey_nats", "operator_nats", "mtls_nats"]


def _env(settings: Settings) -> dict[str, str]:
    """The environment a deployment would set for ``settings``' secured NATS."""
    env = {"NATS_URL": settings.nats_url}
    for var, value in (
        ("NATS_CREDS", settings.nats_creds),
        ("NATS_NKEY_SEED", settings.nats_nkey_seed),
        ("NATS_TLS_CERT", settings.nats_tls_cert),
        ("NATS_TLS_KEY", settings.nats_tls_key),
        ("NATS_TLS_CA", settings.nats_tls_ca),
    ):
        if value:
            env[var] = value
    return env


def _kloudmeter(
    *args: str, env: dict[str, str], timeout: float = 30
) -> "subprocess.CompletedProcess[str]":
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    return subprocess.run(
        [sys.executable, "-m", "kloudmeter_py", "--log-level", "warning", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("secured_nats", KINDS, indirect=True)
async def test_worker_and_gateway_apply_events_exactly(
    secured_nats: SecuredNats,
) -> None:
    """Setup, gateway and worker (its lean connection too) on a secured server: every event is
    counted once, a repeated id not at all."""
    sn = secured_nats
    settings = sn.settings
    nc = await connect(settings.nats_url, name="test", settings=settings)
    try:
        await provision(nc.jetstream(), settings)
        worker = Worker(nc, settings)
        await worker.start()
        try:
            async with TestClient(TestServer(create_app(settings, nc))) as http:
                await create_meter(http, id="calls", eventType="call", aggregation="count")
                for i in range(30):
                    await post_event(
                        http, id=f"e{i % 25}", eventType="call", subject=f"c{i % 3}", data={}
                    )
                found = await eventually(
                    lambda: readings(http, meter="calls"), lambda rs: total_count(rs) >= 25
                )
                await asyncio.sleep(0.3)  # a late double count would show here
                assert total_count(await readings(http, meter="calls")) == 25
                assert {r["subject"] for r in found} == {"c0", "c1", "c2"}
            # the lean connection is the one that pulled and wrote: it authenticated too
            wire = worker._lean._wire
            assert wire is not None and wire.error is None
        finally:
            await worker.stop()
    finally:
        await nc.close()


@pytest.mark.parametrize("secured_nats", KINDS, indirect=True)
async def test_setup_command_takes_the_settings_from_the_environment(
    secured_nats: SecuredNats,
) -> None:
    """`kloudmeter setup` with NATS_CREDS / NATS_NKEY_SEED / NATS_TLS_* creates the stream."""
    sn = secured_nats
    proc = await asyncio.to_thread(_kloudmeter, "setup", env=_env(sn.settings))
    assert proc.returncode == 0, proc.stderr
    nc = await connect(sn.settings.nats_url, name="test", settings=sn.settings)
    try:
        assert (await nc.jetstream().stream_info("meters")).config.name == "meters"
    finally:
        await nc.close()


async def test_setup_command_takes_the_settings_as_flags(operator_nats: SecuredNats) -> None:
    """The same settings as command-line flags."""
    s = operator_nats.settings
    assert s.nats_creds is not None
    proc = await asyncio.to_thread(
        _kloudmeter, "setup", "--nats-url", s.nats_url, "--nats-creds", s.nats_creds, env={}
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("secured_nats", ["nkey_nats", "operator_nats"], indirect=True)
async def test_tenant_credentials_publish_only_their_own_events(
    secured_nats: SecuredNats,
) -> None:
    """A tenant's NKEY user (nats/nkeys.conf) or user JWT (publish allowed on
    meters.events.*.acme, as tenants.conf does with passwords) may publish acme's events and
    not globex's."""
    import nats.errors

    sn = secured_nats
    if "acme" in sn.keys:  # nkeys.conf names acme's public key
        seed = secured.write_secret(sn.dir / "acme.nk", sn.keys["acme"].seed.decode())
        tenant = Settings(nats_url=sn.settings.nats_url, nats_nkey_seed=seed)
    else:
        acme = secured.user_key()
        permissions = {"pub": {"allow": ["meters.events.*.acme"]}, "sub": {"allow": ["_INBOX.>"]}}
        jwt = secured.user_jwt(sn.keys["account"], acme, "acme", permissions)
        creds = secured.write_secret(sn.dir / "acme.creds", secured.creds_text(jwt, acme))
        tenant = Settings(nats_url=sn.settings.nats_url, nats_creds=creds)
    service = await connect(sn.settings.nats_url, name="svc", settings=sn.settings)
    await provision(service.jetstream(), sn.settings)

    async def on_error(exc: Exception) -> None:
        pass  # the permissions violation below is expected

    producer = await connect(tenant.nats_url, name="acme", settings=tenant, error_cb=on_error)
    try:
        js = producer.jetstream(timeout=2)
        event = {"id": "1", "eventType": "t", "subject": "acme"}
        assert (await js.publish("meters.events.t.acme", msgspec.json.encode(event))).seq == 1
        with pytest.raises((nats.errors.TimeoutError, asyncio.TimeoutError)):
            await js.publish("meters.events.t.globex", b'{"id":"2"}')
        assert (await service.jetstream().stream_info("meters")).state.messages == 1
    finally:
        await producer.close()
        await service.close()


# --- refused: a clear error naming the setting, quickly, and nothing started ---------------


def _refused_cases(sn: SecuredNats, case: str) -> tuple[Settings, str]:
    base = sn.settings
    if case == "wrong seed":
        seed = secured.write_secret(sn.dir / "other.nk", secured.user_key().seed.decode())
        return msgspec.structs.replace(base, nats_nkey_seed=seed), "NATS_NKEY_SEED"
    if case == "revoked jwt":
        revoked = sn.keys["revoked"]
        jwt = secured.user_jwt(sn.keys["account"], revoked, iat_offset=-60)
        creds = secured.write_secret(sn.dir / "revoked.creds", secured.creds_text(jwt, revoked))
        return msgspec.structs.replace(base, nats_creds=creds), "NATS_CREDS"
    if case == "foreign jwt":
        user = secured.user_key()
        jwt = secured.user_jwt(secured.account_key(), user)
        creds = secured.write_secret(sn.dir / "foreign.creds", secured.creds_text(jwt, user))
        return msgspec.structs.replace(base, nats_creds=creds), "NATS_CREDS"
    if case == "foreign certificate":
        other_ca = secured.make_ca(sn.dir, "other-ca")
        cert, key = secured.make_cert(sn.dir, other_ca, "stranger", server=False)
        return msgspec.structs.replace(
            base, nats_tls_cert=str(cert), nats_tls_key=str(key)
        ), "NATS_TLS_CERT"
    if case == "missing certificate":
        return msgspec.structs.replace(base, nats_tls_cert=None, nats_tls_key=None), "NATS_TLS_CERT"
    assert case == "untrusted server"
    other_ca = secured.make_ca(sn.dir, "other-ca")
    return msgspec.structs.replace(base, nats_tls_ca=str(other_ca[0])), "NATS_TLS_CA"


REFUSED = [
    ("nkey_nats", "wrong seed"),
    ("operator_nats", "revoked jwt"),
    ("operator_nats", "foreign jwt"),
    ("mtls_nats", "missing certificate"),
    ("mtls_nats", "foreign certificate"),
    ("mtls_nats", "untrusted server"),
]


@pytest.mark.parametrize(("secured_nats", "case"), REFUSED, indirect=["secured_nats"])
async def test_refused_connections_name_the_setting(secured_nats: SecuredNats, case: str) -> None:
    """nats-py and the lean connection both stop at once with NatsRefused naming the setting."""
    sn = secured_nats
    settings, setting = _refused_cases(sn, case)
    started = time.monotonic()
    with pytest.raises(NatsRefused, match=f"^{setting}: "):
        await connect(settings.nats_url, name="test", settings=settings)
    lean = credentials.load(settings)
    if case == "foreign certificate":
        # The server's "unknown ca" alert can reach the lean connection as a plain reset, which
        # names nothing; every command connects with nats-py first, which gets the alert.
        with pytest.raises((NatsRefused, WireError)):
            await Wire.connect(settings.nats_url, name="test", credentials=lean)
    else:
        with pytest.raises(NatsRefused, match=f"^{setting}: "):
            await Wire.connect(settings.nats_url, name="test", credentials=lean)
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(("secured_nats", "case"), REFUSED[:4], indirect=["secured_nats"])
async def test_refused_worker_and_gateway_do_not_start(
    secured_nats: SecuredNats, case: str, tmp_path: Path
) -> None:
    """`kloudmeter up`/`gateway` with credentials the server refuses: exit 2 with the setting
    named, no HTTP port opened, nothing provisioned."""
    sn = secured_nats
    settings, setting = _refused_cases(sn, case)
    env = {**_env(settings), "KLOUDMETER_DATA_DIR": str(tmp_path / "data")}
    proc = await asyncio.to_thread(_kloudmeter, "up", "--port", "0", env=env)
    assert proc.returncode == 2, proc.stderr
    assert f"kloudmeter: {setting}: " in proc.stderr
    assert "gateway.listening" not in proc.stderr and "kloudmeter is up" not in proc.stderr
    nc = await connect(sn.settings.nats_url, name="test", settings=sn.settings)
    try:
        names = [s.config.name async for s in _streams(nc)]
        assert names == []
    finally:
        await nc.close()


async def _streams(nc: Client) -> AsyncIterator[Any]:
    for info in await nc.jetstream().streams_info():
        yield info


@pytest.mark.parametrize("secured_nats", KINDS, indirect=True)
async def test_bench_runs_exactly_on_a_secured_server(secured_nats: SecuredNats) -> None:
    """`kloudmeter bench` against a secured server: its own connections (nats-py and the lean
    one that checks every window) and the worker and gateway it starts all authenticate, and
    every reading and window is exact."""
    from kloudmeter_py import bench

    results = await bench.run(
        nats_url=secured_nats.settings.nats_url,
        secured=secured_nats.settings,
        events_n=500,
        subjects=20,
        http_seconds=0.2,
        lag_rate=100,
        lag_seconds=0.2,
        quiet=True,
    )
    assert results["correct"] is True, results.get("wrong")
    assert results["http_batch_events_per_s"] > 0


@pytest.mark.parametrize("secured_nats", ["operator_nats", "mtls_nats"], indirect=True)
async def test_up_command_counts_events_on_a_secured_server(
    secured_nats: SecuredNats, tmp_path: Path
) -> None:
    """`kloudmeter up` against a secured server (settings from the environment): provisioning,
    the worker's lean connection and the gateway all connect; an event becomes a reading."""
    import signal
    import socket

    import aiohttp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        http_port = s.getsockname()[1]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    env = {
        **clean,
        **_env(secured_nats.settings),
        "HTTP_SERVER_PORT": str(http_port),
        "KLOUDMETER_DATA_DIR": str(tmp_path / "data"),
        "LOG_LEVEL": "warning",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kloudmeter_py", "up", env=env, stderr=asyncio.subprocess.PIPE
    )
    base = f"http://127.0.0.1:{http_port}"
    try:
        async with aiohttp.ClientSession() as http:
            await until_serving(http, base)
            meter = {"id": "m", "eventType": "t", "aggregation": "count"}
            async with http.post(f"{base}/api/create-meter", json=meter) as r:
                assert r.status == 201
            for i in (1, 2, 1):
                event = {"id": str(i), "eventType": "t", "subject": "s"}
                async with http.post(f"{base}/api/register-event", json=event) as r:
                    assert r.status == 202

            await until_counted(http, base, 2)
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            code = await proc.wait()
    assert code == 0
    assert not (tmp_path / "data").exists()  # the secured server was used, none embedded
