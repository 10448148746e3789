"""Typed client of the VFIO / IOMMUFD uAPI over a byte-level syscall seam."""

from orchestrator.dirty.ranges import IovaRange
from orchestrator.vfio.device import State, VfioDevice
from orchestrator.vfio.errors import (
    AlreadyExists,
    EndOfStream,
    InvalidArgument,
    NotSupported,
    RangeOverflow,
    TooManyRanges,
    TrackerLost,
    VfioError,
    VfioUsageError,
)
from orchestrator.vfio.iommufd import IommufdHwpt
from orchestrator.vfio.ranges import StartPlan, combine_smallest_gap, normalize, start_ladder
from orchestrator.vfio.syscalls import RealSyscalls, Syscalls

__all__ = [
    "AlreadyExists",
    "EndOfStream",
    "InvalidArgument",
    "IommufdHwpt",
    "IovaRange",
    "NotSupported",
    "RangeOverflow",
    "RealSyscalls",
    "StartPlan",
    "State",
    "Syscalls",
    "TooManyRanges",
    "TrackerLost",
    "VfioDevice",
    "VfioError",
    "VfioUsageError",
    "combine_smallest_gap",
    "normalize",
    "start_ladder",
]
