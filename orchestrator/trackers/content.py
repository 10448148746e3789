"""Content tracking: a page is dirty while its bytes differ from what was last sent.

Works for any accelerator and catches every writer (vCPU, device DMA, anything) because it
looks at the memory itself. The comparison is against hashes of the bytes actually sent, not
of what the source held at the previous collect: a page that changes and changes back after
being sent mid-change is still caught.
"""

from __future__ import annotations

import numpy as np

from orchestrator.dirty.bitmap import DirtyBitmap
from orchestrator.dirty.memory import MemoryLayout
from orchestrator.dirty.pagehash import page_hashes
from orchestrator.dirty.ranges import IovaRange
from orchestrator.trackers.base import StartOutcome


class ContentTracker:
    kind = "content-hash"

    def __init__(self, memory: np.ndarray, gpa: int = 0, name: str = "content") -> None:
        """`memory`: a byte view of the guest RAM that starts at guest-physical `gpa`."""
        self.name = name
        self.memory = memory
        self.gpa = gpa
        self.page_size = 4096
        self._sent = np.zeros(0, np.uint64)

    def covered(self, layout: MemoryLayout | None = None) -> list[IovaRange]:
        return [IovaRange(self.gpa, self.memory.nbytes)]

    def start(self, layout: MemoryLayout) -> StartOutcome:
        self.page_size = layout.page_size
        if self.memory.nbytes % self.page_size or self.gpa % self.page_size:
            raise ValueError(
                f"{self.name}: memory view of {self.memory.nbytes} bytes at {self.gpa:#x} is not page-aligned"
            )
        # The destination starts zeroed, and the zero page hashes to 0.
        self._sent = np.zeros(self.memory.nbytes // self.page_size, np.uint64)
        return StartOutcome(self.page_size, self.covered())

    def collect(self, bitmap: DirtyBitmap) -> None:
        dirty = page_hashes(self.memory, self.page_size) != self._sent
        words = np.packbits(dirty, bitorder="little")
        words = np.pad(words, (0, -words.size % 8)).view(np.uint64)
        bitmap.merge_report(self.gpa, self.page_size, words)

    def record_sent(self, pages: np.ndarray, data: np.ndarray) -> None:
        """Guest page numbers `pages` now hold `data` (one row per page) at the destination."""
        rel = np.asarray(pages, np.int64) - self.gpa // self.page_size
        mine = (rel >= 0) & (rel < self._sent.size)
        if mine.all():  # the usual case: no masked copy of the data
            self._sent[rel] = page_hashes(data, self.page_size)
        else:
            self._sent[rel[mine]] = page_hashes(np.asarray(data)[mine], self.page_size)

    def stop(self) -> None:
        """Nothing to stop."""


def content_trackers(layout: MemoryLayout, path: str | None = None) -> list[ContentTracker]:
    """One content tracker per RAM region of `layout`, each over its own bytes of the RAM
    file and at its own guest-physical address: file offsets are not guest addresses (a pc
    guest's RAM above the PCI hole sits at 4 GiB in the guest but right after the low RAM in
    the file). `path` defaults to each region's own file."""
    trackers = []
    for i, r in enumerate(layout.regions):
        source = path or r.path
        if source is None:
            raise ValueError(f"RAM region {r.gpa:#x}+{r.length:#x} names no file to read")
        view = np.memmap(source, np.uint8, mode="r", offset=r.offset, shape=(r.length,))
        trackers.append(ContentTracker(view, gpa=r.gpa, name="content" if len(layout.regions) == 1 else f"content-{i}"))
    return trackers
