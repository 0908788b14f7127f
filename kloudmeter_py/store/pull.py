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
        self.ready = asyncio.Event()
        self.remaining = 0  # messages the outstanding requests may still deliver
        self.error: Exception | None = None
        self.sid: bytes | None = None
        self.inbox = ""

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

    def ack(self, msg: WireMsg) -> None:
        """Acknowledge ``msg`` and, with AckAll, everything delivered before it."""
        self.wire.publish(msg.reply, b"+ACK")

    def in_progress(self, msg: WireMsg) -> None:
        self.wire.publish(msg.reply, b"+WPI")

    async def take(self, limit: int, timeout: float) -> list[WireMsg]:
        """Up to ``limit`` buffered messages; waits up to ``timeout`` for the first one."""
        if self.error is not None:
            raise self.error
        if not self.buffer:
            self.ready.clear()
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # that arrives as the wait ends, and then the consumer would never stop.
            try:
                async with asyncio.timeout(timeout):
                    await self.ready.wait()
            except TimeoutError:
                if self.wire.error is not None:
                    raise self.wire.error from None
                if time.monotonic() - self.last_heard > self.silence_limit:
                    raise ConsumerGone("no answer to the pull request") from None
                return []
            if self.error is not None:
                raise self.error
        if self.wire.error is not None:
            raise self.wire.error
        out: list[WireMsg] = []
        buffer = self.buffer
        while buffer and len(out) < limit:
            out.append(buffer.popleft())
        self._maybe_request()
        return out
