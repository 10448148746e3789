"""pds-like tracker (drivers/vfio/pci/pds/dirty.c): per-region seq/ack bitmaps on the device.

START (pds_vfio_dirty_enable): each region gets `page_count = DIV_ROUND_UP(size, page_size)`
(a u32) and the device tracks it in pages of `1 << ilog2(page_size)` bytes; the driver keeps
`region.size = page_count * page_size` and `bmp_bytes = page_count / 8` (rounded down). After
each region, the last included, the running device bitmap offset (the sum of bmp_bytes) must
be a multiple of 8 bytes: EINVAL otherwise, so every region needs a multiple of 64 pages. The
page size is used as given, power of two or not: the driver reads device bit i as
[start + i*page_size, +page_size) while the device sets it for [start + (i << log2), ...).

REPORT offsets: the driver reads the region's bitmap from byte
`bmp_offset = DIV_ROUND_UP((iova - region.start) / page_size, 8)` for
`bmp_bytes = ALIGN(DIV_ROUND_UP(length / page_size, 8), 8)` bytes and acks what it read. So a
REPORT whose iova is not a multiple of 8 pages from the region start skips the pages up to the
rounded-up byte (they stay dirty and surface in a later REPORT that starts at or before them),
and the window then reaches past the end of the requested range by the same amount: pages
there are reported into bits the bitmap drops (beyond its last byte) and acked, i.e. lost. That
is the arithmetic of the upstream driver; reporting at region.start + k*64 pages avoids it.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any

from orchestrator.emulated.dirtylog import UnitLog
from orchestrator.emulated.errors import kernel_error
from orchestrator.emulated.iova_bitmap import IovaBitmap
from orchestrator.emulated.models.base import DeviceModel, ilog2
from orchestrator.emulated.ranges import Node, combine_iova_ranges
from orchestrator.emulated.runs import U64_MAX
from orchestrator.uapi import VFIO_MIGRATION_P2P, VFIO_MIGRATION_STOP_COPY

_U32_MAX = 0xFFFF_FFFF


def _div_round_up(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(eq=False)
class _Region:
    """A pds_vfio_region and the device's seq bitmap for it (units of the device page)."""

    start: int
    page_count: int
    page_size: int
    log: UnitLog = field(repr=False)

    @property
    def size(self) -> int:
        return self.page_count * self.page_size & U64_MAX

    @property
    def bmp_bytes(self) -> int:
        return self.page_count // 8

    @property
    def device_end(self) -> int:
        """One past the last byte the device tracks: page_count of its own pages."""
        return self.start + (self.page_count << self.log.shift)


class PdsLike(DeviceModel):
    """`preexisting_regions` is the device's num_regions before START (non-zero: EEXIST)."""

    def __init__(
        self,
        *,
        max_regions: int = 8,
        preexisting_regions: int = 0,
        migration_flags: int = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P,
        **kwargs: Any,
    ) -> None:
        super().__init__(migration_flags=migration_flags, **kwargs)
        self.max_regions = max_regions
        self.preexisting_regions = preexisting_regions
        self._regions: list[_Region] = []

    def _start(self, nodes: list[Node], page_size: int) -> tuple[int, list[Node]]:
        if self.preexisting_regions:
            raise kernel_error(errno.EEXIST)
        if self.max_regions == 0:
            raise kernel_error(errno.EOPNOTSUPP)
        if page_size == 0:
            # Only the (0, 0) range passes the core with page size 0, and the driver's
            # DIV_ROUND_UP by it is a divide error in the kernel; refused here instead.
            raise kernel_error(errno.EINVAL)
        regions, dev_bmp_offset_byte = [], 0
        for start, last in combine_iova_ranges(nodes, self.max_regions):
            page_count = _div_round_up((last - start + 1) & U64_MAX, page_size) & _U32_MAX
            regions.append(_Region(start, page_count, page_size, UnitLog(ilog2(page_size))))
            dev_bmp_offset_byte += page_count // 8
            if dev_bmp_offset_byte % 8:
                raise kernel_error(errno.EINVAL)  # "Device bitmap offset is mis-aligned"
        self._regions = regions
        return page_size, [(r.start, r.device_end - 1) for r in regions]

    def _free_tracker(self) -> None:
        super()._free_tracker()
        self._regions = []

    def _log_dma(self, lo: int, hi: int) -> None:
        for region in self._regions:
            a, b = max(lo, region.start), min(hi, region.device_end)
            if a < b:
                region.log.mark(a - region.start, b - region.start)

    def _read_and_clear(self, iova: int, length: int, bitmap: IovaBitmap) -> None:
        """pds_vfio_dirty_sync: its checks in order, then read seq, report seq ^ ack, ack."""
        region = next((r for r in self._regions if r.start <= iova < r.start + r.size), None)
        if region is None:
            raise kernel_error(errno.EINVAL)
        page_size = region.page_size
        bitmap_size = _div_round_up(_div_round_up(length, page_size), 64) * 8
        if length == 0 or iova - region.start + length > region.size:
            raise kernel_error(errno.EINVAL)
        bmp_bytes = _div_round_up(_div_round_up(length // page_size, 8), 8) * 8
        if bmp_bytes != bitmap_size or bmp_bytes > region.bmp_bytes:
            raise kernel_error(errno.EINVAL)
        lo_bit = _div_round_up((iova - region.start) // page_size, 8) * 8
        hi_bit = min(lo_bit + bmp_bytes * 8, region.page_count)
        shift = region.log.shift
        first, last = region.log.take(lo_bit << shift, hi_bit << shift)
        bitmap.set_units(first, last, page_size, base=region.start)
