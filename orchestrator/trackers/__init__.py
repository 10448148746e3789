"""Dirty-page trackers and the set that drives them into one shared bitmap."""

from .base import SentAware, StartAttempt, StartOutcome, Tracker
from .content import ContentTracker, content_trackers
from .events import TrackerEvent, TrackerState, TrackerStats
from .iommufd_hwpt import IommufdHwptTracker
from .qemu_writes import QemuWrites, qemu_write_trackers
from .recovery import Recovery, RecoveryPolicy, Step, Verdict
from .set import TrackerSet
from .vcpu import VcpuTracker
from .vfio_dma import VfioDmaLogTracker
from .writewatch import WriteWatchTracker

__all__ = [
    "ContentTracker",
    "IommufdHwptTracker",
    "QemuWrites",
    "Recovery",
    "RecoveryPolicy",
    "SentAware",
    "StartAttempt",
    "StartOutcome",
    "Step",
    "Tracker",
    "TrackerEvent",
    "TrackerSet",
    "TrackerState",
    "TrackerStats",
    "Verdict",
    "VcpuTracker",
    "content_trackers",
    "qemu_write_trackers",
    "VfioDmaLogTracker",
    "WriteWatchTracker",
]
