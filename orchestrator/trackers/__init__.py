"""Dirty-page trackers and the set that drives them into one shared bitmap."""

from orchestrator.trackers.base import SentAware, StartAttempt, StartOutcome, Tracker
from orchestrator.trackers.content import ContentTracker, content_trackers
from orchestrator.trackers.events import EventKind, TrackerEvent, TrackerState, TrackerStats
from orchestrator.trackers.iommufd_hwpt import IommufdHwptTracker
from orchestrator.trackers.qemu_writes import QemuWrites, qemu_write_trackers
from orchestrator.trackers.recovery import Recovery, RecoveryPolicy, Step, Verdict
from orchestrator.trackers.set import TrackerSet
from orchestrator.trackers.vcpu import VcpuTracker
from orchestrator.trackers.vfio_dma import VfioDmaLogTracker
from orchestrator.trackers.writewatch import WriteWatchTracker

__all__ = [
    "ContentTracker",
    "EventKind",
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
    "VcpuTracker",
    "Verdict",
    "VfioDmaLogTracker",
    "WriteWatchTracker",
    "content_trackers",
    "qemu_write_trackers",
]
