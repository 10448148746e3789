"""Every request number, struct size and field offset the reference lists for the ABI."""

import ctypes

import pytest

from orchestrator import uapi as U

REQUESTS = {
    "VFIO_GET_API_VERSION": 0x3B64,
    "VFIO_CHECK_EXTENSION": 0x3B65,
    "VFIO_SET_IOMMU": 0x3B66,
    "VFIO_GROUP_GET_STATUS": 0x3B67,
    "VFIO_GROUP_SET_CONTAINER": 0x3B68,
    "VFIO_GROUP_GET_DEVICE_FD": 0x3B6A,
    "VFIO_DEVICE_GET_INFO": 0x3B6B,
    "VFIO_DEVICE_RESET": 0x3B6F,
    "VFIO_DEVICE_FEATURE": 0x3B75,
    "VFIO_IOMMU_DIRTY_PAGES": 0x3B75,
    "VFIO_DEVICE_BIND_IOMMUFD": 0x3B76,
    "VFIO_DEVICE_ATTACH_IOMMUFD_PT": 0x3B77,
    "VFIO_DEVICE_DETACH_IOMMUFD_PT": 0x3B78,
    "VFIO_MIG_GET_PRECOPY_INFO": 0x3B79,
    "IOMMU_DESTROY": 0x3B80,
    "IOMMU_IOAS_ALLOC": 0x3B81,
    "IOMMU_IOAS_MAP": 0x3B85,
    "IOMMU_HWPT_ALLOC": 0x3B89,
    "IOMMU_GET_HW_INFO": 0x3B8A,
    "IOMMU_HWPT_SET_DIRTY_TRACKING": 0x3B8B,
    "IOMMU_HWPT_GET_DIRTY_BITMAP": 0x3B8C,
}


@pytest.mark.parametrize("name,value", sorted(REQUESTS.items()))
def test_request_numbers(name, value):
    assert getattr(U, name) == value


def test_decimal_spellings_match():
    assert U.VFIO_DEVICE_FEATURE == 15221
    assert U.VFIO_MIG_GET_PRECOPY_INFO == 15225
    assert U.IOMMU_HWPT_SET_DIRTY_TRACKING == 15243


# struct -> (size, {field: offset})
LAYOUTS = {
    "vfio_device_feature": (8, {"argsz": 0, "flags": 4}),
    "vfio_device_feature_migration": (8, {"flags": 0}),
    "vfio_device_feature_mig_state": (8, {"device_state": 0, "data_fd": 4}),
    "vfio_device_feature_mig_data_size": (8, {"stop_copy_length": 0}),
    "vfio_precopy_info": (24, {"argsz": 0, "flags": 4, "initial_bytes": 8, "dirty_bytes": 16}),
    "vfio_device_feature_dma_logging_control": (24, {"page_size": 0, "num_ranges": 8, "__reserved": 12, "ranges": 16}),
    "vfio_device_feature_dma_logging_range": (16, {"iova": 0, "length": 8}),
    "vfio_device_feature_dma_logging_report": (32, {"iova": 0, "length": 8, "page_size": 16, "bitmap": 24}),
    "vfio_device_bind_iommufd": (24, {"argsz": 0, "flags": 4, "iommufd": 8, "out_devid": 12, "token_uuid_ptr": 16}),
    "vfio_device_attach_iommufd_pt": (16, {"argsz": 0, "flags": 4, "pt_id": 8, "pasid": 12}),
    "vfio_device_detach_iommufd_pt": (12, {"argsz": 0, "flags": 4, "pasid": 8}),
    "vfio_iommu_type1_dirty_bitmap": (8, {"argsz": 0, "flags": 4}),
    "vfio_bitmap": (24, {"pgsize": 0, "size": 8, "data": 16}),
    "vfio_iommu_type1_dirty_bitmap_get": (40, {"iova": 0, "size": 8, "bitmap": 16}),
    "iommu_hwpt_alloc": (
        48,
        {
            "size": 0,
            "flags": 4,
            "dev_id": 8,
            "pt_id": 12,
            "out_hwpt_id": 16,
            "__reserved": 20,
            "data_type": 24,
            "data_len": 28,
            "data_uptr": 32,
            "fault_id": 40,
            "__reserved2": 44,
        },
    ),
    "iommu_hw_info": (
        40,
        {
            "size": 0,
            "flags": 4,
            "dev_id": 8,
            "data_len": 12,
            "data_uptr": 16,
            "out_data_type": 24,
            "out_max_pasid_log2": 28,
            "out_capabilities": 32,
        },
    ),
    "iommu_hwpt_set_dirty_tracking": (16, {"size": 0, "flags": 4, "hwpt_id": 8, "__reserved": 12}),
    "iommu_hwpt_get_dirty_bitmap": (
        48,
        {"size": 0, "hwpt_id": 4, "flags": 8, "__reserved": 12, "iova": 16, "length": 24, "page_size": 32, "data": 40},
    ),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_struct_layouts(name):
    size, offsets = LAYOUTS[name]
    cls = getattr(U, name)
    assert ctypes.sizeof(cls) == size
    for field, off in offsets.items():
        assert getattr(cls, field).offset == off, field


def test_argsz_totals():
    """Header plus payload, as the reference lists them."""
    hdr = ctypes.sizeof(U.vfio_device_feature)
    assert hdr + ctypes.sizeof(U.vfio_device_feature_dma_logging_control) == 32
    assert hdr + ctypes.sizeof(U.vfio_device_feature_dma_logging_report) == 40
    assert hdr + ctypes.sizeof(U.vfio_device_feature_migration) == 16
    assert hdr + ctypes.sizeof(U.vfio_device_feature_mig_state) == 16
    assert hdr + ctypes.sizeof(U.vfio_device_feature_mig_data_size) == 16


def test_feature_flags_and_ids():
    assert (U.VFIO_DEVICE_FEATURE_MASK, U.VFIO_DEVICE_FEATURE_GET) == (0xFFFF, 0x10000)
    assert (U.VFIO_DEVICE_FEATURE_SET, U.VFIO_DEVICE_FEATURE_PROBE) == (0x20000, 0x40000)
    ids = [
        U.VFIO_DEVICE_FEATURE_MIGRATION,
        U.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
        U.VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
        U.VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
        U.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
        U.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
    ]
    assert ids == [1, 2, 6, 7, 8, 9]
    assert (U.VFIO_MIGRATION_STOP_COPY, U.VFIO_MIGRATION_P2P, U.VFIO_MIGRATION_PRE_COPY) == (1, 2, 4)


def test_states_and_iommufd_flags():
    assert [s.value for s in U.vfio_device_mig_state] == list(range(8))
    assert U.VFIO_DEVICE_STATE_PRE_COPY_P2P == 7 and U.VFIO_DEVICE_STATE_NR == 8
    assert U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING == 2
    assert U.IOMMU_HW_CAP_DIRTY_TRACKING == 1
    assert U.IOMMU_HWPT_DIRTY_TRACKING_ENABLE == 1
    assert U.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR == 1
    assert (
        U.VFIO_IOMMU_DIRTY_PAGES_FLAG_START,
        U.VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP,
        U.VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP,
    ) == (1, 2, 4)


def test_log_max_ranges_is_one_kernel_page():
    assert U.LOG_MAX_RANGES == 256
    assert U.log_max_ranges(16384) == 1024 and U.log_max_ranges(65536) == 4096


def test_little_endian_bytes():
    c = U.vfio_device_feature_dma_logging_control(page_size=0x1000, num_ranges=3, ranges=0x1122334455667788)
    assert c.pack() == bytes.fromhex("001000000000000003000000000000008877665544332211")
