"""A bandwidth cap for the page stream, like QEMU's max-bandwidth."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class TokenBucket:
    """`rate` bytes per second on average, bursts up to `burst` bytes; `rate` None is uncapped.

    A frame larger than what the bucket holds is not split: it is let through and leaves the
    bucket in debt, and the next taker waits the debt off. The average stays at `rate` and a
    frame is never delayed by more than its own size at `rate`. Takers queue in arrival order,
    so parallel connections share the cap fairly.

    One bucket serves a sink for its whole life and `set_rate` changes it in place: a taker
    already waiting off a debt is woken and recomputes its wait from the new rate, so lifting
    or raising a cap rescues a send that an old, tiny cap would have held for days."""

    def __init__(
        self,
        rate: float | None,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._clock, self._sleep = clock, sleep
        self._fixed_burst = burst
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self.rate: float | None = None
        self.burst = 0.0
        self._tokens = 0.0
        self._last = clock()
        self.set_rate(rate)

    def set_rate(self, rate: float | None) -> None:
        """Cap at `rate` bytes per second from now on (None: uncapped); wakes waiting takers."""
        if rate is not None and rate <= 0:
            raise ValueError(f"bandwidth cap must be positive or None (uncapped), not {rate}")
        if self.rate is not None:
            self._refill()  # what the old rate earned until now stays earned
        was_capped = self.rate is not None
        self.rate = None if rate is None else float(rate)
        if self.rate is not None:
            # 100 ms of the rate, QEMU's window, unless the caller fixed the burst.
            self.burst = float(self._fixed_burst if self._fixed_burst is not None else self.rate / 10)
            self._tokens = min(self._tokens, self.burst) if was_capped else self.burst
            self._last = self._clock()
        self._changed.set()
        self._changed = asyncio.Event()

    def _refill(self) -> None:
        assert self.rate is not None
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    async def take(self, nbytes: int) -> None:
        """Wait until `nbytes` may go on the wire."""
        async with self._lock:
            while self.rate is not None:
                self._refill()
                if self._tokens < 0:
                    changed = self._changed
                    await self._wait(-self._tokens / self.rate, changed)
                    if changed.is_set():
                        continue  # another rate: the wait is computed again from it
                    self._refill()  # the debt is paid (up to the clock's rounding)
                self._tokens -= nbytes
                return

    async def _wait(self, seconds: float, changed: asyncio.Event) -> None:
        """Sleep `seconds` or until the rate changes, whichever comes first."""
        sleeper = asyncio.ensure_future(self._sleep(seconds))
        waker = asyncio.ensure_future(changed.wait())
        try:
            await asyncio.wait((sleeper, waker), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, waker):
                task.cancel()
            await asyncio.gather(sleeper, waker, return_exceptions=True)
