"""The worker's lean NATS connection against a real nats-server: authentication and TLS from
the URL, clear errors, many keys in one direct get, and the ack subject parser."""

from pathlib import Path

import nats
import pytest
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, KeyValueConfig, StreamConfig

from kloudmeter_py.config import Settings
from kloudmeter_py.store.provision import provision
from kloudmeter_py.store.pull import (
    Pullers,
    RawPuller,
    _left_undelivered,
    ack_fields,
    pending_after,
)
from kloudmeter_py.store.server import NatsServer
from kloudmeter_py.store.wire import Wire, WireError
from kloudmeter_py.worker import Worker
from tests.conftest import eventually
from tests.load import Load, actual, calls_total, create_meters


def test_ack_fields_reads_both_ack_subject_forms() -> None:
    # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ns>.<pending>
    assert ack_fields("$JS.ACK.meters.c1.1.42.7.1700000000000000000.3") == (
        42,
        1,
        1700000000000000000,
        3,
    )
    # with domain and account hash, and a trailing token
    assert ack_fields("$JS.ACK.hub.ACCHASH.meters.c1.2.43.8.1700000000000000001.0.tok") == (
        43,
        2,
        1700000000000000001,
        0,
    )
    with pytest.raises(ValueError, match="not a JetStream ack subject"):
        ack_fields("_INBOX.abc")


def test_pending_after_adds_up_the_consumers_not_skipped() -> None:
    marks = [
        "$JS.ACK.meters.c0.1.42.7.1700000000000000000.3",
        "",  # nothing taken yet from this consumer
        "$JS.ACK.meters.c2.1.50.9.1700000000000000000.40",
    ]
    assert pending_after(marks) == 43
    assert pending_after(marks, frozenset({2})) == 3
    assert pending_after(marks, frozenset({0, 2})) == 0


async def test_user_password_and_token_come_from_the_url(tmp_path: Path) -> None:
    async with NatsServer(tmp_path / "a", extra_args=("--user", "km", "--pass", "s3cret")) as s:
        wire = await Wire.connect(f"nats://km:s3cret@127.0.0.1:{s.port}", name="t")
        await wire.flush()
        await wire.close()
        with pytest.raises(WireError, match="Authorization"):
            await Wire.connect(f"nats://km:wrong@127.0.0.1:{s.port}", name="t")
    async with NatsServer(tmp_path / "b", extra_args=("--auth", "t0ken")) as s:
        wire = await Wire.connect(f"nats://t0ken@127.0.0.1:{s.port}", name="t")
        await wire.flush()
        await wire.close()


async def test_a_list_of_servers_is_tried_in_order_and_failures_are_named(
    tmp_path: Path,
) -> None:
    async with NatsServer(tmp_path / "nats") as s:
        dead = "nats://127.0.0.1:1"
        wire = await Wire.connect(f"{dead},{s.url}", name="t")
        await wire.flush()
        await wire.close()
        with pytest.raises(WireError, match="connection closed"):
            wire.publish("x", b"")
    with pytest.raises(WireError, match=r"could not connect: nats://127\.0\.0\.1:1"):
        await Wire.connect("nats://127.0.0.1:1", name="t", timeout=2)


async def test_last_values_reads_many_keys_in_one_request(tmp_path: Path) -> None:
    async with NatsServer(tmp_path / "nats") as s:
        nc = await nats.connect(s.url)
        kv = await nc.jetstream().create_key_value(KeyValueConfig(bucket="b", direct=True))
        revisions = {f"k{i}": await kv.put(f"k{i}", str(i).encode()) for i in range(1000)}
        revisions["k3"] = await kv.put("k3", b"again")
        await kv.delete("k4")
        wire = await Wire.connect(s.url, name="t")
        # the worker asks for at most 1,000 keys at a time (the server answers at most 1,024)
        subjects = [f"$KV.b.k{i}" for i in range(1000)] + ["$KV.b.missing"]
        found = await wire.last_values("KV_b", subjects)
        assert found["$KV.b.k0"] == (b"0", revisions["k0"])
        assert found["$KV.b.k999"] == (b"999", revisions["k999"])
        assert found["$KV.b.k3"] == (b"again", revisions["k3"])
        assert found["$KV.b.k4"][0] is None and found["$KV.b.k4"][1] > revisions["k3"]
        assert "$KV.b.missing" not in found and len(found) == 1000
        # a stream that does not allow direct gets: a clear error, so callers fall back
        await nc.jetstream().create_key_value(KeyValueConfig(bucket="plain"))
        with pytest.raises(WireError, match=r"direct get refused|no responders"):
            await wire.last_values("KV_plain", ["$KV.plain.x"], timeout=3)
        await wire.close()
        await nc.close()


async def _partition_pullers(
    js: JetStreamContext,
    wire: Wire,
    events: tuple[int, int],
    batch: int,
    max_buffer: int | None = None,
) -> list[RawPuller]:
    """Stream ``ev`` with ``events`` numbered events in each of two partitions (``ev.0.x``
    and ``ev.1.y``), a consumer per partition (AckAll) and a puller of each sharing one
    ``ready`` event, as a Runner makes them for ``Pullers``."""
    import asyncio

    await js.add_stream(StreamConfig(name="ev", subjects=["ev.>"]))
    for p, subject in enumerate(("ev.0.x", "ev.1.y")):
        for i in range(events[p]):
            await js.publish(subject, str(i).encode())
    ready = asyncio.Event()
    pullers = []
    for p in (0, 1):
        await js.add_consumer(
            "ev",
            ConsumerConfig(
                name=f"c{p}",
                filter_subject=f"ev.{p}.>",
                ack_policy=AckPolicy.ALL,
                max_ack_pending=10_000,
            ),
        )
        pullers.append(RawPuller(wire, "ev", f"c{p}", batch, ready=ready, max_buffer=max_buffer))
    return pullers


async def test_pullers_share_each_take_among_their_consumers(tmp_path: Path) -> None:
    """A consumer per partition read as one (store.pull.Pullers): a partition with a backlog
    does not hold back another, each consumer's messages come in order, and the marks are
    each consumer's last message taken (acknowledged there, AckAll)."""

    async with NatsServer(tmp_path / "nats") as s:
        nc = await nats.connect(s.url)
        js = nc.jetstream()
        wire = await Wire.connect(s.url, name="t")
        pullers = await _partition_pullers(js, wire, (3000, 5), 500)
        both = Pullers(pullers)
        await both.start()

        async def buffered() -> list[int]:
            return [len(p.buffer) for p in pullers]

        await eventually(buffered, lambda b: b[0] >= 100 and b[1] == 5)
        taken: list[list[int]] = [[], []]
        marks: list[str] = []
        while len(taken[0]) + len(taken[1]) < 3005:
            msgs = await both.take(100, timeout=5)
            assert msgs and len(msgs) <= 100
            for m in msgs:
                taken[int(m.subject.split(".")[1])].append(int(m.data))
            marks = both.marks()
            # the first take has partition 1's five beside 95 of partition 0's backlog
            assert len(taken[1]) == 5 and len(taken[0]) >= 95
        assert taken == [list(range(3000)), list(range(5))]
        assert [ack_fields(r)[0] for r in marks] == [3000, 3005]
        both.acknowledge(marks)
        await wire.drain()
        for name in ("c0", "c1"):
            info = await eventually(
                lambda name=name: js.consumer_info("ev", name), lambda i: i.num_ack_pending == 0
            )
            assert info.ack_floor.stream_seq == (3000 if name == "c0" else 3005)
        await both.stop()
        await wire.close()
        await nc.close()


async def test_pullers_leave_a_waiting_consumer_alone(tmp_path: Path) -> None:
    """While a consumer waits (``Pullers.waiting``, the runner on another partition's
    backlog) nothing is taken from it, though it has messages buffered, and a take with
    nothing else to give times out empty; each consumer's pending counts what it has
    buffered and what the server still holds; once it waits no more it is taken from, in
    order."""

    async with NatsServer(tmp_path / "nats") as s:
        nc = await nats.connect(s.url)
        js = nc.jetstream()
        wire = await Wire.connect(s.url, name="t")
        pullers = await _partition_pullers(js, wire, (300, 50), 100, max_buffer=100)
        both = Pullers(pullers)
        both.waiting = frozenset({0})
        await both.start()

        async def buffered() -> list[int]:
            return [len(p.buffer) for p in pullers]

        await eventually(buffered, lambda b: b[0] >= 100 and b[1] == 50)
        assert both.pending() == [300, 50]  # buffered, and still on the server
        msgs = await both.take(500, timeout=5)
        assert [int(m.data) for m in msgs] == list(range(50))
        assert all(m.subject.startswith("ev.1.") for m in msgs)
        assert await both.take(500, timeout=0.3) == []  # consumer 0 still waits
        assert len(pullers[0].buffer) >= 100
        both.waiting = frozenset()
        got: list[int] = []
        while len(got) < 300:
            msgs = await both.take(500, timeout=5)
            assert msgs
            got.extend(int(m.data) for m in msgs)
        assert got == list(range(300))
        assert both.pending() == [0, 0]
        await both.stop()
        await wire.close()
        await nc.close()


async def test_worker_counts_exactly_on_a_server_that_requires_a_password(
    tmp_path: Path,
) -> None:
    """The worker's two connections (nats-py and the lean one) both log in from NATS_URL."""
    async with NatsServer(tmp_path / "nats", extra_args=("--user", "km", "--pass", "pw")) as s:
        url = f"nats://km:pw@127.0.0.1:{s.port}"
        settings = Settings(nats_url=url, partitions=2)
        nc = await nats.connect(url)
        await provision(nc.jetstream(), settings)
        await create_meters(nc)
        worker = Worker(nc, settings)
        await worker.start()
        try:
            load = Load(500, dup_ratio=0.0, seed=21)
            await load.publish(nc)
            expected = load.expected()
            got = await eventually(
                lambda: actual(nc), lambda r: calls_total(r) >= calls_total(expected)
            )
            assert got == expected
        finally:
            await worker.stop()
            await nc.close()


async def test_tls_from_the_url_or_when_the_server_asks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tls:// connects with TLS; nats:// upgrades when the server requires TLS; the CA comes
    from the system store (here SSL_CERT_FILE), and an untrusted server is refused."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("the openssl tool is not installed")
    d = tmp_path

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", "/CN=test-ca", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"),
    )  # fmt: skip
    run(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"),
    )  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(
        "x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.pem"),
        "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "1",
        "-extfile", str(d / "san.ext"), "-out", str(d / "server.pem"),
    )  # fmt: skip
    tls = ("--tls", "--tlscert", str(d / "server.pem"), "--tlskey", str(d / "server.key"))
    async with NatsServer(d / "nats", extra_args=tls) as s:
        with pytest.raises(WireError, match=r"(?i)certificate verify failed"):
            await Wire.connect(f"tls://127.0.0.1:{s.port}", name="t", timeout=3)
        monkeypatch.setenv("SSL_CERT_FILE", str(d / "ca.pem"))
        for url in (f"tls://127.0.0.1:{s.port}", f"nats://127.0.0.1:{s.port}"):
            wire = await Wire.connect(url, name="t")
            await wire.flush()
            await wire.close()


def test_an_ended_pull_request_says_what_it_had_left() -> None:
    """A 408 status ends a pull request: its Nats-Pending-Messages is what it will no longer
    deliver (the puller asks again for that); without the header, the whole batch."""
    head = b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 640\r\nNats-Pending-Bytes: 0"
    assert _left_undelivered(head + b"\r\n\r\n") == 640
    assert _left_undelivered(b"NATS/1.0 408 Request Timeout\r\n\r\n") >= 1 << 20
