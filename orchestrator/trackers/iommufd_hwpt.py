"""IOMMU dirty tracking through an IOMMUFD HWPT: the IOMMU sees every device behind it."""

from __future__ import annotations

from ..bitmap import DirtyBitmap
from ..memory import MemoryLayout
from ..vfio import IommufdHwpt
from ..vfio.ranges import IovaRange
from .base import ReportBuffer, StartOutcome


class IommufdHwptTracker:
    kind = "iommufd-hwpt"

    def __init__(self, hwpt: IommufdHwpt, name: str | None = None) -> None:
        self.hwpt = hwpt
        self.name = name or hwpt.name
        self.page_size = 4096
        self.ranges: list[IovaRange] = []
        self._buffer = ReportBuffer()
        self._active = False

    def covered(self, layout: MemoryLayout) -> list[IovaRange]:
        return layout.ranges()

    def start(self, layout: MemoryLayout) -> StartOutcome:
        """Enabling clears the IOMMU's dirty bits, so only writes from now on are reported."""
        self.page_size = layout.page_size
        self.ranges = layout.ranges()
        self._buffer = ReportBuffer()
        self.hwpt.set_dirty_tracking(True)
        self._active = True
        return StartOutcome(self.page_size, list(self.ranges))

    def collect(self, bitmap: DirtyBitmap) -> None:
        page = bitmap.page_size
        for lo, length, out in self._buffer.chunks(self.ranges, page):
            self.hwpt.get_dirty_bitmap(lo, length, page, out)
            bitmap.merge_report(lo, page, out)

    def stop(self) -> None:
        if self._active:
            self._active = False
            self.hwpt.set_dirty_tracking(False)
