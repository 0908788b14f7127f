"""The ``kloudmeter`` command. The only place that reads os.environ and handles signals."""

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from kloudmeter_py import logs
from kloudmeter_py.config import Settings
from kloudmeter_py.errors import ConfigError, KloudmeterError

if TYPE_CHECKING:
    from kloudmeter_py.metrics import Metrics

log = structlog.get_logger("kloudmeter")
# Seconds the gateway's requests in progress get to finish when it stops (reads stop at once).
SHUTDOWN_GRACE = 3.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kloudmeter",
        description="Usage metering on NATS JetStream. Settings come from the environment "
        "(NATS_URL, METER_NATS_STREAM, HTTP_SERVER_PORT, METER_INTERVAL, ...); flags override.",
    )
    p.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "info"))
    p.add_argument("--log-json", action="store_true", help="JSON logs even on a terminal")
    sub = p.add_subparsers(dest="command", required=True)

    def secured(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--nats-creds", help="overrides NATS_CREDS: a user .creds file")
        sp.add_argument("--nats-nkey-seed", help="overrides NATS_NKEY_SEED: an NKEY seed file")
        sp.add_argument("--nats-tls-cert", help="overrides NATS_TLS_CERT: client certificate")
        sp.add_argument("--nats-tls-key", help="overrides NATS_TLS_KEY: its private key")
        sp.add_argument("--nats-tls-ca", help="overrides NATS_TLS_CA: CA of the server")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--nats-url", help="overrides NATS_URL")
        sp.add_argument("--stream", help="overrides METER_NATS_STREAM")
        secured(sp)

    up = sub.add_parser("up", help="embedded nats-server + setup + worker + gateway")
    common(up)
    up.add_argument("--port", type=int, help="HTTP port, overrides HTTP_SERVER_PORT")
    up.add_argument("--host", help="HTTP address, overrides HTTP_SERVER_HOST")
    up.add_argument("--data-dir", help="where the embedded NATS keeps data (./.kloudmeter)")
    up.add_argument(
        "--workers",
        type=int,
        help="worker processes sharing the partitions: this one and N-1 `kloudmeter worker` "
        "(default: one per CPU, at most METER_PARTITIONS)",
    )
    setup = sub.add_parser("setup", help="create the stream and buckets (idempotent)")
    common(setup)
    worker = sub.add_parser("worker", help="run a worker against NATS_URL")
    common(worker)
    worker.add_argument(
        "--partitions", help="comma-separated partitions to own (default: all)", default=None
    )
    # kloudmeter up's children: where to write their metrics reports (metrics.Reporter)
    worker.add_argument("--report-fd", type=int, help=argparse.SUPPRESS)
    gateway = sub.add_parser("gateway", help="run the HTTP gateway against NATS_URL")
    common(gateway)
    gateway.add_argument("--port", type=int, help="HTTP port, overrides HTTP_SERVER_PORT")
    gateway.add_argument("--host", help="HTTP address, overrides HTTP_SERVER_HOST")
    backfill = sub.add_parser(
        "backfill", help="apply a meter to events stored before it was created (exactly once)"
    )
    common(backfill)
    backfill.add_argument("--meter", required=True, help="meter id")
    backfill.add_argument(
        "--from",
        dest="since",
        help="only events stored at or after this RFC 3339 time (default: all retained)",
    )
    backfill.add_argument("--no-wait", action="store_true", help="start it and return")
    backfill.add_argument("--timeout", type=float, default=600, help="seconds to wait at most")
    token = sub.add_parser("token", help="create an API token (shown once)")
    common(token)
    token.add_argument("action", choices=["create"])
    token.add_argument("--admin", action="store_true", help="an admin token (else a user's)")
    token.add_argument("--tenant", help="the tenant of a user token (for an admin: optional)")
    token.add_argument("--name", default="", help="a name to recognise it by")
    bench = sub.add_parser(
        "bench",
        help="measure end to end against raw JetStream (embedded NATS unless NATS_URL is set)",
    )
    bench.add_argument("--nats-url", help="use this NATS instead of an embedded one")
    bench.add_argument(
        "--shape",
        choices=["live", "wide"],
        help="live (default): 1,000 subjects, events in the current minute (200,000); wide: "
        "10,000 subjects, times over the last 30 days (1,000,000)",
    )
    bench.add_argument(
        "--reads",
        action="store_true",
        help="time the query reads over the wide shape through HTTP, against a raw KV fetch",
    )
    bench.add_argument("--repeat", type=int, default=5, help="--reads: timings of each read")
    bench.add_argument(
        "--resources",
        type=int,
        default=10_000,
        help="--reads: resources with lifecycle events (records, resources, charging)",
    )
    bench.add_argument("--events", type=int, help="events end to end (default: the shape's)")
    bench.add_argument("--subjects", type=int, help="subjects (default: the shape's)")
    bench.add_argument(
        "--workers",
        type=int,
        help="worker processes sharing the partitions (default: one per CPU, at most "
        "METER_PARTITIONS, as kloudmeter up)",
    )
    bench.add_argument("--http-seconds", type=float, default=5.0)
    bench.add_argument("--lag-rate", type=int, default=5000, help="offered events/s")
    bench.add_argument("--lag-seconds", type=float, default=5.0)
    bench.add_argument("--json", action="store_true", help="one JSON object on the last line")
    bench.add_argument(
        "--memory-trace",
        metavar="DIR",
        help="the workers write their memory every 100 ms under DIR (METER_MEMORY_TRACE); "
        "the results give each worker's line at its peak",
    )
    agent = sub.add_parser(
        "agent", help="sample this host's CPU and memory and post them to a perf receiver"
    )
    agent.add_argument(
        "--this-host", required=True, help="what to call this host (hostname, IP, asset id)"
    )
    agent.add_argument(
        "--publish", required=True, help="receiver URL, e.g. http://127.0.0.1:8080/api/perf"
    )
    agent.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    agent.add_argument(
        "--buffer", type=int, default=600, help="samples kept while the receiver is down"
    )
    dead = sub.add_parser("dead-letters", help="count, list or replay dead letters")
    common(dead)
    dead.add_argument("--meter", help="only this meter's dead letters")
    dead.add_argument("--list", action="store_true", help="print them, oldest first")
    dead.add_argument(
        "--replay", action="store_true", help="apply them again (after fixing the cause)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.configure(args.log_level, json=True if args.log_json else None)
    try:
        settings = Settings.from_env(
            os.environ,
            nats_url=getattr(args, "nats_url", None),
            stream=getattr(args, "stream", None),
            http_port=getattr(args, "port", None),
            http_host=getattr(args, "host", None),
            data_dir=getattr(args, "data_dir", None),
            nats_creds=getattr(args, "nats_creds", None),
            nats_nkey_seed=getattr(args, "nats_nkey_seed", None),
            nats_tls_cert=getattr(args, "nats_tls_cert", None),
            nats_tls_key=getattr(args, "nats_tls_key", None),
            nats_tls_ca=getattr(args, "nats_tls_ca", None),
        )
        if args.command != "agent":
            from kloudmeter_py.store import credentials

            # Every file a secured NATS needs is read and checked before anything starts.
            credentials.load(settings)
    except ConfigError as exc:
        print(f"kloudmeter: configuration error: {exc}", file=sys.stderr)
        return 2
    command = {
        "up": _up,
        "setup": _setup,
        "worker": _worker,
        "gateway": _gateway,
        "backfill": _backfill,
        "dead-letters": _dead_letters,
        "bench": _bench,
        "token": _token,
        "agent": _agent,
    }[args.command]
    try:
        return asyncio.run(command(settings, args))
    except (ConfigError, KloudmeterError) as exc:
        print(f"kloudmeter: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutdown.requested")


async def _nats_answers(host: str, port: int) -> bool:
    """True when something at host:port greets like a NATS server (an INFO line)."""
    try:
        async with asyncio.timeout(2):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return False
    return line.startswith(b"INFO ")


@contextlib.asynccontextmanager
async def _connected(settings: Settings, name: str) -> AsyncIterator[object]:
    from kloudmeter_py.store.kv import connect

    try:
        nc = await connect(settings.nats_url, name=name, settings=settings)
    except ConfigError:
        raise  # refused credentials or certificate: the message names the setting
    except Exception as exc:
        raise KloudmeterError(f"cannot reach NATS at {settings.nats_url}: {exc}") from exc
    try:
        yield nc
    finally:
        # Bounded: with every NATS server gone, a drain would wait for a reconnect forever.
        try:
            async with asyncio.timeout(5):
                await nc.drain()
        except Exception:
            with contextlib.suppress(Exception):
                await nc.close()


@contextlib.asynccontextmanager
async def _serving(
    settings: Settings, nc: object, metrics: "Metrics | None" = None
) -> AsyncIterator[None]:
    from kloudmeter_py.gateway import create_app

    app = create_app(settings, nc, metrics)  # type: ignore[arg-type]
    # Stopping: reads in progress stop at their next tick (app.on_shutdown) and answer 503;
    # aiohttp waits SHUTDOWN_GRACE for the other requests, then as long again after asking them
    # to stop, then cancels them (its default is 60 s, twice).
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE)
    await runner.setup()
    site = web.TCPSite(runner, settings.http_host, settings.http_port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise KloudmeterError(
            f"HTTP_SERVER_PORT: cannot listen on {settings.http_host}:{settings.http_port}: {exc}"
        ) from exc
    log.info("gateway.listening", url=f"http://{settings.http_host}:{settings.http_port}")
    try:
        yield
    finally:
        await runner.cleanup()


async def _setup(settings: Settings, args: argparse.Namespace) -> int:
    from kloudmeter_py.store.provision import provision

    async with _connected(settings, "kloudmeter-setup") as nc:
        await provision(nc.jetstream(), settings)  # type: ignore[attr-defined]
    return 0


async def _worker(settings: Settings, args: argparse.Namespace) -> int:
    from kloudmeter_py.worker import Worker, tune_gc

    tune_gc()

    parts = None
    if args.partitions:
        try:
            parts = [int(p) for p in args.partitions.split(",")]
        except ValueError:
            raise ConfigError("--partitions: expected numbers like 0,1,2") from None
    async with _connected(settings, "kloudmeter-worker") as nc:
        worker = Worker(nc, settings, partitions=parts)  # type: ignore[arg-type]
        reporting = None
        if args.report_fd is not None:
            from kloudmeter_py.metrics import Reporter

            reporting = asyncio.create_task(Reporter(args.report_fd, worker).run())
        await worker.start()
        try:
            await _wait_for_signal()
        finally:
            await worker.stop()
            if reporting is not None:
                reporting.cancel()
                await asyncio.wait({reporting})
    return 0


async def _gateway(settings: Settings, args: argparse.Namespace) -> int:
    settings.check_exposure()
    async with _connected(settings, "kloudmeter-gateway") as nc, _serving(settings, nc):
        await _wait_for_signal()
    return 0


# A child worker of `kloudmeter up` that exits on its own is started again after this many
# seconds, doubled while it keeps exiting within RESTART_RESET seconds of its start.
RESTART_FIRST = 1.0
RESTART_MAX = 30.0
RESTART_RESET = 60.0


@contextlib.asynccontextmanager
async def _worker_process(
    settings: Settings, args: argparse.Namespace, metrics: "Metrics"
) -> AsyncIterator[None]:
    """One more worker for ``kloudmeter up``, kept running while the block runs: a
    ``kloudmeter worker`` child process (``_one_child``), started again when it exits on its
    own (after RESTART_FIRST seconds, doubling to RESTART_MAX while it keeps exiting soon
    after it starts), stopped (SIGTERM) when the block ends. Its partitions move to the other
    workers meanwhile (after METER_LEASE_TTL when it was killed). A worker is one Python
    process, so it folds on one core at most: on the wide bench shape two worker processes
    cleared a million events 1.6-1.8x as fast as one."""
    stopping = asyncio.Event()
    # The first start's outcome: a child that cannot be started stops `up` at start, as
    # before; one that fails to start again later is logged and tried again.
    first: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def supervise() -> None:
        delay = RESTART_FIRST
        while True:
            started = time.monotonic()
            try:
                async with _one_child(settings, args, metrics) as proc:
                    if not first.done():
                        first.set_result(None)
                    exited = asyncio.create_task(proc.wait())
                    stop = asyncio.create_task(stopping.wait())
                    await asyncio.wait({exited, stop}, return_when=asyncio.FIRST_COMPLETED)
                    stop.cancel()
                    if stopping.is_set():
                        exited.cancel()
                        return  # leaving the block stops it
                    log.warning("worker.process_exited", pid=proc.pid, code=proc.returncode)
            except Exception as exc:
                if not first.done():
                    first.set_exception(exc)
                    return
                log.error("worker.process_failed", error=str(exc))
            if time.monotonic() - started > RESTART_RESET:
                delay = RESTART_FIRST
            log.info("worker.process_restarting", seconds=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay)
            if stopping.is_set():
                return
            delay = min(delay * 2, RESTART_MAX)

    supervisor = asyncio.create_task(supervise())
    try:
        await first
        yield
    finally:
        stopping.set()
        await supervisor


@contextlib.asynccontextmanager
async def _one_child(
    settings: Settings, args: argparse.Namespace, metrics: "Metrics"
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``kloudmeter worker`` as a child process with these settings, its logs on this stderr,
    its metrics reported to ``metrics`` through a pipe (metrics.Reporter, metrics.follow),
    stopped (SIGTERM) when the block ends."""
    from kloudmeter_py.config import child_env
    from kloudmeter_py.metrics import follow
    from kloudmeter_py.store.server import python_child

    flags = ["--log-level", args.log_level] + (["--log-json"] if args.log_json else [])
    read_fd, write_fd = os.pipe()
    argv = ["-m", "kloudmeter_py", *flags, "worker", "--report-fd", str(write_fd)]
    reader = asyncio.StreamReader()
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", 0)
    )
    following = asyncio.create_task(follow(metrics, reader))
    spawned = False
    try:
        async with python_child(
            argv, child_env(settings), quiet=False, pass_fds=(write_fd,)
        ) as proc:
            os.close(write_fd)  # the child's alone now: the pipe ends when the child does
            spawned = True
            log.info("worker.process_started", pid=proc.pid)
            yield proc
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(following), 2)  # its last report
    finally:
        if not spawned:
            os.close(write_fd)
        following.cancel()
        transport.close()


def _workers(args: argparse.Namespace, settings: Settings) -> int:
    """``--workers``, or one per CPU (config.default_workers)."""
    from kloudmeter_py.config import default_workers

    if args.workers is None:
        return default_workers(settings.partitions)
    if args.workers < 1:
        raise ConfigError("--workers must be positive")
    return int(args.workers)


async def _up(settings: Settings, args: argparse.Namespace) -> int:
    from kloudmeter_py.metrics import Metrics
    from kloudmeter_py.store import credentials
    from kloudmeter_py.store.provision import provision
    from kloudmeter_py.store.server import NatsServer
    from kloudmeter_py.worker import Worker, tune_gc

    settings.check_exposure()
    workers = _workers(args, settings)
    tune_gc()
    async with contextlib.AsyncExitStack() as stack:
        if await _nats_answers(settings.nats_host, settings.nats_port):
            log.info("nats.using_existing", url=settings.nats_url)
        elif secured := credentials.secured_setting(settings):
            # Credentials mean a secured NATS elsewhere: never an open embedded one instead.
            raise ConfigError(
                f"{secured}: no NATS server answers at {settings.nats_url}, and kloudmeter up "
                "starts an embedded one only without NATS credentials or certificates"
            )
        else:
            store = Path(settings.data_dir) / "nats"
            server = NatsServer(store, host=settings.nats_host, port=settings.nats_port)
            await stack.enter_async_context(server)
            log.info("nats.embedded_started", url=server.url, store_dir=str(store))
        nc = await stack.enter_async_context(_connected(settings, "kloudmeter"))
        await provision(nc.jetstream(), settings)  # type: ignore[attr-defined]
        worker = Worker(nc, settings)  # type: ignore[arg-type]
        metrics = Metrics()  # one registry: /metrics shows the gateway and the worker
        metrics.watch_worker(worker)
        await worker.start()
        stack.push_async_callback(worker.stop)
        for _ in range(workers - 1):
            await stack.enter_async_context(_worker_process(settings, args, metrics))
        await stack.enter_async_context(_serving(settings, nc, metrics))
        print(
            f"kloudmeter is up: http://{settings.http_host}:{settings.http_port} "
            f"(NATS {settings.nats_url}). Ctrl-C stops.",
            file=sys.stderr,
            flush=True,
        )
        await _wait_for_signal()
    return 0


def _progress(done: int, total: int, width: int = 30) -> None:
    frac = 1.0 if total <= 0 else min(done / total, 1.0)
    bar = "#" * int(frac * width)
    print(f"\r[{bar:<{width}}] {frac:6.1%} {done}/{total} events", end="", file=sys.stderr)


async def _backfill(settings: Settings, args: argparse.Namespace) -> int:
    from datetime import datetime

    from kloudmeter_py.store import backfill
    from kloudmeter_py.store.layout import Layout

    since = None
    if args.since:
        try:
            since = datetime.fromisoformat(args.since)
        except ValueError:
            raise ConfigError(f"--from: {args.since!r} is not an RFC 3339 time") from None
        if since.tzinfo is None:
            raise ConfigError("--from: the time needs an offset, for example 2026-11-01T00:00Z")
    layout = Layout(settings)
    async with _connected(settings, "kloudmeter-backfill") as nc:
        js = nc.jetstream()  # type: ignore[attr-defined]
        meter, expected = await backfill.start(js, layout, args.meter, since)
        print(
            f"backfilling meter {meter.id!r} from stream sequence {meter.startSeq + 1}: "
            f"{expected} events (workers do the work)",
            file=sys.stderr,
        )
        if args.no_wait:
            return 0
        deadline = time.monotonic() + args.timeout
        last, last_change = -1, time.monotonic()
        while True:
            done = await backfill.applied(js, layout, meter)
            _progress(done, expected)
            if done >= expected:
                print("\nbackfill done", file=sys.stderr)
                return 0
            if done != last:
                last, last_change = done, time.monotonic()
            elif time.monotonic() - last_change > 30:
                print(
                    f"\nbackfill stalled at {done}/{expected}: the rest may be dead letters "
                    "(kloudmeter dead-letters), or no worker is running",
                    file=sys.stderr,
                )
                return 1
            if time.monotonic() > deadline:
                print("\nbackfill still running; stopped waiting", file=sys.stderr)
                return 1
            await asyncio.sleep(0.5)


async def _dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    import msgspec

    from kloudmeter_py.store import deadletters
    from kloudmeter_py.store.layout import Layout

    layout = Layout(settings)
    async with _connected(settings, "kloudmeter-dead-letters") as nc:
        js = nc.jetstream()  # type: ignore[attr-defined]
        if args.replay:
            report = await deadletters.replay(
                js, layout, args.meter, unique_limit=settings.unique_limit
            )
            print(msgspec.json.encode(report).decode())
            return 0
        if args.list:
            for letter in await deadletters.iterate(js, layout, args.meter):
                print(msgspec.json.encode(letter).decode())
            return 0
        print(msgspec.json.encode(await deadletters.counts(js, layout)).decode())
    return 0


async def _bench(settings: Settings, args: argparse.Namespace) -> int:
    import json

    from kloudmeter_py import bench

    url = args.nats_url or os.environ.get("NATS_URL") or None
    if (args.events is not None and args.events < 1) or (
        args.subjects is not None and args.subjects < 1
    ):
        raise ConfigError("--events and --subjects must be positive")
    workers = _workers(args, settings)
    if args.reads:
        if args.memory_trace:
            raise ConfigError("--memory-trace: not with --reads")
        return await _bench_reads(settings, args, url)
    results = await bench.run(
        shape=args.shape or "live",
        secured=settings,
        nats_url=url,
        events_n=args.events,
        subjects=args.subjects,
        http_seconds=args.http_seconds,
        lag_rate=args.lag_rate,
        lag_seconds=args.lag_seconds,
        quiet=False,
        workers=workers,
        memory_trace=args.memory_trace,
    )
    print(bench.table(results))
    if args.json:
        print(json.dumps(results))
    return 0 if results["correct"] else 1


async def _bench_reads(settings: Settings, args: argparse.Namespace, url: str | None) -> int:
    import json

    from kloudmeter_py import bench_reads

    if args.shape == "live":
        raise ConfigError("--reads uses the wide shape (--subjects/--events make it smaller)")
    if args.repeat < 1:
        raise ConfigError("--repeat must be positive")
    if args.resources < 1:
        raise ConfigError("--resources must be positive")
    results = await bench_reads.run(
        nats_url=url,
        events_n=args.events,
        subjects=args.subjects,
        resources=args.resources,
        repeat=args.repeat,
        quiet=False,
        secured=settings,
    )
    print(bench_reads.table(results))
    if args.json:
        print(json.dumps(results))
    return 0 if results["reads_correct"] else 1


async def _token(settings: Settings, args: argparse.Namespace) -> int:
    from kloudmeter_py.store.auth import AuthStore
    from kloudmeter_py.store.layout import Layout
    from kloudmeter_py.store.provision import provision

    if not args.admin and not args.tenant:
        raise ConfigError("--tenant is required for a user token (or pass --admin)")
    async with _connected(settings, "kloudmeter-token") as nc:
        js = nc.jetstream()  # type: ignore[attr-defined]
        await provision(js, settings)
        user, token = await AuthStore(js, Layout(settings)).create_user(
            args.name, args.tenant or "admin", "admin" if args.admin else "user"
        )
    print(token)
    print(
        f"user {user.id} ({user.role}, tenant {user.tenant}); the token is shown only now",
        file=sys.stderr,
    )
    return 0


async def _agent(settings: Settings, args: argparse.Namespace) -> int:
    from kloudmeter_py.agent import run_agent

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await run_agent(args.this_host, args.publish, args.interval, stop, buffer_size=args.buffer)
    return 0
