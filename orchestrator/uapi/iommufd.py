"""`include/uapi/linux/iommufd.h`: HWPT allocation and IOMMU dirty tracking."""

from __future__ import annotations

import ctypes

from orchestrator.uapi.ioctl import _IO
from orchestrator.uapi.vfio import _Le, c_u32, c_u64

IOMMUFD_TYPE = ord(";")

IOMMUFD_CMD_DESTROY = 0x80
IOMMUFD_CMD_IOAS_ALLOC = 0x81
IOMMUFD_CMD_IOAS_ALLOW_IOVAS = 0x82
IOMMUFD_CMD_IOAS_COPY = 0x83
IOMMUFD_CMD_IOAS_IOVA_RANGES = 0x84
IOMMUFD_CMD_IOAS_MAP = 0x85
IOMMUFD_CMD_IOAS_UNMAP = 0x86
IOMMUFD_CMD_OPTION = 0x87
IOMMUFD_CMD_VFIO_IOAS = 0x88
IOMMUFD_CMD_HWPT_ALLOC = 0x89
IOMMUFD_CMD_GET_HW_INFO = 0x8A
IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING = 0x8B
IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP = 0x8C

IOMMU_DESTROY = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_DESTROY)
IOMMU_IOAS_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_ALLOC)
IOMMU_IOAS_MAP = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_MAP)
IOMMU_IOAS_UNMAP = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_UNMAP)
IOMMU_HWPT_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_ALLOC)
IOMMU_GET_HW_INFO = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_GET_HW_INFO)
IOMMU_HWPT_SET_DIRTY_TRACKING = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING)
IOMMU_HWPT_GET_DIRTY_BITMAP = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP)

# enum iommufd_hwpt_alloc_flags
IOMMU_HWPT_ALLOC_NEST_PARENT = 1 << 0
IOMMU_HWPT_ALLOC_DIRTY_TRACKING = 1 << 1
IOMMU_HWPT_FAULT_ID_VALID = 1 << 2
IOMMU_HWPT_ALLOC_PASID = 1 << 3

# enum iommufd_hw_capabilities
IOMMU_HW_CAP_DIRTY_TRACKING = 1 << 0
IOMMU_HW_CAP_PCI_PASID_EXEC = 1 << 1
IOMMU_HW_CAP_PCI_PASID_PRIV = 1 << 2

IOMMU_HWPT_DIRTY_TRACKING_ENABLE = 1
IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR = 1

IOMMU_HWPT_DATA_NONE = 0


class iommu_hwpt_alloc(_Le):
    _fields_ = [
        ("size", c_u32),
        ("flags", c_u32),
        ("dev_id", c_u32),
        ("pt_id", c_u32),
        ("out_hwpt_id", c_u32),
        ("__reserved", c_u32),
        ("data_type", c_u32),
        ("data_len", c_u32),
        ("data_uptr", c_u64),
        ("fault_id", c_u32),
        ("__reserved2", c_u32),
    ]


class iommu_hw_info(_Le):
    _fields_ = [
        ("size", c_u32),
        ("flags", c_u32),
        ("dev_id", c_u32),
        ("data_len", c_u32),
        ("data_uptr", c_u64),
        ("out_data_type", c_u32),  # in_data_type on input (a union in the header)
        ("out_max_pasid_log2", ctypes.c_uint8),
        ("__reserved", ctypes.c_uint8 * 3),
        ("out_capabilities", c_u64),
    ]


class iommu_hwpt_set_dirty_tracking(_Le):
    _fields_ = [("size", c_u32), ("flags", c_u32), ("hwpt_id", c_u32), ("__reserved", c_u32)]


class iommu_hwpt_get_dirty_bitmap(_Le):
    _fields_ = [
        ("size", c_u32),
        ("hwpt_id", c_u32),
        ("flags", c_u32),
        ("__reserved", c_u32),
        ("iova", c_u64),
        ("length", c_u64),
        ("page_size", c_u64),
        ("data", c_u64),
    ]


# enum iommufd_hw_info_type
IOMMU_HW_INFO_TYPE_NONE = 0

# enum iommufd_ioas_map_flags
IOMMU_IOAS_MAP_FIXED_IOVA = 1 << 0
IOMMU_IOAS_MAP_WRITEABLE = 1 << 1
IOMMU_IOAS_MAP_READABLE = 1 << 2


class iommu_ioas_alloc(_Le):
    _fields_ = [("size", c_u32), ("flags", c_u32), ("out_ioas_id", c_u32)]


class iommu_ioas_map(_Le):
    _fields_ = [
        ("size", c_u32),
        ("flags", c_u32),
        ("ioas_id", c_u32),
        ("__reserved", c_u32),
        ("user_va", c_u64),
        ("length", c_u64),
        ("iova", c_u64),
    ]
