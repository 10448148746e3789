"""Dirty-page trackers and the set that drives them into one shared bitmap."""

from .all_dirty import AllDirtyTracker
from .base import SentAware, StartAttempt, StartOutcome, Tracker
from .content import ContentTracker, content_trackers
from .events import TrackerEvent, TrackerState, TrackerStats
from .iommufd_hwpt import IommufdHwptTracker
from .set import RecoveryPolicy, TrackerSet
from .vcpu import VcpuTracker
from .vfio_dma import VfioDmaLogTracker

__all__ = [
    "AllDirtyTracker",
    "ContentTracker",
    "IommufdHwptTracker",
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
    "VfioDmaLogTracker",
]
