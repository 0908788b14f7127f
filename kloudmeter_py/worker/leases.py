"""Which partitions a worker reads: leases in the ``leases`` bucket.

Keys ``partition.<n>`` name the worker that owns a partition, ``worker.<id>`` are heartbeats;
the bucket's TTL (METER_LEASE_TTL) makes a dead worker's keys expire. Every third of the TTL a
worker runs one lease round:

1. heartbeat: put ``worker.<id>``;
2. renew each owned lease with a compare-and-set on its revision (a lease that fails was
   lost: another worker owns the partition now);
3. give back what is over its share (partitions / live workers, rounded up);
4. stop reading what was lost or given back (``on_change``: one consumer restart for all)
   before deleting the given-back leases, so two workers never both believe they own it;
5. create leases for free partitions up to the share, starting at a place of its own
   (a hash of its id) so that workers starting together do not all race for partition 0;
6. read what it now owns (``on_change`` again).

Correctness does not depend on the leases (every write is conditional and checkpoints only
move forward from what was stored); they only spread the work.
"""

import contextlib
import zlib
from collections.abc import Awaitable, Callable

import structlog
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from kloudmeter_py.store.kv import scan

log = structlog.get_logger(__name__)


class Leases:
    """The partitions one worker holds, renewed, shared out and given back."""

    def __init__(
        self,
        js: JetStreamContext,
        kv: KeyValue,
        bucket: str,
        worker_id: str,
        partitions: int,
        on_change: Callable[[set[int]], Awaitable[None]],
    ) -> None:
        self.js = js
        self.kv = kv
        self.bucket = bucket
        self.worker_id = worker_id
        self.partitions = partitions
        self.on_change = on_change
        self.held: dict[int, int] = {}  # partition -> lease revision

    async def round(self) -> None:
        """One lease round (steps 1-6 of the module docstring)."""
        kv = self.kv
        me = self.worker_id.encode()
        await kv.put(f"worker.{self.worker_id}", me)
        live = len(await scan(self.js, self.bucket, "worker.*")) or 1
        total = self.partitions
        share = -(-total // live)
        for p, revision in sorted(self.held.items()):
            try:
                self.held[p] = await kv.update(f"partition.{p}", me, last=revision)
            except KeyWrongLastSequenceError:
                log.warning("lease.lost", worker=self.worker_id, partition=p)
                del self.held[p]
        extra = sorted(self.held)[share:]
        released = {p: self.held.pop(p) for p in extra}
        await self.on_change(set(self.held))
        for p, revision in released.items():
            with contextlib.suppress(Exception):
                await kv.delete(f"partition.{p}", last=revision)
            log.info("lease.released", worker=self.worker_id, partition=p)
        offset = zlib.crc32(self.worker_id.encode()) % total
        for i in range(total):
            if len(self.held) >= share:
                break
            p = (offset + i) % total
            if p in self.held:
                continue
            try:
                self.held[p] = await kv.create(f"partition.{p}", me)
            except KeyWrongLastSequenceError:
                continue
            log.info("lease.acquired", worker=self.worker_id, partition=p)
        await self.on_change(set(self.held))

    async def give_back(self) -> None:
        """Delete every held lease and the heartbeat, so that another worker need not wait
        for them to expire (best effort: they expire anyway)."""
        import asyncio

        for p, revision in self.held.items():
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self.kv.delete(f"partition.{p}", last=revision)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await self.kv.delete(f"worker.{self.worker_id}")
        self.held.clear()
