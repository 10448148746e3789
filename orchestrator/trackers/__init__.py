"""Dirty-page trackers and the set that drives them into one shared bitmap."""

from .all_dirty import AllDirtyTracker
from .base import SentAware, StartAttempt, StartOutcome, Tracker
from .content import ContentTracker, content_trackers
from .events import TrackerEvent, TrackerState, TrackerStats
from .iommufd_hwpt import IommufdHwptTracker
from .qemu_writes import QemuWrites, qemu_write_trackers
from .set import RecoveryPolicy, TrackerSet
from .vcpu import VcpuTracker
from .vfio_dma import VfioDmaLogTracker
from .writewatch import WriteWatchTracker

__all__ = [
    "AllDirtyTracker",
    "ContentTracker",
    "IommufdHwptTracker",
    "QemuWrites",
    "RecoveryPolicy",
    "SentAware",
    "StartAttempt",
    "StartOutcome",
    "Tracker",
    "TrackerEvent",
    "TrackerSet",
    "TrackerState",
    "TrackerStats",
    "VcpuTracker",
    "content_trackers",
    "qemu_write_trackers",
    "VfioDmaLogTracker",
    "WriteWatchTracker",
]
