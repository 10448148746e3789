"""Guest RAM on both sides as arrays: a page sink double, and a tracker that sees what the
test's guest writes."""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from orchestrator.transport.base import OnSent, SinkError, page_numbers
from tests.trackers.test_tracker_set import PAGE, Scripted

from .faults import Fault, Faults
from .qemu import FakeHost, turn


class MemorySink:
    """A `PageSink` over two arrays; every call is a journal step a `Fault` can fail."""

    page_size = PAGE

    def __init__(self, host: FakeHost, npages: int, faults: Collection[Fault] = (), seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.host, self.faults = host, Faults(list(faults))
        self.src = rng.integers(0, 256, (npages, PAGE), dtype=np.uint8)
        self.src[::4] = 0  # pages round 0 skips
        self.dst = rng.integers(0, 256, (npages, PAGE), dtype=np.uint8)  # whatever it held before
        self.closed = False

    max_bandwidth: float | None = None

    def set_max_bandwidth(self, rate: float | None) -> None:
        self.max_bandwidth = rate

    async def send_round0(self, on_sent: OnSent | None = None) -> tuple[int, int]:
        await self._step("send_round0")
        self.dst[:] = 0
        pages = np.flatnonzero(self.src.any(axis=1))
        return len(pages), self._copy(pages, on_sent)

    async def send_pages(self, pages: np.ndarray, on_sent: OnSent | None = None) -> int:
        await self._step("send_pages")
        return self._copy(page_numbers(pages), on_sent)

    async def verify(self) -> np.ndarray:
        await self._step("verify")
        return np.flatnonzero((self.src != self.dst).any(axis=1))

    def close(self) -> None:
        self.closed = True

    def _copy(self, pages: np.ndarray, on_sent: OnSent | None) -> int:
        self.dst[pages] = self.src[pages]
        if on_sent is not None:
            on_sent(pages, self.src[pages].copy())
        return len(pages) * PAGE

    async def _step(self, name: str) -> None:
        self.host.step(f"sink: {name}")
        await turn()
        if self.faults.take(name) is not None:
            raise SinkError(f"injected failure of {name}")


class GuestWrites(Scripted):
    """A tracker of the test's guest: it sees every `write` unless told to miss one."""

    kind = "guest"

    def __init__(self, sink: MemorySink, collect: Collection[int | str] = ()) -> None:
        super().__init__("guest", reach_pages=(0, len(sink.src)), collect=collect)
        self.sink = sink

    def write(self, page: int, *, seen: bool = True) -> None:
        self.sink.src[page] += 1
        if seen:
            self.dirty.append(page)

    def collect(self, bitmap) -> None:
        super().collect(bitmap)
        self.dirty.clear()
