"""A raw pull consumer: batch requests answered into one callback subscription.

nats-py's ``fetch()`` costs a task, a uuid and a ``wait_for`` per message and tops out near
12-15k msgs/s. Publishing to ``$JS.API.CONSUMER.MSG.NEXT`` ourselves on the worker's lean
connection (``store.wire``) and collecting the replies in a plain callback does the same
protocol without a coroutine per message.
"""

import asyncio
import time
from collections import deque

import msgspec

from kloudmeter_py.store.wire import Wire, WireMsg


def ack_fields(reply: str) -> tuple[int, int, int, int]:
    """(stream sequence, times delivered, stored-at ns, pending) from a JetStream ack subject.

    Cheaper than ``Msg.metadata``, which also builds datetimes and objects per message. Both
    forms are read: ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>``
    and the newer one with domain and account hash after ``ACK`` (and a trailing token).
    """
    t = reply.split(".")
    n = len(t)
    if n == 9:
        o = 4
    elif n >= 11:
        o = 6
    else:
        raise ValueError(f"not a JetStream ack subject: {reply!r}")
    return int(t[o + 1]), int(t[o]), int(t[o + 3]), int(t[o + 4])


def pending_after(marks: list[str], skip: frozenset[int] = frozenset()) -> int:
    """Messages the consumers had still to deliver after the ones ``marks`` name, but for
    the consumers at the indexes in ``skip``."""
    return sum(ack_fields(reply)[3] for i, reply in enumerate(marks) if reply and i not in skip)


def _left_undelivered(headers: bytes) -> int:
    """What an ended pull request had still been due to deliver (its status's
    ``Nats-Pending-Messages``); all of a batch when the server does not say."""
    for line in headers.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"nats-pending-messages":
            try:
                return int(value)
            except ValueError:
                break
    return 1 << 30


class ConsumerGone(Exception):
    """The server says the consumer no longer exists (or the request is refused)."""


class RawPuller:
    """Keeps pull requests outstanding and buffers what they deliver, in stream order.

    A new request goes out when half of what was asked for has arrived, so the server always
    has the next batch to send while the last one is being read (a second round trip per
    batch would otherwise stall a worker that is catching up)."""

    def __init__(
        self,
        wire: Wire,
        stream: str,
        consumer: str,
        batch: int,
        expires: float = 1.0,
        max_buffer: int | None = None,
        ready: asyncio.Event | None = None,
    ):
        self.wire = wire
        # No new request while this many messages wait to be taken: a worker slower than
        # the stream holds at most this much of it (on the wide bench shape, without a
        # bound, its buffer grew to the consumer's max_ack_pending, ~500,000 messages).
        self.max_buffer = max_buffer or 1 << 62
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.batch = batch
        self.request = msgspec.json.encode({"batch": batch, "expires": int(expires * 1e9)})
        # The server answers every request within `expires` (messages, or a 408 status);
        # silence for longer means the request or the consumer is gone (a server restart).
        self.silence_limit = 3 * expires + 2
        self.last_heard = time.monotonic()
        self.buffer: deque[WireMsg] = deque()
        self.ready = ready or asyncio.Event()  # shared by the pullers of a Pullers
        self.remaining = 0  # messages the outstanding requests may still deliver
        self.error: Exception | None = None
        self.sid: bytes | None = None
        self.inbox = ""
        # The ack subject of the last message taken: acknowledging it (AckAll) acknowledges
        # everything taken up to it, whatever became of the messages' own reply fields.
        self.last_reply = ""

    async def start(self) -> None:
        self.inbox = self.wire.new_inbox()
        self.sid = self.wire.subscribe(self.inbox, self._on_msg)
        self._request()

    async def stop(self) -> None:
        if self.sid is not None:
            self.wire.unsubscribe(self.sid)
            self.sid = None

    def _request(self) -> None:
        self.remaining += self.batch
        self.last_heard = time.monotonic()
        self.wire.publish(self.subject, self.request, reply=self.inbox)

    def _on_msg(self, msg: WireMsg) -> None:
        self.last_heard = time.monotonic()
        if not msg.data:
            status = msg.status()
            if status is not None:
                code = status[:3]
                if code in ("404", "408"):  # no messages / request expired: ask again
                    self.remaining = max(0, self.remaining - _left_undelivered(msg.headers))
                    self._maybe_request()
                elif code != "100":  # 100 is a heartbeat
                    self.error = ConsumerGone(status)
                    self.ready.set()
                return
        msg.headers = b""  # not needed past this point (a round holds many messages)
        self.buffer.append(msg)
        self.remaining -= 1
        self._maybe_request()
        self.ready.set()

    def _maybe_request(self) -> None:
        """Ask for the next batch once half of the last has arrived, unless enough waits."""
        if self.remaining <= self.batch // 2 and len(self.buffer) < self.max_buffer:
            self._request()

    def marks(self) -> list[str]:
        """The ack subject of the last message taken ("" before the first)."""
        return [self.last_reply]

    def acknowledge(self, marks: list[str]) -> None:
        """Acknowledge, with AckAll, everything taken up to ``marks`` (see ``marks``)."""
        for reply in marks:
            if reply:
                self.wire.publish(reply, b"+ACK")

    def working(self, marks: list[str]) -> None:
        """Tell the server the messages up to ``marks`` are still being worked on."""
        for reply in marks:
            if reply:
                self.wire.publish(reply, b"+WPI")

    @property
    def buffered(self) -> int:
        return len(self.buffer)

    def check(self) -> None:
        """Raise what ended the consumer or the connection, if anything has."""
        if self.error is not None:
            raise self.error
        if self.wire.error is not None:
            raise self.wire.error

    def check_silence(self) -> None:
        """After a wait with nothing delivered: raise if the server went silent."""
        if self.wire.error is not None:
            raise self.wire.error from None
        if time.monotonic() - self.last_heard > self.silence_limit:
            raise ConsumerGone("no answer to the pull request") from None

    def take_now(self, limit: int) -> list[WireMsg]:
        """Up to ``limit`` of the buffered messages, without waiting."""
        out: list[WireMsg] = []
        buffer = self.buffer
        while buffer and len(out) < limit:
            out.append(buffer.popleft())
        if out:
            self.last_reply = out[-1].reply
        self._maybe_request()
        return out

    async def take(self, limit: int, timeout: float) -> list[WireMsg]:
        """Up to ``limit`` buffered messages; waits up to ``timeout`` for the first one."""
        self.check()
        if not self.buffer:
            self.ready.clear()
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # that arrives as the wait ends, and then the consumer would never stop.
            try:
                async with asyncio.timeout(timeout):
                    await self.ready.wait()
            except TimeoutError:
                self.check_silence()
                return []
        self.check()
        return self.take_now(limit)


class Pullers:
    """One runner's consumers, one per partition (filtered on its subjects), read as one.

    A worker that reads some of the partitions but not all reads each through a consumer of
    its own rather than one unfiltered consumer whose other partitions it skips: nats-server
    then delivers each event once, to its owner, instead of to every worker. Messages come
    in stream order within a partition; across partitions they interleave, which is all
    exactness needs (every key belongs to one partition, and each partition has its own
    checkpoint). A take shares its limit among the consumers with something buffered, so
    that a partition with a backlog cannot hold back another.

    The consumers in ``waiting`` (indexes) are not taken from: the runner sets it while it
    works through one partition's backlog at a time (``core.rounds.focus``). What they
    have buffered stays there, unacknowledged, until they are taken from again.
    """

    def __init__(self, pullers: list[RawPuller]) -> None:
        self.pullers = pullers
        self.waiting: frozenset[int] = frozenset()
        self.ready = pullers[0].ready
        for puller in pullers:
            assert puller.ready is self.ready

    async def start(self) -> None:
        for puller in self.pullers:
            await puller.start()

    async def stop(self) -> None:
        for puller in self.pullers:
            await puller.stop()

    @property
    def buffered(self) -> int:
        return sum(len(p.buffer) for p in self.pullers)

    @property
    def max_buffer(self) -> int:
        return sum(p.max_buffer for p in self.pullers)

    @max_buffer.setter
    def max_buffer(self, value: int) -> None:
        each = max(1, -(-value // len(self.pullers)))
        for puller in self.pullers:
            puller.max_buffer = max(each, puller.batch)

    def marks(self) -> list[str]:
        """The ack subject of the last message taken from each consumer (none yet: "")."""
        return [p.last_reply for p in self.pullers]

    def pending(self) -> list[int]:
        """Per consumer, what is left to take: its buffered messages and what the server had
        still to deliver after the newest of them (or the last taken)."""
        out = []
        for p in self.pullers:
            reply = p.buffer[-1].reply if p.buffer else p.last_reply
            out.append(len(p.buffer) + (ack_fields(reply)[3] if reply else 0))
        return out

    def acknowledge(self, marks: list[str]) -> None:
        self.pullers[0].acknowledge(marks)

    def working(self, marks: list[str]) -> None:
        self.pullers[0].working(marks)

    async def take(self, limit: int, timeout: float) -> list[WireMsg]:
        """Up to ``limit`` buffered messages of all the consumers; waits up to ``timeout``
        for the first one."""
        pullers = self.pullers
        for puller in pullers:
            puller.check()
        if self.waiting:
            pullers = [p for i, p in enumerate(pullers) if i not in self.waiting]
        if not any(p.buffer for p in pullers):
            try:
                async with asyncio.timeout(timeout):
                    # A waiting consumer's delivery also sets ``ready``: wait again then.
                    while not any(p.buffer for p in pullers):
                        self.ready.clear()
                        await self.ready.wait()
                        for puller in self.pullers:
                            puller.check()
            except TimeoutError:
                # Not a waiting one: with its buffer full it asks for nothing, so is not heard.
                for puller in pullers:
                    puller.check_silence()
                return []
        out: list[WireMsg] = []
        having = [p for p in pullers if p.buffer]
        share = -(-limit // max(1, len(having)))
        for puller in having:
            out.extend(puller.take_now(min(share, limit - len(out))))
        for puller in having:  # what a share left unused
            if len(out) >= limit:
                break
            out.extend(puller.take_now(limit - len(out)))
        return out
