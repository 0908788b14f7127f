"""How the worker stores a chunk of keys (KeyStore.store_chunk), on a real nats-server: each
key's body is made only as its turn to be sent comes, batches end at CHUNK keys or the
batch's byte limit, and a batch refused for a stale revision fails its own keys only."""

from typing import Any

import pytest
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from kloudmeter_py.worker import Worker, keystore
from kloudmeter_py.worker.runner import Runner


async def test_a_chunks_bodies_are_made_as_they_are_sent(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``write(n)`` is called once per key, in order, one key ahead of its send (to know
    whether the key before it commits its batch): never a whole chunk's bodies at once."""
    assert worker.atomic
    store = Runner(worker, [0]).keys
    wire = await worker.wire()
    sent: list[str] = []
    hpublish = wire.hpublish

    def counting(subject: str, headers: bytes, payload: Any, reply: str = "") -> None:
        sent.append(subject)
        hpublish(subject, headers, payload, reply)

    monkeypatch.setattr(wire, "hpublish", counting)
    keys = [f"lazy.s{n}" for n in range(300)]
    made_after: list[int] = []  # sends before each write was made

    def write(n: int) -> keystore.Write:
        made_after.append(len(sent))
        return b'{"n": %d}' % n, 0

    results = await store.store_chunk(0, keys, write)
    assert made_after == [0, *range(299)]
    assert len(sent) == 300
    readings = worker.stores[0]
    for n in (0, 150, 299):
        entry = await readings.get(keys[n])
        assert (entry.value, entry.revision) == (b'{"n": %d}' % n, results[n])


async def test_batches_end_at_their_byte_limit_and_a_stale_one_fails_alone(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bodies of 300 bytes with a limit of 1,000 a batch: batches of 3. The fifth key names a
    revision the key is not at: its batch (keys 3-5) is refused and nothing of it stored;
    the batches before and after it are stored."""
    monkeypatch.setattr(keystore, "_BATCH_BYTES", 1000)
    store = Runner(worker, [0]).keys
    keys = [f"split.s{n}" for n in range(9)]
    results = await store.store_chunk(0, keys, lambda n: (b"x" * 300, 99 if n == 4 else 0))
    refused = [n for n, r in enumerate(results) if isinstance(r, KeyWrongLastSequenceError)]
    assert refused == [3, 4, 5]
    readings = worker.stores[0]
    for n, key in enumerate(keys):
        if n in refused:
            with pytest.raises(KeyNotFoundError):
                await readings.get(key)
            continue
        entry = await readings.get(key)
        assert entry.revision == results[n]
