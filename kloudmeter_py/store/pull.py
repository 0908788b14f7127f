"""A raw pull consumer: batch requests answered into one callback subscription.

nats-py's ``fetch()`` costs a task, a uuid and a ``wait_for`` per message and tops out near
12-15k msgs/s; publishing to ``$JS.API.CONSUMER.MSG.NEXT`` ourselves and collecting the replies
in a callback does the same protocol at about twice that.
"""

import asyncio
import time
from collections import deque

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription


class ConsumerGone(Exception):
    """The server says the consumer no longer exists (or the request is refused)."""


class RawPuller:
    """Keeps one pull request outstanding and buffers what it delivers, in stream order."""

    def __init__(self, nc: Client, stream: str, consumer: str, batch: int, expires: float = 1.0):
        self.nc = nc
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.batch = batch
        self.request = msgspec.json.encode({"batch": batch, "expires": int(expires * 1e9)})
        # The server answers every request within `expires` (messages, or a 408 status);
        # silence for longer means the request or the consumer is gone (a server restart).
        self.silence_limit = 3 * expires + 2
        self.last_heard = time.monotonic()
        self.buffer: deque[Msg] = deque()
        self.ready = asyncio.Event()
        self.remaining = 0  # messages the outstanding request may still deliver
        self.error: Exception | None = None
        self.sub: Subscription | None = None
        self.inbox = ""

    async def start(self) -> None:
        self.inbox = self.nc.new_inbox()
        self.sub = await self.nc.subscribe(self.inbox, cb=self._on_msg, pending_msgs_limit=-1)
        await self._request()

    async def stop(self) -> None:
        if self.sub is not None:
            await self.sub.unsubscribe()
            self.sub = None

    async def _request(self) -> None:
        self.remaining = self.batch
        self.last_heard = time.monotonic()
        await self.nc.publish(self.subject, self.request, reply=self.inbox)

    async def _on_msg(self, msg: Msg) -> None:
        self.last_heard = time.monotonic()
        headers = msg.headers
        if headers and "Status" in headers and not msg.data:
            status = headers.get("Status", "")
            if status in ("404", "408"):  # no messages / request expired: ask again
                await self._request()
            elif status == "100":  # heartbeat
                pass
            else:
                self.error = ConsumerGone(f"{status} {headers.get('Description', '')}".strip())
                self.ready.set()
            return
        self.buffer.append(msg)
        self.remaining -= 1
        if self.remaining <= 0:
            await self._request()
        self.ready.set()

    async def take(self, limit: int, timeout: float) -> list[Msg]:
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
                if time.monotonic() - self.last_heard > self.silence_limit:
                    raise ConsumerGone("no answer to the pull request") from None
                return []
            if self.error is not None:
                raise self.error
        out: list[Msg] = []
        buffer = self.buffer
        while buffer and len(out) < limit:
            out.append(buffer.popleft())
        return out
