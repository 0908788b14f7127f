"""The command line: settings from the environment, and `kloudmeter up` as a user runs it."""

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from kloudmeter_py.config import Settings
from kloudmeter_py.errors import ConfigError
from kloudmeter_py.store.server import NatsServer
from tests.conftest import eventually
from tests.helpers import until_counted, until_serving


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_settings_come_from_kloudmeters_variables() -> None:
    """NATS_URL, METER_NATS_STREAM, HTTP_SERVER_PORT and METER_INTERVAL are read."""
    s = Settings.from_env(
        {
            "NATS_URL": "nats://10.0.0.1:4333",
            "METER_NATS_STREAM": "usage",
            "HTTP_SERVER_PORT": "9090",
            "METER_INTERVAL": "30",
        }
    )
    assert (s.nats_host, s.nats_port, s.stream, s.http_port, s.interval) == (
        "10.0.0.1",
        4333,
        "usage",
        9090,
        30,
    )
    assert Settings.from_env({}) == Settings()


@pytest.mark.parametrize(
    ("env", "var"),
    [
        ({"HTTP_SERVER_PORT": "eighty"}, "HTTP_SERVER_PORT"),
        ({"HTTP_SERVER_PORT": "70000"}, "HTTP_SERVER_PORT"),
        ({"METER_INTERVAL": "0"}, "METER_INTERVAL"),
        ({"METER_INTERVAL": "7"}, "METER_INTERVAL"),
        ({"METER_NATS_STREAM": "a.b"}, "METER_NATS_STREAM"),
        ({"NATS_URL": "http://x"}, "NATS_URL"),
        # acknowledged only after the round and the summary flush: both stay under the 60 s
        # ack wait, or the server would redeliver and the worker start over forever
        ({"METER_SUMMARY_FLUSH_MS": "60000"}, "METER_SUMMARY_FLUSH_MS"),
        ({"METER_FLUSH_MS": "30000"}, "METER_FLUSH_MS"),
        ({"METER_READ_TIMEOUT_MS": "0"}, "METER_READ_TIMEOUT_MS"),
    ],
)
def test_invalid_settings_name_the_variable(env: dict[str, str], var: str) -> None:
    """A bad value fails at start with the variable's name in the message."""
    with pytest.raises(ConfigError, match=var):
        Settings.from_env(env)


def test_cli_exits_2_on_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    """The command prints the configuration error and exits 2."""
    from kloudmeter_py.cli import main

    os.environ["METER_INTERVAL"] = "nope"
    try:
        assert main(["setup"]) == 2
    finally:
        del os.environ["METER_INTERVAL"]
    assert "METER_INTERVAL" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("cpus", "partitions", "expected"),
    [({0}, 4, 1), ({0, 1}, 4, 2), (set(range(8)), 4, 4), (set(range(8)), 1, 1)],
)
def test_default_workers_one_per_cpu_at_most_one_per_partition(
    monkeypatch: pytest.MonkeyPatch, cpus: set[int], partitions: int, expected: int
) -> None:
    """`up` and `bench` run one worker per CPU the process may use, no more than partitions."""
    from kloudmeter_py.config import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: cpus)
    assert default_workers(partitions) == expected


@pytest.mark.parametrize("command", ["up", "bench"])
def test_workers_below_one_exit_2(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`--workers 0` is refused at start, naming the flag, before anything is started."""
    from kloudmeter_py.cli import main

    assert main([command, "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err


async def test_a_child_worker_that_cannot_start_stops_up_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`kloudmeter up`'s extra worker that cannot even be started fails `up` at start with
    the cause, rather than leaving a supervisor that fails unseen (restarts are for a child
    that ran and exited)."""
    import argparse
    import contextlib
    from collections.abc import AsyncIterator

    from kloudmeter_py import cli
    from kloudmeter_py.metrics import Metrics

    @contextlib.asynccontextmanager
    async def cannot(*_: object) -> AsyncIterator[None]:
        raise OSError("no such interpreter")
        yield

    monkeypatch.setattr(cli, "_one_child", cannot)
    args = argparse.Namespace(log_level="warning", log_json=False)
    with pytest.raises(OSError, match="no such interpreter"):
        async with cli._worker_process(Settings(), args, Metrics(process_collectors=False)):
            pass


async def test_up_runs_everything_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    """`kloudmeter up` starts NATS, worker and gateway; an event becomes a reading; SIGINT stops
    it with exit code 0 and leaves no nats-server behind."""
    nats_port, http_port = _free_port(), _free_port()
    env = dict(
        os.environ,
        NATS_URL=f"nats://127.0.0.1:{nats_port}",
        HTTP_SERVER_PORT=str(http_port),
        LOG_LEVEL="warning",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kloudmeter_py",
        "up",
        "--data-dir",
        str(tmp_path / "data"),
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{http_port}"
    try:
        async with aiohttp.ClientSession() as http:
            await until_serving(http, base)
            meter = {"id": "m", "eventType": "t", "aggregation": "count"}
            async with http.post(f"{base}/api/create-meter", json=meter) as r:
                assert r.status == 201
            event = {"id": "1", "eventType": "t", "subject": "s"}
            async with http.post(f"{base}/api/register-event", json=event) as r:
                assert r.status == 202

            await until_counted(http, base, 1)
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            code = await proc.wait()
    assert code == 0
    assert (tmp_path / "data" / "nats" / "jetstream").is_dir()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", nats_port), timeout=1):
        pass


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


async def test_up_with_two_workers_shares_the_partitions_and_stops_both(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """`kloudmeter up --workers 2` (on a NATS that already runs) starts a second worker
    process: the two share the partitions out, events of every partition are counted once,
    up's /metrics shows both workers' counts, a child killed is started again, and SIGINT
    stops the child cleanly with the rest: every lease is given back at once (a worker that
    is killed leaves its leases to expire)."""
    import nats

    from kloudmeter_py.store.kv import scan
    from kloudmeter_py.store.layout import Layout

    http_port = _free_port()
    env = dict(
        os.environ,
        NATS_URL=nats_server.url,
        HTTP_SERVER_PORT=str(http_port),
        LOG_LEVEL="warning",
        METER_LEASE_TTL="6",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kloudmeter_py",
        "up",
        "--workers",
        "2",
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{http_port}"
    settings = Settings.from_env(env)
    layout = Layout(settings)
    half = settings.partitions // 2
    nc = await nats.connect(nats_server.url)

    async def owners() -> dict[str, int]:
        owned = await scan(nc.jetstream(), layout.leases_bucket, "partition.*")
        held: dict[str, int] = {}
        for _, value in owned:
            held[value.decode()] = held.get(value.decode(), 0) + 1
        return held

    workers: list[int] = []
    try:
        async with aiohttp.ClientSession() as http:
            await until_serving(http, base)
            workers = [p for p in _children(proc.pid) if " worker" in _cmdline(p)]
            assert len(workers) == 1
            # every partition held, by two workers, half each
            await eventually(owners, lambda h: sorted(h.values()) == [half, half], timeout=30)
            meter = {"id": "m", "eventType": "t", "aggregation": "count"}
            async with http.post(f"{base}/api/create-meter", json=meter) as r:
                assert r.status == 201
            for n in range(40):
                event = {"id": str(n), "eventType": "t", "subject": f"s{n}"}
                async with http.post(f"{base}/api/register-event", json=event) as r:
                    assert r.status == 202

            await until_counted(http, base, 40)

            async def applied() -> dict[str, float]:
                """kloudmeter_events_applied_total by worker, from up's /metrics."""
                async with http.get(f"{base}/metrics") as r:
                    text = await r.text()
                by_worker: dict[str, float] = {}
                for line in text.splitlines():
                    if line.startswith("kloudmeter_events_applied_total{"):
                        labels, value = line.rsplit(" ", 1)
                        by_worker[labels] = float(value)
                return by_worker

            # both workers' counts, the child's reported through its pipe (metrics.Reporter)
            seen = await eventually(
                applied, lambda b: len(b) == 2 and sum(b.values()) == 40, timeout=15
            )
            assert all(v > 0 for v in seen.values()), seen

            # a child killed is started again; its partitions come back to it or the other
            os.kill(workers[0], signal.SIGKILL)

            async def new_child() -> list[int]:
                return [p for p in _children(proc.pid) if " worker" in _cmdline(p)]

            again = await eventually(new_child, lambda c: len(c) == 1 and c != workers)
            workers += again
            for n in range(40, 80):
                event = {"id": str(n), "eventType": "t", "subject": f"s{n}"}
                async with http.post(f"{base}/api/register-event", json=event) as r:
                    assert r.status == 202
            await until_counted(http, base, 80, timeout=30)  # after METER_LEASE_TTL
            await eventually(owners, lambda h: sorted(h.values()) == [half, half], timeout=30)
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            code = await proc.wait()
    try:
        assert code == 0
        assert [p for p in workers if " worker" in _cmdline(p)] == []
        assert await owners() == {}  # given back, not left to expire (METER_LEASE_TTL)
    finally:
        await nc.close()


async def test_a_stream_set_up_with_the_old_default_partition_count_is_named_at_start(
    nats_server: NatsServer,
) -> None:
    """A stream set up while METER_PARTITIONS defaulted to 4 keeps 4: `setup`, `up` and
    `worker` with the default (16) stop at start with exit code 2 and name the count to run
    with, rather than leave twelve partitions' leases empty; with METER_PARTITIONS=4 they
    run."""
    env = dict(os.environ, NATS_URL=nats_server.url, LOG_LEVEL="warning", HTTP_SERVER_PORT="0")
    env.pop("METER_PARTITIONS", None)
    assert Settings.from_env(env).partitions == 16

    async def run(*command: str, partitions: str | None = None) -> tuple[int, str]:
        run_env = dict(env, METER_PARTITIONS=partitions) if partitions else env
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "kloudmeter_py",
            *command,
            env=run_env,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(60):
            _, err = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, err.decode()

    assert (await run("setup", partitions="4"))[0] == 0
    for command in (["setup"], ["worker"], ["up", "--workers", "1"]):
        code, err = await run(*command)
        assert code == 2, (command, err)
        assert "use METER_PARTITIONS=4 with this stream" in err, (command, err)
    assert (await run("setup", partitions="4"))[0] == 0
