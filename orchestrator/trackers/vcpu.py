"""vCPU stores, logged by the TCG plugin into a shared double-buffered bitmap.

It sees every store the guest's vCPUs make — and nothing a device writes by DMA, which is
why device DMA logging exists at all.

The log is numbered by the addresses QEMU reports to the plugin, which are guest-physical
only since QEMU 8.2; before, they were QEMU's RAM-block addresses, which for the pc machine's
RAM above 4 GiB are the offset in the RAM file, not the guest address. The tracker maps each
RAM region of the layout from the log's numbering to the bitmap's (guest-physical) one, so
neither kind loses a page above 4 GiB, and stores to memory outside the layout are dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from orchestrator.dirty.bitmap import DirtyBitmap
from orchestrator.dirty.bits import words_for
from orchestrator.dirty.memory import MemoryLayout
from orchestrator.dirty.ranges import IovaRange
from orchestrator.trackers.base import StartOutcome
from orchestrator.trackers.errors import TrackerSetupError
from orchestrator.trackers.vcpulog import Addresses, VcpuDirtyLog


@dataclass(frozen=True)
class _Span:
    """Log pages [log_page, log_page + npages) are guest pages from ``gpa`` on."""

    log_page: int
    npages: int
    gpa: int


def _spans(log: VcpuDirtyLog, layout: MemoryLayout) -> list[_Span]:
    kind = log.addresses
    if kind is Addresses.UNKNOWN:
        raise TrackerSetupError(f"no dirty-log plugin has attached to {log.path}")
    if kind is Addresses.RAM_BLOCK and len({r.path for r in layout.regions}) > 1:
        raise TrackerSetupError("RAM-block addresses map to a single RAM backend; this layout has several")
    ps = layout.page_size
    spans = [
        _Span((r.gpa if kind is Addresses.PHYSICAL else r.offset) // ps, r.length // ps, r.gpa) for r in layout.regions
    ]
    end = max(s.log_page + s.npages for s in spans)
    if end > log.npages:
        raise TrackerSetupError(
            f"{log.path} has {log.npages} pages; this layout needs {end} "
            f"for {kind.name.lower()} addresses (vcpulog.log_pages sizes a log)"
        )
    return spans


def _bits(words: np.ndarray, first: int, count: int) -> np.ndarray:
    """Bits [first, first + count) of `words` as words of their own, from bit 0."""
    start, shift = divmod(first, 64)
    n = words_for(count)
    if shift:
        low = words[start : start + n] >> np.uint64(shift)
        high = words[start + 1 : start + n + 1] << np.uint64(64 - shift)
        low[: high.size] |= high
        out = low
    else:
        out = words[start : start + n].copy()
    if count % 64:
        out[-1] &= np.uint64((1 << count % 64) - 1)
    return out


class VcpuTracker:
    kind = "vcpu-plugin"

    def __init__(self, log: VcpuDirtyLog, name: str = "vcpu", drain_timeout: float = 2.0) -> None:
        self.log = log
        self.name = name
        self.page_size = log.page_size
        self.drain_timeout = drain_timeout
        self._words = np.zeros(words_for(log.npages), np.uint64)
        self._spans: list[_Span] = []

    def covered(self, layout: MemoryLayout) -> list[IovaRange]:
        return layout.ranges()

    def start(self, layout: MemoryLayout) -> StartOutcome:
        """The plugin logs from QEMU's start; drop what it saw before now (round 0 copies
        every page after this point anyway). A log whose writer hung cannot be restarted."""
        if self.log.page_size != layout.page_size:
            raise TrackerSetupError(f"{self.name}: log page {self.log.page_size} != layout page {layout.page_size}")
        self._spans = _spans(self.log, layout)
        self._take(self.log.harvest_final)
        return StartOutcome(self.page_size, layout.ranges())

    def _take(self, harvest: Callable[[np.ndarray, float], int]) -> np.ndarray:
        self._words.fill(0)
        harvest(self._words, self.drain_timeout)
        return self._words

    def _merge(self, bitmap: DirtyBitmap, words: np.ndarray) -> None:
        for span in self._spans:
            bitmap.merge_report(span.gpa, self.page_size, _bits(words, span.log_page, span.npages))

    def collect(self, bitmap: DirtyBitmap) -> None:
        self._merge(bitmap, self._take(self.log.harvest))

    def collect_final(self, bitmap: DirtyBitmap) -> None:
        """vCPUs are stopped: both buffers are quiet, read them both."""
        self._merge(bitmap, self._take(self.log.harvest_final))

    def stop(self) -> None:
        """The plugin lives as long as QEMU; there is nothing to switch off."""
