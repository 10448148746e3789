"""Typed client of the VFIO / IOMMUFD uAPI over a byte-level syscall seam."""

from .device import State, VfioDevice
from .errors import (
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
from .iommufd import IommufdHwpt
from .ranges import IovaRange, StartPlan, combine_smallest_gap, normalize, start_ladder
from .syscalls import RealSyscalls, Syscalls

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
