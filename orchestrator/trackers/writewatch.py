"""Write-watch: every write QEMU's process makes to guest RAM through its own page tables
(TCG and KVM vCPUs, device models, vhost-kernel), from async userfaultfd write-protection
harvested by PAGEMAP_SCAN. O(touched RAM) per collect, whatever the RAM size.

It cannot see writes through another process's mapping of the RAM file (vhost-user
backends, the emulated devices here) nor device DMA into pinned pages: DMA logging covers
those.
"""

from __future__ import annotations

from orchestrator.dirty.bitmap import DirtyBitmap
from orchestrator.dirty.memory import MemoryLayout
from orchestrator.dirty.ranges import IovaRange
from orchestrator.trackers.base import StartOutcome
from orchestrator.trackers.errors import TrackerSetupError
from orchestrator.writewatch import WriteWatch


class WriteWatchTracker:
    kind = "write-watch"
    #: A harvest is a walk of QEMU's page tables: it cannot hang on a device (`Bounded`).
    bounded_collect = True

    def __init__(self, watch: WriteWatch, name: str = "write-watch") -> None:
        self.watch = watch
        self.name = name

    def covered(self, layout: MemoryLayout) -> list[IovaRange]:
        return layout.ranges()

    def start(self, layout: MemoryLayout) -> StartOutcome:
        """Register (again, after a stop) and arm: the first scan write-protects every page
        and reports them all, which round 0 (or the set's mark after a restart) covers."""
        if layout.page_size != self.watch.page_size:
            raise TrackerSetupError(f"{self.name}: watch page {self.watch.page_size} != layout page {layout.page_size}")
        self.watch.register()
        self.watch.scan(None)
        return StartOutcome(layout.page_size, layout.ranges())

    def collect(self, bitmap: DirtyBitmap) -> None:
        self.watch.scan(bitmap.mark_runs)

    def stop(self) -> None:
        """Write-protection off: QEMU runs as before. The userfaultfd stays ours until
        `close`, so a restart needs no second injection."""
        self.watch.unregister()

    def close(self) -> None:
        self.watch.close()
