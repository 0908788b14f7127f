"""Delivery of notification events to webhooks, at least once, from the gateway.

A loop in each gateway process reads the open deliveries (store.alerts, bucket
``deliveries``) every ``tick`` seconds. For each one that is due:

1. if it is recorded as done already (a crash between recording and closing it): close it;
2. claim it with a compare-and-set that moves its next attempt ``lease`` seconds on (another
   gateway then leaves it alone; a gateway that dies while sending lets it fall due again);
3. POST the event's payload, signed (core.alerts.signature), with the channel's headers;
4. a 2xx answer records it done; anything else (or no answer) records the attempt and the
   next one after a backoff (core.alerts.retry_in: 1 s, 2 s, 4 s ... 1 h).

All of its state is in KV, so a gateway that restarts carries on where the last one
stopped; a delivery that was being sent when it stopped is sent again (at least once; the
receiver drops a repeat by its event id).
"""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiohttp
import structlog
from aiohttp import web
from nats.js.errors import BucketNotFoundError

from kloudmeter_py.core.alerts import retry_in, signature
from kloudmeter_py.core.models import encoder
from kloudmeter_py.errors import NotFound
from kloudmeter_py.store.alerts import AlertStore, Attempt, AttemptResponse, Delivery

log = structlog.get_logger(__name__)

USER_AGENT = "kloudmeter-webhooks"
# Header names: the Standard Webhooks ones, and the same values under svix-* names.
ID_HEADERS = ("webhook-id", "svix-id")
TIMESTAMP_HEADERS = ("webhook-timestamp", "svix-timestamp")
SIGNATURE_HEADERS = ("webhook-signature", "svix-signature")


class Deliverer:
    """The delivery loop of one gateway process."""

    def __init__(
        self,
        store: AlertStore,
        *,
        tick: float = 0.5,
        lease: float = 30.0,
        timeout: float = 10.0,
        first_retry: float = 1.0,
        most_retry: float = 3600.0,
    ) -> None:
        self.store = store
        self.tick = tick
        self.lease = lease
        self.timeout = timeout
        self.first_retry = first_retry
        self.most_retry = most_retry
        self.sent = 0  # answered 2xx (tests, logs)
        self.failed = 0  # attempts that did not
        # The open deliveries are read again only when the bucket changed or one falls due.
        self._seen = -1
        self._next_due: datetime | None = None

    async def run(self) -> None:
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            headers={"User-Agent": USER_AGENT},
        ) as session:
            while True:
                try:
                    await self.round(session)
                except asyncio.CancelledError:
                    raise
                except BucketNotFoundError:
                    pass  # not set up yet
                except Exception as exc:
                    log.warning("alerts.delivery_round_failed", error=repr(exc))
                await asyncio.sleep(self.tick)

    async def round(self, session: aiohttp.ClientSession) -> None:
        """Send every open delivery that is due."""
        seq = await self.store.deliveries_seq()
        now = datetime.now(UTC)
        if seq == self._seen and (self._next_due is None or now < self._next_due):
            return
        self._seen = seq
        self._next_due = None
        for d, rev in await self.store.due():
            if d.nextAttempt is None or d.nextAttempt <= now:
                await self.deliver(session, d, rev)
            elif self._next_due is None or d.nextAttempt < self._next_due:
                self._next_due = d.nextAttempt

    async def deliver(self, session: aiohttp.ClientSession, d: Delivery, rev: int) -> None:
        store = self.store
        if await store.is_done(d):
            await store.drop_open(d)
            return
        try:
            channel, _ = await store.channel(d.channel)
            event = await store.event(d.event)
        except NotFound as exc:
            d.state, d.reason = "FAILED", exc.message
            d.updatedAt = datetime.now(UTC)
            await store.finish(d, rev)
            return
        if channel.disabled:
            d.state, d.reason = "FAILED", "channel disabled"
            d.updatedAt = datetime.now(UTC)
            await store.finish(d, rev)
            return
        sending = datetime.now(UTC)
        d.state, d.updatedAt = "SENDING", sending
        d.nextAttempt = sending + timedelta(seconds=self.lease)
        claimed = await store.update_open(d, rev)
        if claimed is None:
            return  # another gateway has it
        body = encoder.encode(event.payload)
        stamp = int(time.time())
        sig = signature(channel.signingSecret, event.id, stamp, body)
        headers = dict(channel.customHeaders)
        headers["Content-Type"] = "application/json"
        for names, value in (
            (ID_HEADERS, event.id),
            (TIMESTAMP_HEADERS, str(stamp)),
            (SIGNATURE_HEADERS, sig),
        ):
            for name in names:
                headers[name] = value
        started = time.monotonic()
        status: int | None = None
        text = ""
        try:
            async with session.post(channel.url, data=body, headers=headers) as response:
                status = response.status
                text = (await response.text(errors="replace"))[:1000]
        except (aiohttp.ClientError, TimeoutError) as exc:
            text = f"{type(exc).__name__}: {exc}"[:1000]
        took = int((time.monotonic() - started) * 1000)
        ok = status is not None and 200 <= status < 300
        at = datetime.now(UTC)
        d.attempts.append(
            Attempt(
                state="SUCCESS" if ok else "FAILED",
                response=AttemptResponse(statusCode=status, body=text, durationMs=took),
                timestamp=at,
            )
        )
        d.updatedAt = at
        if ok:
            d.state, d.reason, d.nextAttempt = "SUCCESS", "", None
            await store.finish(d, claimed)
            self.sent += 1
            log.info("alert.delivered", notification=d.event, channel=d.channel, status=status)
            return
        self.failed += 1
        failures = sum(1 for a in d.attempts if a.state == "FAILED")
        d.state = "PENDING"
        d.reason = f"answered {status}" if status is not None else text
        wait = retry_in(failures, self.first_retry, self.most_retry)
        d.nextAttempt = at + timedelta(seconds=wait)
        await store.update_open(d, claimed)
        log.info(
            "alert.delivery_failed",
            notification=d.event,
            channel=d.channel,
            status=status,
            tries=failures,
        )


DELIVERER = web.AppKey("deliverer", Deliverer)


async def delivery_ctx(app: web.Application) -> AsyncIterator[None]:
    """aiohttp cleanup context: the delivery loop runs while the gateway does."""
    task = asyncio.create_task(app[DELIVERER].run(), name="alert-deliveries")
    yield
    # Cancel until it is done: a cancellation can be lost in a library's wait (nats-py).
    for _ in range(50):
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=0.2)
        if done:
            break
    else:
        log.error("alerts.delivery_stop_timeout")
        return
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()
