"""mlx5-like tracker (drivers/vfio/pci/mlx5/cmd.c): firmware page tracker with capability limits."""

from __future__ import annotations

import errno
from typing import Any

from orchestrator.emulated.dirtylog import UnitLog
from orchestrator.emulated.errors import kernel_error
from orchestrator.emulated.iova_bitmap import IovaBitmap
from orchestrator.emulated.models.base import DeviceModel, ilog2, require_pow2
from orchestrator.emulated.ranges import Node, combine_iova_ranges
from orchestrator.emulated.runs import U64_MAX
from orchestrator.uapi import VFIO_MIGRATION_P2P, VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY


class Mlx5Like(DeviceModel):
    """Caps are the firmware's pg_track_* capabilities, given in bytes (powers of two)."""

    precopy_eos_errno = errno.ENOMSG

    def __init__(
        self,
        *,
        max_ranges: int = 4,
        min_page_size: int = 4096,
        max_page_size: int = 1 << 21,
        min_addr_space: int = 1 << 12,
        max_addr_space: int = 1 << 42,
        migration_flags: int = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P | VFIO_MIGRATION_PRE_COPY,
        **kwargs: Any,
    ) -> None:
        super().__init__(migration_flags=migration_flags, **kwargs)
        if max_ranges < 1:
            raise ValueError("max_ranges must be at least 1")
        self.max_ranges = max_ranges
        self.log_min_page_size = ilog2(require_pow2("min_page_size", min_page_size))
        self.log_max_page_size = ilog2(require_pow2("max_page_size", max_page_size))
        self.log_min_addr_space = ilog2(require_pow2("min_addr_space", min_addr_space))
        self.log_max_addr_space = ilog2(require_pow2("max_addr_space", max_addr_space))

    def _start(self, nodes: list[Node], page_size: int) -> tuple[int, list[Node]]:
        log_page = min(max(ilog2(page_size), self.log_min_page_size), self.log_max_page_size)
        tracked = combine_iova_ranges(nodes, self.max_ranges)
        # Merged gaps count: the firmware is told the address space the ranges span.
        total = sum((last - start + 1) & U64_MAX for start, last in tracked) & U64_MAX
        log_addr_space = (total - 1).bit_length() if total else -1  # ilog2(roundup_pow_of_two)
        if not self.log_min_addr_space <= log_addr_space <= self.log_max_addr_space:
            raise kernel_error(errno.EOPNOTSUPP)
        self._log = UnitLog(log_page)
        return 1 << log_page, tracked

    def _read_and_clear(self, iova: int, length: int, bitmap: IovaBitmap) -> None:
        """The firmware reports each dirty page address it holds in the range, and forgets it."""
        assert self._log is not None
        first, last = self._log.take(iova, iova + length)
        bitmap.set_units(first, last, 1 << self._log.shift)
