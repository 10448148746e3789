"""The Linux kernel side of VFIO DMA logging, migration v2 and IOMMUFD dirty tracking,
emulated in-process behind the same byte-level syscall seam the client uses on real fds.
"""

from orchestrator.emulated.faults import Fault
from orchestrator.emulated.kernel import EmulatedKernel
from orchestrator.emulated.models import DeviceModel, Mlx5Like, MttyLike, MttySample, NoDmaLogging, PdsLike
from orchestrator.emulated.ranges import combine_iova_ranges

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
