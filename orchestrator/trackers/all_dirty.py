"""For a device that cannot log DMA: everything it can reach is dirty every round."""

from __future__ import annotations

from ..bitmap import DirtyBitmap
from ..memory import MemoryLayout
from ..vfio.ranges import IovaRange
from .base import StartOutcome, mark_ranges, reach_within


class AllDirtyTracker:
    kind = "all-dirty"

    def __init__(self, name: str, reach: list[IovaRange] | None = None) -> None:
        self.name = name
        self._reach_arg = reach
        self.reach: list[IovaRange] = []
        self.page_size = 4096

    def covered(self, layout: MemoryLayout) -> list[IovaRange]:
        return reach_within(self._reach_arg, layout)

    def start(self, layout: MemoryLayout) -> StartOutcome:
        self.reach = self.covered(layout)
        self.page_size = layout.page_size
        return StartOutcome(self.page_size, [], list(self.reach))

    def collect(self, bitmap: DirtyBitmap) -> None:
        mark_ranges(bitmap, self.reach)

    def stop(self) -> None:
        """Nothing to stop: no device state was touched."""
