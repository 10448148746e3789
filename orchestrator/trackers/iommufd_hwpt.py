"""IOMMU dirty tracking through an IOMMUFD HWPT: the IOMMU sees every device behind it."""

from __future__ import annotations

from orchestrator.dirty.bitmap import DirtyBitmap
from orchestrator.dirty.memory import MemoryLayout
from orchestrator.dirty.ranges import IovaRange, subtract
from orchestrator.trackers.base import ReportBuffer, StartOutcome, mark_ranges, reach_within
from orchestrator.vfio import IommufdHwpt


class IommufdHwptTracker:
    """Queries go per mapped IOAS area: a dirty-bitmap query stops at the first unmapped gap
    and still returns success (iommu_read_and_clear_dirty ignores the walk's result), so a
    query spanning a gap would silently drop everything after it. Guest RAM the IOAS does
    not map is untracked and marked dirty every collect."""

    kind = "iommufd-hwpt"

    def __init__(self, hwpt: IommufdHwpt, mapped: list[IovaRange] | None = None, name: str | None = None) -> None:
        """`mapped`: the IOAS's mapped areas (as whoever set up the IOAS mapped guest RAM);
        default: all of guest RAM, mapped one area per RAM region."""
        self.hwpt = hwpt
        self.name = name or hwpt.name
        self._mapped_arg = mapped
        self.page_size = 4096
        self.ranges: list[IovaRange] = []
        self.untracked: list[IovaRange] = []
        self._buffer = ReportBuffer()
        self._active = False

    def covered(self, layout: MemoryLayout) -> list[IovaRange]:
        return layout.ranges()

    def start(self, layout: MemoryLayout) -> StartOutcome:
        """Enabling clears the IOMMU's dirty bits, so only writes from now on are reported."""
        self.page_size = layout.page_size
        self.ranges = reach_within(self._mapped_arg, layout)
        self.untracked = subtract(layout.ranges(), self.ranges)
        self._buffer = ReportBuffer()
        self.hwpt.set_dirty_tracking(True)
        self._active = True
        return StartOutcome(self.page_size, list(self.ranges), list(self.untracked))

    def collect(self, bitmap: DirtyBitmap) -> None:
        self._buffer.collect(bitmap, self.ranges, self.hwpt.get_dirty_bitmap)
        mark_ranges(bitmap, self.untracked)

    def stop(self) -> None:
        if self._active:
            self._active = False
            self.hwpt.set_dirty_tracking(False)
