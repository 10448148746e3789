"""vCPU stores, logged by the TCG plugin into a shared double-buffered bitmap.

It sees every store the guest's vCPUs make — and nothing a device writes by DMA, which is
why device DMA logging exists at all.
"""

from __future__ import annotations

import numpy as np

from ..bitmap import DirtyBitmap
from ..bits import words_for
from ..memory import MemoryLayout
from ..vcpulog import VcpuDirtyLog
from ..vfio.ranges import IovaRange
from .base import StartOutcome


class VcpuTracker:
    kind = "vcpu-plugin"

    def __init__(self, log: VcpuDirtyLog, name: str = "vcpu", drain_timeout: float = 2.0) -> None:
        self.log = log
        self.name = name
        self.page_size = log.page_size
        self.drain_timeout = drain_timeout
        self._words = np.zeros(words_for(log.npages), np.uint64)

    def covered(self, layout: MemoryLayout) -> list[IovaRange]:
        return layout.ranges()

    def start(self, layout: MemoryLayout) -> StartOutcome:
        """The plugin logs from QEMU's start; drop what it saw before now (round 0 copies
        every page after this point anyway). A log whose writer hung cannot be restarted."""
        if self.log.page_size != layout.page_size:
            raise ValueError(f"{self.name}: log page {self.log.page_size} != layout page {layout.page_size}")
        self._take(self.log.harvest_final)
        return StartOutcome(self.page_size, layout.ranges())

    def _take(self, harvest) -> np.ndarray:
        self._words.fill(0)
        harvest(self._words, self.drain_timeout)
        return self._words

    def collect(self, bitmap: DirtyBitmap) -> None:
        bitmap.merge_report(0, self.page_size, self._take(self.log.harvest))

    def collect_final(self, bitmap: DirtyBitmap) -> None:
        """vCPUs are stopped: both buffers are quiet, read them both."""
        bitmap.merge_report(0, self.page_size, self._take(self.log.harvest_final))

    def stop(self) -> None:
        """The plugin lives as long as QEMU; there is nothing to switch off."""
