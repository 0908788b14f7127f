"""A 3-node NATS cluster on loopback, R3 stream and buckets, one node killed mid-run."""

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from kloudmeter_py.config import Settings
from kloudmeter_py.store.provision import provision
from kloudmeter_py.store.server import NatsServer
from kloudmeter_py.worker import Worker
from tests.conftest import eventually
from tests.load import Load, actual_or_empty, calls_total, create_meters


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[list[NatsServer]]:
    routes = _free_ports(3)
    servers = []
    for i in range(3):
        conf = tmp_path / f"n{i}.conf"
        route_list = "\n".join(f"    nats-route://127.0.0.1:{p}" for p in routes)
        conf.write_text(
            f"server_name: n{i}\n"
            f"cluster {{\n  name: test\n  listen: 127.0.0.1:{routes[i]}\n"
            f"  routes: [\n{route_list}\n  ]\n}}\n"
        )
        servers.append(NatsServer(tmp_path / f"store{i}", config_file=str(conf)))
    await asyncio.gather(*(s.start() for s in servers))
    try:
        yield servers
    finally:
        await asyncio.gather(*(s.stop() for s in servers))


async def test_r3_cluster_survives_a_node_killed_mid_run(cluster: list[NatsServer]) -> None:
    """R3 stream and buckets; one of three nodes SIGKILLed during the run: readings exact, and
    events sent after the kill are counted too."""
    url = ",".join(s.url for s in cluster)
    settings = Settings(nats_url=url, partitions=2, replicas=3, lease_ttl=3)
    nc = await nats.connect(
        servers=url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.2
    )
    js = nc.jetstream(timeout=10)

    async def cluster_ready() -> bool:
        try:
            info = await js.account_info()
            return info is not None
        except Exception:
            return False

    await eventually(cluster_ready, bool, timeout=30)
    await provision(js, settings)
    info = await js.stream_info("meters")
    assert info.config.num_replicas == 3
    assert (await js.stream_info("KV_readings")).config.num_replicas == 3
    await create_meters(nc)
    from kloudmeter_py.store.kv import connect

    worker_nc = await connect(url, name="worker")
    worker = Worker(worker_nc, settings)
    await worker.start()
    try:
        first = Load(3000, dup_ratio=0.1, seed=11)
        publisher = asyncio.create_task(first.publish(nc))
        await eventually(lambda: actual_or_empty(nc), lambda r: calls_total(r) > 300, timeout=60)
        cluster[1].kill()
        await publisher
        second = Load(500, dup_ratio=0.0, seed=12)
        await second.publish(nc)
        expected = first.expected()
        for key, value in second.expected().items():
            meter = key[0]
            if meter == "users":
                continue
            expected[key] = expected.get(key, 0) + value
        users = {(m, s, g) for (m, s, g) in expected if m == "users"}
        got = await eventually(
            lambda: actual_or_empty(nc),
            lambda r: calls_total(r) >= calls_total(expected),
            timeout=90,
        )
        assert {k: v for k, v in got.items() if k not in users} == {
            k: v for k, v in expected.items() if k not in users
        }
    finally:
        await worker.stop()
        await worker_nc.close()
        await nc.close()
