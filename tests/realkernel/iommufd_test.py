"""The iommufd selftest's uAPI (drivers/iommu/iommufd/iommufd_test.h, CONFIG_IOMMUFD_TEST):
a mock IOMMU device and domain, whose IO page table dirty bits userspace sets itself.

`struct iommu_test_cmd` is {u32 size, op, id, __reserved; a 48-byte union; u32 last}, padded
to 72 bytes; the kernel wants `size` to reach `last`. Only the two operations the lab uses
are built here. The mock domain's IO page is PAGE_SIZE / 2.
"""

from __future__ import annotations

import struct

import numpy as np

from orchestrator.uapi import _IO
from orchestrator.vfio import Syscalls

IOMMU_TEST_CMD = _IO(";", 0x80 + 32)
IOMMU_TEST_OP_MOCK_DOMAIN = 2
IOMMU_TEST_OP_DIRTY = 13
CMD_SIZE = 72
MOCK_IO_PAGE = 2048
MOCK_APERTURE_START = 1 << 24


def _cmd(op: int, obj_id: int, union: bytes = b"") -> bytearray:
    buf = bytearray(CMD_SIZE)
    struct.pack_into("<IIII", buf, 0, CMD_SIZE, op, obj_id, 0)
    buf[16 : 16 + len(union)] = union
    return buf


def mock_domain(sys: Syscalls, iommufd: int, pt_id: int) -> tuple[int, int, int]:
    """A mock device attached to `pt_id` (an IOAS or a HWPT); (stdev_id, hwpt_id, idev_id)."""
    buf = _cmd(IOMMU_TEST_OP_MOCK_DOMAIN, pt_id)
    sys.ioctl(iommufd, IOMMU_TEST_CMD, buf)
    return struct.unpack_from("<III", buf, 16)


def set_dirty(sys: Syscalls, iommufd: int, hwpt_id: int, iova: int, length: int) -> int:
    """Mark every mock IO page of [iova, iova+length) dirty (rounded out to IO pages); the
    kernel needs tracking on. Returns how many mapped IO pages it marked."""
    lo = iova - iova % MOCK_IO_PAGE
    hi = -(-(iova + length) // MOCK_IO_PAGE) * MOCK_IO_PAGE
    pages = (hi - lo) // MOCK_IO_PAGE
    bits = np.packbits(np.ones(pages, dtype=np.uint8), bitorder="little")
    bitmap = np.zeros(-(-len(bits) // 8) * 8, dtype=np.uint8)
    bitmap[: len(bits)] = bits
    union = struct.pack("<IIQQQQQ", 0, 0, lo, hi - lo, MOCK_IO_PAGE, bitmap.ctypes.data, 0)
    buf = _cmd(IOMMU_TEST_OP_DIRTY, hwpt_id, union)
    sys.ioctl(iommufd, IOMMU_TEST_CMD, buf)
    return struct.unpack_from("<Q", buf, 16 + 40)[0]
