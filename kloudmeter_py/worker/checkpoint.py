"""Where a runner stands in its partitions: the checkpoint, and what to skip or replay.

A checkpoint is, per partition, the stream sequence up to which every event is applied and
acknowledged (key ``partition.<n>`` in the offsets bucket). A runner's life with it:

1. ``begin``: read the partitions' checkpoints. A replay asked for (a new meter that should
   have seen events already applied) lowers them to its start first, so that a crash during
   the replay resumes it. One consumer for all the partitions starts after the lowest one, a
   consumer per partition after its own.
2. ``covered``: a message at or below its own partition's checkpoint was applied before (the
   consumer started lower for another partition): skip it.
3. ``replaying``: a message read before this replay (at or below its partition's horizon)
   is folded again only for the meters the replay is for; other meters skip it by lastSeq
   and must not dead-letter it twice.
4. ``advance``, then ``commit``: after a round's keys and dead letters are stored and its
   summaries flushed, every partition's checkpoint moves to the round's last sequence (one
   consumer for all the partitions), or each to the last sequence its own consumer delivered
   (a consumer per partition), never below where the partition started (``floor``: a
   partition ahead of the others is not moved back while they catch up). Only then is the
   round acknowledged.
"""

import asyncio
from datetime import UTC, datetime
from typing import Any

import msgspec
from nats.js.kv import KeyValue

from kloudmeter_py.core.models import encoder
from kloudmeter_py.store.kv import get_with_revision

_offset_decoder = msgspec.json.Decoder(dict[str, Any])


def partition_of(stored_subject: str) -> int:
    """The partition in a stored subject, ``<stream>.events.<partition>.<type>.<subject>``."""
    return int(stored_subject.split(".", 3)[2])


class Checkpoint:
    """The checkpoint of the partitions one runner reads, and its skip and replay rules."""

    def __init__(self, offsets: KeyValue, partitions: list[int], worker_id: str) -> None:
        self.offsets = offsets
        self.partitions = partitions
        self.worker_id = worker_id
        # Per partition, the last stream seq whose readings and dead letters are stored: the
        # same for all with one consumer (it reads its partitions in one stream order), each
        # partition's own with a consumer per partition (worker.runner.Runner.merged).
        self.positions: dict[int, int] = {}
        self.folded = 0  # highest stream seq folded (into the round in progress or before)
        self.started = False  # checkpoints read: positions and floors are known
        # Per partition, the checkpoint read at the start: its messages at or below it are
        # already applied and are skipped (the consumer starts at the lowest checkpoint).
        self.skip: dict[int, int] = {}
        self.skip_below = 0
        # Per partition, the checkpoint it started from: never written lower.
        self.floor: dict[int, int] = {}
        # A replay asked for (from this stream seq, for these meters).
        self.restart_from: int | None = None
        self.replay_meters: set[str] = set()
        # While replaying seqs at or below its partition's horizon (what was read before),
        # only meters that caused the replay get dead letters; replay_horizon is the highest.
        self.horizons: dict[int, int] = {}
        self.replay_horizon = 0

    def ask_replay(self, start: int | None, meters: set[str]) -> None:
        """Replay from ``start`` for ``meters`` (asked of this runner or of the one before)."""
        if start is None:
            return
        if self.restart_from is None or start < self.restart_from:
            self.restart_from = start
        self.replay_meters |= meters

    def needs_replay(self, meter_start_seq: int) -> bool:
        """Whether a meter starting after ``meter_start_seq`` missed events already applied
        (before the checkpoints are read that is not known: assume so)."""
        applied = max(self.folded, self.skip_below)  # folded: at or past every position
        return not self.started or meter_start_seq < applied

    async def read(self) -> dict[int, int]:
        async def one(p: int) -> int:
            value, _ = await get_with_revision(self.offsets, f"partition.{p}")
            return 0 if value is None else int(_offset_decoder.decode(value).get("seq", 0))

        seqs = await asyncio.gather(*(one(p) for p in self.partitions))
        return dict(zip(self.partitions, seqs, strict=True))

    async def write(self, seqs: dict[int, int]) -> None:
        now = datetime.now(UTC)
        await asyncio.gather(
            *(
                self.offsets.put(
                    f"partition.{p}",
                    encoder.encode({"seq": seq, "worker": self.worker_id, "at": now}),
                )
                for p, seq in seqs.items()
            )
        )

    async def begin(self) -> int:
        """Steps 1: read (and, for a replay, lower) the checkpoints; the sequence to start
        the consumer after."""
        checkpoints = await self.read()
        if self.restart_from is not None and self.restart_from <= max(checkpoints.values()):
            for p, c in checkpoints.items():
                # Read before, up to here: the partition's position, or its checkpoint.
                self.horizons[p] = max(self.horizons.get(p, 0), self.positions.get(p, 0), c)
            self.replay_horizon = max(self.horizons.values())
            checkpoints = {p: min(c, self.restart_from - 1) for p, c in checkpoints.items()}
            # Lower the checkpoints first, so a crash during the replay resumes it.
            await self.write(checkpoints)
        elif not self.replay_horizon:
            self.replay_meters.clear()  # nothing to replay after all
        self.restart_from = None
        lowest = min(checkpoints.values())
        self.floor = checkpoints
        self.skip = {p: c for p, c in checkpoints.items() if c > lowest}
        self.skip_below = max(checkpoints.values())
        self.folded = lowest
        self.positions = dict(checkpoints)
        self.started = True
        return lowest

    def advance(self, last: int, lasts: dict[int, int] | None = None) -> None:
        """A round is stored: every partition up to ``last`` (one consumer), or each up to
        its own in ``lasts`` (a consumer per partition; the others where they were)."""
        if lasts is None:
            for p in self.partitions:
                self.positions[p] = last
        else:
            self.positions.update(lasts)

    def covered(self, subject: str, seq: int) -> bool:
        """Step 2: applied before (its partition's checkpoint covers it)."""
        skip = self.skip
        if not skip:
            return False
        if seq > self.skip_below:
            skip.clear()
            return False
        return seq <= skip.get(partition_of(subject), 0)

    def replaying(self, subject: str, seq: int) -> bool:
        """Step 3: read before this replay, and now only replayed (see ``horizons``)."""
        if seq > self.replay_horizon:
            return False
        return seq <= self.horizons.get(partition_of(subject), 0)

    def replay_done(self) -> bool:
        # (not while a replay for another meter is asked for: its meter must stay listed)
        return (
            bool(self.replay_horizon)
            and all(self.positions.get(p, 0) >= h for p, h in self.horizons.items())
            and self.restart_from is None
        )

    def end_replay(self) -> None:
        self.replay_horizon = 0
        self.horizons.clear()
        self.replay_meters.clear()

    async def commit(self) -> None:
        """Step 4: every partition read is applied up to its position (or its floor)."""
        floor, positions = self.floor, self.positions
        await self.write({p: max(positions.get(p, 0), floor.get(p, 0)) for p in self.partitions})
