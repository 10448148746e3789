"""Which tracker finds QEMU's own writes to guest RAM, and the fall back when the best one
is refused: write-watch (every write through QEMU's page tables, O(dirty)), the TCG plugin
(vCPU stores only), or content hashing (anything, O(RAM) per round)."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from orchestrator.dirty.memory import MemoryLayout
from orchestrator.trackers.base import Tracker
from orchestrator.trackers.content import content_trackers
from orchestrator.trackers.errors import TrackerSetupError
from orchestrator.trackers.vcpu import VcpuTracker
from orchestrator.trackers.vcpulog import VcpuDirtyLog
from orchestrator.trackers.writewatch import WriteWatchTracker
from orchestrator.writewatch import WriteWatch, WriteWatchRefused


class QemuWrites(enum.Enum):
    WRITEWATCH = "writewatch"
    VCPU = "vcpu"
    CONTENT = "content"


@contextmanager
def qemu_write_trackers(
    kind: QemuWrites,
    layout: MemoryLayout,
    pid: int,
    *,
    explicit: bool = True,
    log: VcpuDirtyLog | None = None,
    src_ram: str | None = None,
    trust_seccomp: bool = False,
    notice: Callable[[str], None] = print,
) -> Iterator[list[Tracker]]:
    """The trackers of QEMU process `pid`'s writes, released on exit. A write-watch that the
    user did not ask for by name falls back to content hashing when refused (`notice` says
    why); asked for by name, its refusal is raised (`WriteWatchRefused`), nothing changed."""
    watch: WriteWatch | None = None
    if kind is QemuWrites.WRITEWATCH:
        try:
            watch = WriteWatch.open(pid, layout, trust_seccomp)
        except WriteWatchRefused as exc:
            if explicit:
                raise
            notice(f"{exc}; falling back to content hashing")
            kind = QemuWrites.CONTENT
    try:
        if watch is not None:
            yield [WriteWatchTracker(watch)]
        elif kind is QemuWrites.VCPU:
            if log is None:
                raise TrackerSetupError("the vCPU tracker needs the TCG plugin's dirty log")
            yield [VcpuTracker(log)]
        else:
            yield [*content_trackers(layout, src_ram)]
    finally:
        if watch is not None:
            watch.close()
