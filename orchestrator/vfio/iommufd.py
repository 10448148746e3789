"""A typed client of an IOMMUFD hardware page table (HWPT) for IOMMU dirty tracking."""

from __future__ import annotations

import ctypes

import numpy as np

from orchestrator import uapi as U
from orchestrator.vfio.device import check_out_bitmap, check_span
from orchestrator.vfio.errors import VfioUsageError, from_oserror
from orchestrator.vfio.ranges import is_pow2
from orchestrator.vfio.syscalls import Syscalls

IOVA_ALIGNMENT = 4096  # the IOAS minimum on 4 KiB hosts; some hosts use 16 or 64 KiB


class IommufdHwpt:
    """One dirty-tracking-capable HWPT on an iommufd."""

    def __init__(
        self,
        iommufd: int,
        hwpt_id: int,
        syscalls: Syscalls,
        name: str | None = None,
        iova_alignment: int = IOVA_ALIGNMENT,
    ) -> None:
        """`iova_alignment`: the IOAS's (iopt->iova_alignment); queries must be aligned to it."""
        self.iommufd = iommufd
        self.hwpt_id = hwpt_id
        self.sys = syscalls
        self.name = name or f"hwpt{hwpt_id}"
        self.iova_alignment = iova_alignment

    def _ioctl(self, op: str, request: int, struct: U._Le) -> bytearray:
        buf = bytearray(struct.pack())
        try:
            self.sys.ioctl(self.iommufd, request, buf)
        except OSError as exc:
            raise from_oserror(op, exc, self.name) from None
        return buf

    @classmethod
    def alloc(
        cls, iommufd: int, dev_id: int, pt_id: int, syscalls: Syscalls, iova_alignment: int = IOVA_ALIGNMENT
    ) -> IommufdHwpt:
        """IOMMU_HWPT_ALLOC with DIRTY_TRACKING: fails (EOPNOTSUPP) when the device's IOMMU
        cannot track dirty pages, which is how capability is enforced."""
        req = U.iommu_hwpt_alloc(
            size=ctypes.sizeof(U.iommu_hwpt_alloc),
            flags=U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
            dev_id=dev_id,
            pt_id=pt_id,
            data_type=U.IOMMU_HWPT_DATA_NONE,
        )
        buf = bytearray(req.pack())
        try:
            syscalls.ioctl(iommufd, U.IOMMU_HWPT_ALLOC, buf)
        except OSError as exc:
            raise from_oserror("IOMMU_HWPT_ALLOC", exc, f"dev {dev_id}") from None
        return cls(iommufd, U.iommu_hwpt_alloc.unpack(buf).out_hwpt_id, syscalls, iova_alignment=iova_alignment)

    @staticmethod
    def dirty_capable(iommufd: int, dev_id: int, syscalls: Syscalls) -> bool:
        req = U.iommu_hw_info(size=ctypes.sizeof(U.iommu_hw_info), dev_id=dev_id)
        buf = bytearray(req.pack())
        try:
            syscalls.ioctl(iommufd, U.IOMMU_GET_HW_INFO, buf)
        except OSError as exc:
            raise from_oserror("IOMMU_GET_HW_INFO", exc, f"dev {dev_id}") from None
        return bool(U.iommu_hw_info.unpack(buf).out_capabilities & U.IOMMU_HW_CAP_DIRTY_TRACKING)

    def set_dirty_tracking(self, enable: bool) -> None:
        """Enabling clears every dirty bit first, so tracking starts from a clean snapshot."""
        self._ioctl(
            "IOMMU_HWPT_SET_DIRTY_TRACKING",
            U.IOMMU_HWPT_SET_DIRTY_TRACKING,
            U.iommu_hwpt_set_dirty_tracking(
                size=ctypes.sizeof(U.iommu_hwpt_set_dirty_tracking),
                flags=U.IOMMU_HWPT_DIRTY_TRACKING_ENABLE if enable else 0,
                hwpt_id=self.hwpt_id,
            ),
        )

    def get_dirty_bitmap(self, iova: int, length: int, page_size: int, out: np.ndarray, no_clear: bool = False) -> None:
        """OR the dirty bits of [iova, iova+length) into `out` (bit k = iova + k*page_size).
        The kernel requires iova and length aligned to both the IOAS alignment and page_size;
        it stops silently at the first unmapped gap, so query one mapped area at a time;
        NO_CLEAR reads without clearing (used before an unmap)."""
        what = f"{self.name}: IOMMU_HWPT_GET_DIRTY_BITMAP"
        check_span(iova, length, what)
        if not is_pow2(page_size):
            raise VfioUsageError(f"{what}: page size {page_size!r} must be a power of two")
        align = max(page_size, self.iova_alignment)
        if iova % align or length % align:
            raise VfioUsageError(f"{what}: range {iova:#x}+{length:#x} is not aligned to {align:#x}")
        check_out_bitmap(out, length // page_size, what)
        self._ioctl(
            "IOMMU_HWPT_GET_DIRTY_BITMAP",
            U.IOMMU_HWPT_GET_DIRTY_BITMAP,
            U.iommu_hwpt_get_dirty_bitmap(
                size=ctypes.sizeof(U.iommu_hwpt_get_dirty_bitmap),
                hwpt_id=self.hwpt_id,
                flags=U.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR if no_clear else 0,
                iova=iova,
                length=length,
                page_size=page_size,
                data=out.ctypes.data,
            ),
        )
