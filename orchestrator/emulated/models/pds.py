"""pds-like tracker (drivers/vfio/pci/pds/dirty.c): per-region seq/ack bitmaps on the device.

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
from typing import Any

from ...uapi import VFIO_MIGRATION_P2P, VFIO_MIGRATION_STOP_COPY
from ..dirtylog import UnitLog
from ..errors import kernel_error
from ..iova_bitmap import IovaBitmap
from ..ranges import Node, combine_iova_ranges
from ..runs import U64_MAX
from .base import DeviceModel


def _div_round_up(a: int, b: int) -> int:
    return -(-a // b)


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
        self._regions: list[tuple[int, int]] = []  # (start, page_count)

    def _start(self, nodes: list[Node], page_size: int) -> tuple[int, list[Node]]:
        if self.preexisting_regions:
            raise kernel_error(errno.EEXIST)
        if self.max_regions == 0:
            raise kernel_error(errno.EOPNOTSUPP)
        # The device is given page_size_log2, so a size that is not a power of two cannot be
        # expressed; we refuse it (upstream divides by it unchecked).
        if page_size <= 0 or page_size & (page_size - 1):
            raise kernel_error(errno.EINVAL)
        tracked = nodes if len(nodes) <= self.max_regions else combine_iova_ranges(nodes, self.max_regions)
        regions, dev_bmp_offset_byte = [], 0
        for start, last in tracked:
            if dev_bmp_offset_byte % 8:
                raise kernel_error(errno.EINVAL)  # "Device bitmap offset is mis-aligned"
            page_count = _div_round_up((last - start + 1) & U64_MAX, page_size)
            regions.append((start, page_count))
            dev_bmp_offset_byte += page_count // 8
        self._regions = regions
        self._log = UnitLog(page_size.bit_length() - 1)
        return page_size, tracked

    def _read_and_clear(self, iova: int, length: int, bitmap: IovaBitmap) -> None:
        assert self._log is not None
        page_size = 1 << self._log.shift
        region = next(((s, n) for s, n in self._regions if s <= iova < s + n * page_size), None)
        if region is None:
            raise kernel_error(errno.EINVAL)
        start, page_count = region
        if length == 0 or iova - start + length > page_count * page_size:
            raise kernel_error(errno.EINVAL)
        bitmap_size = _div_round_up(_div_round_up(length, page_size), 64) * 8
        bmp_bytes = _div_round_up(_div_round_up(length // page_size, 8), 8) * 8
        if bmp_bytes != bitmap_size or bmp_bytes > _div_round_up(page_count, 64) * 8:
            raise kernel_error(errno.EINVAL)
        bmp_offset = _div_round_up((iova - start) // page_size, 8)
        lo_page = bmp_offset * 8
        hi_page = min(lo_page + bmp_bytes * 8, page_count)
        first, last = self._log.take(start + lo_page * page_size, start + hi_page * page_size)
        bitmap.set_units(first, last, self._log.shift)
