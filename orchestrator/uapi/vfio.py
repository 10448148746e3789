"""`include/uapi/linux/vfio.h`: the parts the orchestrator speaks, with the kernel's names.

Only the ABI lives here (constants, request numbers, ctypes layouts). Behaviour lives in
`orchestrator.vfio` (the client) and `orchestrator.emulated` (the kernel side).
"""

from __future__ import annotations

import ctypes
import enum
from typing import Self

from orchestrator.uapi.ioctl import _IO

c_u32 = ctypes.c_uint32
c_s32 = ctypes.c_int32
c_u64 = ctypes.c_uint64

VFIO_API_VERSION = 0
VFIO_TYPE = ord(";")
VFIO_BASE = 100

VFIO_GET_API_VERSION = _IO(VFIO_TYPE, VFIO_BASE + 0)
VFIO_CHECK_EXTENSION = _IO(VFIO_TYPE, VFIO_BASE + 1)
VFIO_SET_IOMMU = _IO(VFIO_TYPE, VFIO_BASE + 2)
VFIO_GROUP_GET_STATUS = _IO(VFIO_TYPE, VFIO_BASE + 3)
VFIO_GROUP_SET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 4)
VFIO_GROUP_UNSET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 5)
VFIO_GROUP_GET_DEVICE_FD = _IO(VFIO_TYPE, VFIO_BASE + 6)
VFIO_DEVICE_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 7)
VFIO_DEVICE_GET_REGION_INFO = _IO(VFIO_TYPE, VFIO_BASE + 8)
VFIO_DEVICE_GET_IRQ_INFO = _IO(VFIO_TYPE, VFIO_BASE + 9)
VFIO_DEVICE_SET_IRQS = _IO(VFIO_TYPE, VFIO_BASE + 10)
VFIO_DEVICE_RESET = _IO(VFIO_TYPE, VFIO_BASE + 11)
VFIO_IOMMU_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 12)
VFIO_IOMMU_MAP_DMA = _IO(VFIO_TYPE, VFIO_BASE + 13)
VFIO_IOMMU_UNMAP_DMA = _IO(VFIO_TYPE, VFIO_BASE + 14)
VFIO_IOMMU_ENABLE = _IO(VFIO_TYPE, VFIO_BASE + 15)
VFIO_IOMMU_DISABLE = _IO(VFIO_TYPE, VFIO_BASE + 16)
# One number, two meanings: told apart by the fd (device vs container).
VFIO_DEVICE_FEATURE = _IO(VFIO_TYPE, VFIO_BASE + 17)
VFIO_IOMMU_DIRTY_PAGES = _IO(VFIO_TYPE, VFIO_BASE + 17)
VFIO_DEVICE_BIND_IOMMUFD = _IO(VFIO_TYPE, VFIO_BASE + 18)
VFIO_DEVICE_ATTACH_IOMMUFD_PT = _IO(VFIO_TYPE, VFIO_BASE + 19)
VFIO_DEVICE_DETACH_IOMMUFD_PT = _IO(VFIO_TYPE, VFIO_BASE + 20)
# Issued on the migration data fd, not the device fd.
VFIO_MIG_GET_PRECOPY_INFO = _IO(VFIO_TYPE, VFIO_BASE + 21)

VFIO_TYPE1_IOMMU = 1
VFIO_SPAPR_TCE_IOMMU = 2
VFIO_TYPE1v2_IOMMU = 3

# struct vfio_device_feature flags
VFIO_DEVICE_FEATURE_MASK = 0xFFFF
VFIO_DEVICE_FEATURE_GET = 1 << 16
VFIO_DEVICE_FEATURE_SET = 1 << 17
VFIO_DEVICE_FEATURE_PROBE = 1 << 18

# feature ids (the low 16 bits of flags)
VFIO_DEVICE_FEATURE_PCI_VF_TOKEN = 0
VFIO_DEVICE_FEATURE_MIGRATION = 1
VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE = 2
VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY = 3
VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP = 4
VFIO_DEVICE_FEATURE_LOW_POWER_EXIT = 5
VFIO_DEVICE_FEATURE_DMA_LOGGING_START = 6
VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP = 7
VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT = 8
VFIO_DEVICE_FEATURE_MIG_DATA_SIZE = 9

# struct vfio_device_feature_migration.flags
VFIO_MIGRATION_STOP_COPY = 1 << 0
VFIO_MIGRATION_P2P = 1 << 1
VFIO_MIGRATION_PRE_COPY = 1 << 2


class vfio_device_mig_state(enum.IntEnum):
    VFIO_DEVICE_STATE_ERROR = 0
    VFIO_DEVICE_STATE_STOP = 1
    VFIO_DEVICE_STATE_RUNNING = 2
    VFIO_DEVICE_STATE_STOP_COPY = 3
    VFIO_DEVICE_STATE_RESUMING = 4
    VFIO_DEVICE_STATE_RUNNING_P2P = 5
    VFIO_DEVICE_STATE_PRE_COPY = 6
    VFIO_DEVICE_STATE_PRE_COPY_P2P = 7


# The enum's members under their kernel spelling, as module-level names too.
VFIO_DEVICE_STATE_ERROR = vfio_device_mig_state.VFIO_DEVICE_STATE_ERROR
VFIO_DEVICE_STATE_STOP = vfio_device_mig_state.VFIO_DEVICE_STATE_STOP
VFIO_DEVICE_STATE_RUNNING = vfio_device_mig_state.VFIO_DEVICE_STATE_RUNNING
VFIO_DEVICE_STATE_STOP_COPY = vfio_device_mig_state.VFIO_DEVICE_STATE_STOP_COPY
VFIO_DEVICE_STATE_RESUMING = vfio_device_mig_state.VFIO_DEVICE_STATE_RESUMING
VFIO_DEVICE_STATE_RUNNING_P2P = vfio_device_mig_state.VFIO_DEVICE_STATE_RUNNING_P2P
VFIO_DEVICE_STATE_PRE_COPY = vfio_device_mig_state.VFIO_DEVICE_STATE_PRE_COPY
VFIO_DEVICE_STATE_PRE_COPY_P2P = vfio_device_mig_state.VFIO_DEVICE_STATE_PRE_COPY_P2P
VFIO_DEVICE_STATE_NR = 8

# type1 VFIO_IOMMU_DIRTY_PAGES flags (container fd)
VFIO_IOMMU_DIRTY_PAGES_FLAG_START = 1 << 0
VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP = 1 << 1
VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP = 1 << 2
VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 1 << 0

VFIO_DEVICE_BIND_FLAG_TOKEN = 1 << 0
VFIO_DEVICE_ATTACH_PASID = 1 << 0
VFIO_DEVICE_DETACH_PASID = 1 << 0


class _Le(ctypes.LittleEndianStructure):
    """Kernel structs on a little-endian 64-bit host: natural alignment, no packing."""

    def pack(self) -> bytes:
        return bytes(self)

    @classmethod
    def unpack(cls, raw: bytes | bytearray | memoryview, offset: int = 0) -> Self:
        return cls.from_buffer_copy(bytes(raw[offset : offset + ctypes.sizeof(cls)]))


class vfio_device_feature(_Le):
    _fields_ = [("argsz", c_u32), ("flags", c_u32)]  # followed by data[]


class vfio_device_feature_migration(_Le):
    _fields_ = [("flags", c_u64)]


class vfio_device_feature_mig_state(_Le):
    _fields_ = [("device_state", c_u32), ("data_fd", c_s32)]


class vfio_device_feature_mig_data_size(_Le):
    _fields_ = [("stop_copy_length", c_u64)]


class vfio_precopy_info(_Le):
    _fields_ = [("argsz", c_u32), ("flags", c_u32), ("initial_bytes", c_u64), ("dirty_bytes", c_u64)]


class vfio_device_feature_dma_logging_control(_Le):
    _fields_ = [("page_size", c_u64), ("num_ranges", c_u32), ("__reserved", c_u32), ("ranges", c_u64)]


class vfio_device_feature_dma_logging_range(_Le):
    _fields_ = [("iova", c_u64), ("length", c_u64)]


class vfio_device_feature_dma_logging_report(_Le):
    _fields_ = [("iova", c_u64), ("length", c_u64), ("page_size", c_u64), ("bitmap", c_u64)]


class vfio_device_bind_iommufd(_Le):
    _fields_ = [
        ("argsz", c_u32),
        ("flags", c_u32),
        ("iommufd", c_s32),
        ("out_devid", c_u32),
        ("token_uuid_ptr", c_u64),
    ]


class vfio_device_attach_iommufd_pt(_Le):
    _fields_ = [("argsz", c_u32), ("flags", c_u32), ("pt_id", c_u32), ("pasid", c_u32)]


class vfio_device_detach_iommufd_pt(_Le):
    _fields_ = [("argsz", c_u32), ("flags", c_u32), ("pasid", c_u32)]


class vfio_iommu_type1_dirty_bitmap(_Le):
    _fields_ = [("argsz", c_u32), ("flags", c_u32)]  # followed by data[]


class vfio_bitmap(_Le):
    _fields_ = [("pgsize", c_u64), ("size", c_u64), ("data", c_u64)]


class vfio_iommu_type1_dirty_bitmap_get(_Le):
    _fields_ = [("iova", c_u64), ("size", c_u64), ("bitmap", vfio_bitmap)]


# "Ranges should fit into a single kernel page": PAGE_SIZE / sizeof(range), 256 on 4 KiB hosts.
def log_max_ranges(kernel_page_size: int = 4096) -> int:
    return kernel_page_size // ctypes.sizeof(vfio_device_feature_dma_logging_range)


LOG_MAX_RANGES = log_max_ranges()
