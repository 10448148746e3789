"""Device DMA logging through the VFIO uAPI: one tracker per device."""

from __future__ import annotations

import errno

from orchestrator import uapi as U
from orchestrator.dirty.bitmap import DirtyBitmap
from orchestrator.dirty.memory import MemoryLayout
from orchestrator.dirty.ranges import IovaRange, subtract, widen
from orchestrator.trackers.base import ReportBuffer, StartAttempt, StartOutcome, mark_ranges, reach_within
from orchestrator.vfio import VfioDevice, VfioError
from orchestrator.vfio.ranges import start_ladder

# errnos after which a coarser plan may still be accepted; anything else ends the ladder.
# Ranges start on a grid of this many pages: one u64 of report bitmap per step, the offset
# granularity pds needs inside a region, and the bitmap merge's aligned fast path.
REPORT_GRANULE = 64
LADDER_ERRNOS = {errno.E2BIG, errno.EOPNOTSUPP, errno.ENOMEM, errno.ENOSPC, errno.EINVAL, errno.ERANGE}


class VfioDmaLogTracker:
    """Logs one device's DMA writes.

    START walks the fallback ladder (exact ranges -> combined -> buckets -> one span); when
    every rung is refused the device's reachable memory is perma-dirty. Reports are issued per
    tracked range, widened to the granted page size (a dirty unit that starts below the
    report's iova would be dropped by the kernel), into a private zeroed scratch buffer at the
    bitmap's page size, then OR-merged into the shared bitmap.
    """

    kind = "vfio-dma-log"

    def __init__(
        self,
        device: VfioDevice,
        reach: list[IovaRange] | None = None,
        page_size: int | None = None,
        max_ranges: int = U.LOG_MAX_RANGES,
        name: str | None = None,
    ) -> None:
        self.device = device
        self.name = name or device.name
        self._reach_arg = reach
        self._page_hint = page_size
        self.max_ranges = max_ranges
        self.reach: list[IovaRange] = []
        self.page_size = 0
        self.windows: list[IovaRange] = []
        self.untracked: list[IovaRange] = []
        self._report_page = 4096
        self._buffer = ReportBuffer()
        self._active = False

    def covered(self, layout: MemoryLayout) -> list[IovaRange]:
        return reach_within(self._reach_arg, layout)

    def start(self, layout: MemoryLayout) -> StartOutcome:
        self._report_page = layout.page_size
        self.reach = self.covered(layout)
        hint = self._page_hint or layout.page_size
        attempts: list[StartAttempt] = []
        if not self.device.probe_dma_logging():
            attempts.append(StartAttempt("probe", 0, errno.ENOTTY))
            return self._give_up(attempts)
        for plan in start_ladder(self.reach, hint, self.max_ranges, align=REPORT_GRANULE * hint):
            try:
                granted = self.device.start_dma_logging(plan.ranges, hint)
            except VfioError as exc:
                attempts.append(StartAttempt(plan.step, len(plan.ranges), exc.errno))
                if exc.errno not in LADDER_ERRNOS:
                    raise
                continue
            attempts.append(StartAttempt(plan.step, len(plan.ranges), None))
            self._active = True
            self.page_size = granted
            tracked = list(plan.ranges)
            self.untracked = subtract(self.reach, tracked)
            self.windows = [widen(r, granted) for r in tracked]
            self._buffer = ReportBuffer()
            return StartOutcome(granted, tracked, self.untracked, attempts)
        return self._give_up(attempts)

    def _give_up(self, attempts: list[StartAttempt]) -> StartOutcome:
        self._active = False
        self.page_size = self._report_page
        self.windows = []
        self.untracked = list(self.reach)
        return StartOutcome(self.page_size, [], self.untracked, attempts)

    def collect(self, bitmap: DirtyBitmap) -> None:
        self._buffer.collect(bitmap, self.windows, self.device.report_dma_log)
        mark_ranges(bitmap, self.untracked)

    def stop(self) -> None:
        if self._active:
            self._active = False
            self.device.stop_dma_logging()
