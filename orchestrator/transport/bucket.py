"""A bandwidth cap for the page stream, like QEMU's max-bandwidth."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class TokenBucket:
    """`rate` bytes per second on average, bursts up to `burst` bytes.

    A frame larger than what the bucket holds is not split: it is let through and leaves the
    bucket in debt, and the next taker waits the debt off. The average stays at `rate` and a
    frame is never delayed by more than its own size at `rate`. Takers queue in arrival order,
    so parallel connections share the cap fairly."""

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"bandwidth cap must be positive, not {rate}")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate / 10)  # 100 ms, QEMU's window
        self._clock, self._sleep = clock, sleep
        self._tokens = self.burst
        self._last = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    async def take(self, nbytes: int) -> None:
        """Wait until `nbytes` may go on the wire."""
        async with self._lock:
            self._refill()
            if self._tokens < 0:
                await self._sleep(-self._tokens / self.rate)
                self._refill()
            self._tokens -= nbytes
