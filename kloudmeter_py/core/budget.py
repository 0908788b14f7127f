"""A read's budget: a turn for the rest of the process every ~50 ms of work, and a deadline.

A read that decodes or merges many items runs on the event loop it shares with everything else
(in ``kloudmeter up``, the worker and its lease renewals too). Its loops call
``await budget.tick()`` once per item:

1. cheap while the current slice of work lasts (a clock read and a comparison);
2. once a slice is used up, :meth:`ReadBudget.tick` gives the event loop a turn and starts
   the next slice. The turn is the injected ``pause``: the shell passes ``asyncio.sleep``, so
   the loop serves everyone's I/O for :data:`REST` seconds (one bare ``asyncio.sleep(0)``
   would let another task make one step only, and a lease round is a dozen round trips);
3. once the deadline has passed, or the read was stopped (:meth:`ReadBudget.stop`, at
   shutdown), it raises instead: :class:`~kloudmeter_py.errors.ReadTimeout`, or
   :class:`~kloudmeter_py.errors.Unavailable` with the reason given to ``stop``.

Pure: the clock and the pause are injected (tests pass fake ones; the default pause is the
bare ``yield`` that ``asyncio.sleep(0)`` is made of), so this module imports no asyncio.
"""

import math
import time
import types
from collections.abc import Awaitable, Callable, Generator

from kloudmeter_py.errors import ReadTimeout, Unavailable

# Longest stretch of work between two turns of the event loop, in seconds.
SLICE = 0.05
# How long a turn lasts when the shell passes a real sleep (asyncio.sleep): long enough for
# the other tasks' round trips to NATS (a worker's lease round is a dozen of them), short
# enough that a read loses at most REST / (SLICE + REST) of its speed (~4%).
REST = 0.002


@types.coroutine
def _turn(seconds: float = 0) -> Generator[None, None, None]:
    """Let the event loop run everything else that is ready once (as ``asyncio.sleep(0)``,
    whatever ``seconds``): the default pause, for use without a shell's sleep."""
    yield


class ReadBudget:
    """How long one read may work before it yields, and in all (``timeout``; None: no limit).

    ``what`` names the read in the error (``GET /api/meters/m/query``)."""

    def __init__(
        self,
        timeout: float | None,
        *,
        what: str = "the read",
        clock: Callable[[], float] = time.monotonic,
        pause: Callable[[float], Awaitable[object]] = _turn,
        slice_seconds: float = SLICE,
        rest_seconds: float = REST,
    ) -> None:
        self.timeout = timeout
        self.what = what
        self._clock = clock
        self._pause = pause
        self._slice = slice_seconds
        self._rest = rest_seconds
        self.started = clock()
        self.deadline = math.inf if timeout is None else self.started + timeout
        self._next = min(self.started + slice_seconds, self.deadline)
        self._stopped: str | None = None
        self.turns = 0  # times it gave the event loop a turn

    def stop(self, reason: str) -> None:
        """Make the next tick raise :class:`Unavailable` with ``reason`` (at shutdown)."""
        self._stopped = reason
        self._next = -math.inf

    async def tick(self) -> None:
        """One item of work done: yield when the slice is used up, raise past the deadline."""
        now = self._clock()
        if now < self._next:
            return
        self.check(now)
        await self._pause(self._rest)
        self.turns += 1
        self._next = min(self._clock() + self._slice, self.deadline)

    def check(self, now: float | None = None) -> None:
        """Raise if the read was stopped or its deadline has passed."""
        if self._stopped is not None:
            raise Unavailable(f"{self.what}: stopped: {self._stopped}")
        now = self._clock() if now is None else now
        if now >= self.deadline:
            raise ReadTimeout(
                f"{self.what}: the read passed its deadline of {self.timeout:g} s "
                f"(METER_READ_TIMEOUT_MS) and stopped after {now - self.started:.3f} s; ask "
                "for less (a shorter from/to, fewer subjects, a larger windowSize) or raise "
                "METER_READ_TIMEOUT_MS"
            )
