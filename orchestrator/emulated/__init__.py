"""The Linux kernel side of VFIO DMA logging, migration v2 and IOMMUFD dirty tracking,
emulated in-process behind the same byte-level syscall seam the client uses on real fds.
"""

from .faults import Fault
from .kernel import EmulatedKernel
from .models import DeviceModel, Mlx5Like, MttyLike, MttySample, NoDmaLogging, PdsLike
from .ranges import combine_iova_ranges

__all__ = [
    "DeviceModel",
    "EmulatedKernel",
    "Fault",
    "Mlx5Like",
    "MttyLike",
    "MttySample",
    "NoDmaLogging",
    "PdsLike",
    "combine_iova_ranges",
]
