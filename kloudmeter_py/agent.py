"""``kloudmeter agent``: sample this host's CPU and memory and post them to a perf receiver.

The liz monitor, on asyncio: every ``interval`` seconds a sample ``{"cpu": %, "mem": %}`` is
taken and posted to ``<url>/<host>/<epoch seconds>`` (``POST /api/perf/{host}/{epoch}`` of the
gateway, or a liz receiver). Sampling never waits for the network: samples go into a bounded
buffer that a sender drains oldest first. While the receiver is down the sender retries with
exponential backoff on the oldest sample, and behind it the buffer keeps the newest
``buffer_size`` samples (older ones are dropped, and the log says so); when the receiver is back
the buffered samples are sent, oldest first. Each sample carries an ``Idempotency-Key``, so a
retried post is counted once.
"""

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, urlparse

import aiohttp
import psutil  # type: ignore[import-untyped]
import structlog

from kloudmeter_py.errors import ConfigError

Values = Mapping[str, float]
# Returns (epoch seconds, {"cpu": ..., "mem": ...}), like the liz monitor's gather_stats().
Sampler = Callable[[], tuple[int, Values]]


def gather_stats() -> tuple[int, dict[str, float]]:
    """CPU use since the previous call and memory use, in percent (psutil)."""
    cpu = float(psutil.cpu_percent(interval=None))
    mem = float(psutil.virtual_memory().percent)
    return int(time.time()), {"cpu": cpu, "mem": mem}


@dataclass
class Sample:
    epoch: int
    values: Values
    # Sent as Idempotency-Key: the receiver drops a second copy of the same sample.
    key: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class AgentStats:
    sampled: int = 0
    published: int = 0
    # Pushed out of the full buffer while the receiver was unreachable.
    dropped: int = 0
    # Refused by the receiver (4xx): retrying would not help.
    rejected: int = 0
    # Still buffered when the agent stopped.
    unsent: int = 0


# Statuses worth retrying; any other 4xx means the sample itself is refused.
_RETRY_STATUSES = {408, 425, 429}


def sample_url(url: str, host: str, epoch: int) -> str:
    return f"{url.rstrip('/')}/{quote(host, safe='')}/{epoch}"


def check_agent_args(host: str, url: str, interval: float, buffer_size: int) -> None:
    if not host:
        raise ConfigError("--this-host: a name for this host is required")
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(
            f"--publish: {url!r} is not an http(s) URL (e.g. http://127.0.0.1:8080/api/perf)"
        )
    if not 0 < interval <= 86400:
        raise ConfigError(f"--interval: {interval} must be more than 0 seconds")
    if buffer_size < 1:
        raise ConfigError(f"--buffer: {buffer_size} must be at least 1 sample")


class _Agent:
    def __init__(
        self,
        host: str,
        url: str,
        interval: float,
        session: aiohttp.ClientSession,
        sampler: Sampler,
        buffer_size: int,
        backoff: tuple[float, float],
    ) -> None:
        self.host = host
        self.url = url
        self.interval = interval
        self.session = session
        self.sampler = sampler
        self.buffer: deque[Sample] = deque()
        self.buffer_size = buffer_size
        self.backoff_min, self.backoff_max = backoff
        self.stats = AgentStats()
        # The sample being posted (or retried); the buffer holds the ones after it.
        self.holding: Sample | None = None
        self.wake = asyncio.Event()
        self.failing = False
        self.log = structlog.get_logger("kloudmeter.agent").bind(host=host)

    async def sample_loop(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            try:
                epoch, values = self.sampler()
            except Exception as exc:
                self.log.error(f"Sampling failed: {exc!r}")
            else:
                self.add(Sample(epoch, dict(values)))
            deadline += self.interval
            now = loop.time()
            if deadline < now:  # fell behind (a suspended host): skip the missed ticks
                deadline = now + self.interval
            await asyncio.sleep(deadline - now)

    def add(self, sample: Sample) -> None:
        self.stats.sampled += 1
        if len(self.buffer) >= self.buffer_size:
            old = self.buffer.popleft()
            self.stats.dropped += 1
            if self.stats.dropped == 1 or self.stats.dropped % 100 == 0:
                self.log.warning(
                    f"Buffer full ({self.buffer_size} samples): dropped the oldest waiting sample "
                    f"(epoch {old.epoch}); {self.stats.dropped} dropped so far",
                    dropped=self.stats.dropped,
                )
        self.buffer.append(sample)
        self.wake.set()

    async def send_loop(self) -> None:
        while True:
            if not self.buffer:
                self.wake.clear()
                await self.wake.wait()
                continue
            self.holding = self.buffer.popleft()
            await self.deliver(self.holding)
            self.holding = None

    async def deliver(self, sample: Sample) -> None:
        """Post one sample until it is accepted or refused, backing off between tries."""
        target = sample_url(self.url, self.host, sample.epoch)
        delay = self.backoff_min
        while True:
            error = await self.post(target, sample)
            if error is None:
                self.stats.published += 1
                if self.failing:
                    self.failing = False
                    self.log.info(
                        f"Receiver is back: sending {len(self.buffer)} buffered samples",
                        buffered=len(self.buffer),
                    )
                self.log.info(f"Publish was successful to {target}", epoch=sample.epoch)
                return
            retry, reason = error
            if not retry:
                self.stats.rejected += 1
                self.log.error(f"Publish failed to {target}, dropping the sample: {reason}")
                return
            self.failing = True
            self.log.warning(
                f"Publish failed to {target}: {reason}; retrying in {delay:.1f}s "
                f"({len(self.buffer)} more samples buffered, at most {self.buffer_size})",
                buffered=len(self.buffer),
                retry_in=delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)

    async def post(self, target: str, sample: Sample) -> tuple[bool, str] | None:
        """None on success, else (worth retrying, why)."""
        try:
            async with self.session.post(
                target, json=dict(sample.values), headers={"Idempotency-Key": sample.key}
            ) as resp:
                if resp.status < 300:
                    await resp.read()
                    return None
                text = (await resp.text(errors="replace"))[:200]
                retry = resp.status >= 500 or resp.status in _RETRY_STATUSES
                return retry, f"HTTP {resp.status} {text}".strip()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return True, str(exc) or type(exc).__name__


async def run_agent(
    host: str,
    url: str,
    interval: float,
    stop_event: asyncio.Event,
    *,
    sampler: Sampler | None = None,
    buffer_size: int = 600,
    timeout: float = 10.0,
    backoff: tuple[float, float] = (0.5, 30.0),
    session: aiohttp.ClientSession | None = None,
) -> AgentStats:
    """Sample every ``interval`` seconds and post to ``url``, until ``stop_event`` is set.

    ``url`` is the receiver's base (``http://127.0.0.1:8080/api/perf``); each sample goes to
    ``<url>/<host>/<epoch>``. ``sampler`` replaces psutil (tests); ``backoff`` is the first
    and the longest wait between retries, in seconds. Buffered samples that were not sent by
    the time ``stop_event`` is set are counted in the returned stats' ``unsent``.
    """
    check_agent_args(host, url, interval, buffer_size)
    if sampler is None:
        psutil.cpu_percent(interval=None)  # the first reading has nothing to compare with
        sampler = gather_stats
    async with contextlib.AsyncExitStack() as stack:
        if session is None:
            session = await stack.enter_async_context(
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))
            )
        agent = _Agent(host, url, interval, session, sampler, buffer_size, backoff)
        agent.log.info(f"Publishing to {url} every {interval}s", url=url, interval=interval)
        tasks = [
            asyncio.create_task(agent.sample_loop()),
            asyncio.create_task(agent.send_loop()),
        ]
        stop = asyncio.create_task(stop_event.wait())
        try:
            done, _ = await asyncio.wait([*tasks, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in [*tasks, stop]:
                task.cancel()
            await asyncio.gather(*tasks, stop, return_exceptions=True)
        for task in tasks:
            if task in done and not task.cancelled() and (exc := task.exception()) is not None:
                raise exc
        agent.stats.unsent = len(agent.buffer) + (agent.holding is not None)
        s = agent.stats
        agent.log.info(
            f"Stopped: {s.published} samples published, {s.unsent} unsent, "
            f"{s.dropped} dropped, {s.rejected} rejected",
            published=s.published,
            unsent=s.unsent,
            dropped=s.dropped,
            rejected=s.rejected,
        )
        return s
