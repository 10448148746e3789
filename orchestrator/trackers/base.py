"""The tracker protocol: every source of dirty pages looks the same to the tracker set.

Methods are blocking (they issue ioctls or scan memory) and are run in worker threads by
`TrackerSet`; a tracker never touches the shared bitmap except through `DirtyBitmap`'s
locked merge/mark operations. A tracker whose final collect is short work that cannot wait
on a device says so with `Bounded`: the set then runs that collect on the event loop's own
thread, since inside the downtime a thread handoff costs more than such a collect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from orchestrator.dirty.bitmap import DirtyBitmap
from orchestrator.dirty.bits import page_words, report_span, report_words
from orchestrator.dirty.memory import MemoryLayout
from orchestrator.dirty.ranges import IovaRange, intersect
from orchestrator.vfio.ranges import normalize


@dataclass
class StartAttempt:
    step: str
    ranges: int
    errno: int | None  # None: accepted


@dataclass
class StartOutcome:
    """What a start achieved. `untracked` is memory the tracker should see but cannot log:
    it is marked dirty on every collect (perma-dirty), so nothing there can be missed."""

    page_size: int
    tracked: list[IovaRange]
    untracked: list[IovaRange] = field(default_factory=list)
    attempts: list[StartAttempt] = field(default_factory=list)


@runtime_checkable
class Tracker(Protocol):
    name: str
    kind: str

    def start(self, layout: MemoryLayout) -> StartOutcome:
        """Begin tracking; raise on failure (the set falls back to all-dirty)."""

    def collect(self, bitmap: DirtyBitmap) -> None:
        """OR everything dirtied since the last collect (or start) into the bitmap."""

    def stop(self) -> None:
        """Stop tracking; must be safe to call in any state."""

    def covered(self, layout: MemoryLayout) -> list[IovaRange]:
        """Every range this tracker is responsible for: what a failure marks dirty. Known
        before `start`, so a tracker that never started is still covered."""


@runtime_checkable
class Bounded(Protocol):
    """A tracker whose `collect` never blocks on anything but its own CPU work, done in about
    a millisecond per GiB (a page-table walk, not a device ioctl): no watchdog needed."""

    bounded_collect: bool


@runtime_checkable
class SentAware(Protocol):
    """A tracker that needs to know what the destination now holds (content hashing)."""

    def record_sent(self, pages: np.ndarray, data: np.ndarray) -> None:
        """`pages` (relative to the tracker's base) now hold exactly `data` at the destination."""


def reach_within(reach: list[IovaRange] | None, layout: MemoryLayout) -> list[IovaRange]:
    """The RAM a device can reach: all of it, or its window clipped to RAM. The window is
    checked as the VFIO client checks every range, before anything is asked of a device."""
    ram = layout.ranges()
    return intersect(normalize(reach, layout.page_size), ram) if reach else ram


def mark_ranges(bitmap: DirtyBitmap, ranges: list[IovaRange]) -> None:
    for r in ranges:
        bitmap.mark(r.iova, r.length)


# A kernel query: (iova, length, page size, zeroed words) -> the words ORed with its report.
Report = Callable[[int, int, int, np.ndarray], None]

# One report covers at most this much IOVA: a 2 MiB scratch bitmap at 4 KiB pages, the same
# window the kernel's iova_bitmap pins at a time.
REPORT_CHUNK = 64 << 30


class ReportBuffer:
    """A private scratch bitmap that reports are written into before the locked OR-merge
    (the architecture's invariant that reports land in a private zeroed buffer: the kernel
    sets bits non-atomically, so it never writes the shared bitmap).

    Whole pages, merged whole: a dirty unit that straddles a query's end is reported (and
    cleared in the device) in full, its bits past the length included, so those bits are
    real dirty pages. Reused across rounds; a tracker takes a new one after a restart, so a
    report abandoned by the watchdog can only ever write into a buffer nobody reads any more.
    """

    def __init__(self) -> None:
        self._words = report_words(0)

    def collect(self, bitmap: DirtyBitmap, ranges: list[IovaRange], report: Report) -> None:
        """Query `ranges` report-sized piece by piece at the bitmap's page size, each into the
        zeroed buffer (as many words as a report may write, `bits.report_span`), and merge
        each whole buffer into the shared bitmap."""
        page = bitmap.page_size
        for r in ranges:
            for lo in range(r.iova, r.end, REPORT_CHUNK):
                length = min(REPORT_CHUNK, r.end - lo)
                need = report_span(-(-length // page))
                if self._words.size < need:
                    self._words = page_words(need)
                out = self._words[:need]
                out.fill(0)
                report(lo, length, page, out)
                bitmap.merge_report(lo, page, out)
