"""What every emulated device shares: vfio_log_ops entry points, faults, migration, DMA.

Subclasses supply the driver-specific parts (`_start`, `_read_and_clear`); the
entry points here fix the order real drivers check things in: mlx5's (detach, then "already
active", then the hardware), which pds shares where it has the same checks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from errno import EINVAL, EIO
from typing import TYPE_CHECKING

from ...uapi import (
    VFIO_DEVICE_STATE_PRE_COPY,
    VFIO_DEVICE_STATE_RUNNING,
    VFIO_MIGRATION_P2P,
    VFIO_MIGRATION_STOP_COPY,
)
from ..errors import kernel_error
from ..dirtylog import UnitLog
from ..faults import Fault, FaultState
from ..iova_bitmap import IovaBitmap
from ..migration import MigrationDriver
from ..ranges import Node

if TYPE_CHECKING:
    from ..iommufd import Hwpt

DEFAULT_MAX_DATA_SIZE = 1 << 20
DMA_STATES = (VFIO_DEVICE_STATE_RUNNING, VFIO_DEVICE_STATE_PRE_COPY)


def require_pow2(name: str, value: int) -> int:
    if value <= 0 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")
    return value


class DeviceModel:
    """An emulated VFIO device. `has_log_ops` False means the driver registers no vfio_log_ops."""

    has_log_ops = True
    # mlx5 and pds refuse a second START and a REPORT while idle; mtty accepts anything.
    strict_log_state = True
    precopy_eos_errno: int | None = None

    def __init__(
        self,
        *,
        migration_flags: int = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P,
        device_data: bytes = bytes(32),
        max_data_size: int = DEFAULT_MAX_DATA_SIZE,
        iommu_dirty: bool = True,
        iommu_page_size: int = 4096,
        hang_timeout: float = 30.0,
    ) -> None:
        self._lock = threading.RLock()
        self._faults = FaultState(hang_timeout=hang_timeout)
        self._max_data_size = max_data_size
        self.device_data = device_data
        self.iommu_dirty = iommu_dirty
        self.iommu_page_size = require_pow2("iommu_page_size", iommu_page_size)
        self.attached_hwpt: Hwpt | None = None
        self.migration = (
            MigrationDriver(
                migration_flags,
                lambda: self.device_data,
                self._load_device_data,
                self._faults,
                self.precopy_eos_errno,
                max_data_size,
            )
            if migration_flags
            else None
        )
        self.logging_active = False
        self.tracked_ranges: list[tuple[int, int]] = []
        self.granted_page_size: int | None = None
        # The hardware log, created by trackers that really log (mlx5, pds) at START.
        self._log: UnitLog | None = None
        self.start_calls = self.stop_calls = self.report_calls = 0

    # -- introspection ----------------------------------------------------------------------

    @property
    def mig_state(self) -> int | None:
        return self.migration.state if self.migration else None

    @property
    def migration_flags(self) -> int:
        return self.migration.flags if self.migration else 0

    @property
    def report_hanging(self) -> bool:
        """True while a REPORT is blocked by Fault.REPORT_HANG."""
        return self._faults.report_hanging

    @property
    def device_data(self) -> bytes:
        return self._device_data

    @device_data.setter
    def device_data(self, data: bytes) -> None:
        if len(data) > self._max_data_size:
            raise ValueError(f"device_data larger than max_data_size ({self._max_data_size})")
        self._device_data = bytes(data)

    def _load_device_data(self, data: bytes) -> None:
        self.device_data = data

    # -- faults -----------------------------------------------------------------------------

    def inject(self, fault: Fault, *, hang_timeout: float | None = None) -> None:
        self._faults.inject(fault, hang_timeout)

    def reattach(self) -> None:
        """Undo Fault.DETACH."""
        self._faults.detached = False

    def release_hang(self) -> None:
        """Let a REPORT blocked by Fault.REPORT_HANG return (with EIO). Safe from any thread."""
        self._faults.release_hang()

    def fail_start(self, errno: int, count: int = 1) -> None:
        """The next `count` START calls reaching the driver fail with `errno`."""
        self._faults.start_failures.extend([errno] * count)

    def fail_transition(self, target_state: int, errno: int = EIO) -> None:
        """The next MIG_DEVICE_STATE arc into `target_state` fails with `errno`."""
        self._faults.transition_failures[int(target_state)] = errno

    # -- vfio_log_ops -----------------------------------------------------------------------

    def log_start(self, nodes: list[Node], page_size: int) -> int:
        """Start tracking the core-validated nodes (sorted by start); returns the page size."""
        with self._lock:
            self.start_calls += 1
            self._faults.check_attached()
            if self.strict_log_state and self.logging_active:
                raise kernel_error(EINVAL)
            self._faults.check_start()
            granted, tracked = self._start(nodes, page_size)
            self.granted_page_size = granted
            self.tracked_ranges = [(s, (last - s + 1) & ((1 << 64) - 1)) for s, last in tracked]
            self.logging_active = True
            return granted

    def log_stop(self) -> int:
        with self._lock:
            self.stop_calls += 1
            self._log = None
            self.logging_active = False
            self.tracked_ranges = []
            self.granted_page_size = None
            self._faults.sticky_eio = False
            return 0

    def log_read_and_clear(self, iova: int, length: int, bitmap: IovaBitmap) -> None:
        self.report_calls += 1
        self._faults.hang_if_armed()
        with self._lock:
            if self.strict_log_state and not self.logging_active:
                raise kernel_error(EINVAL)
            self._faults.check_attached()
            self._faults.check_report()
            self._read_and_clear(iova, length, bitmap)

    # -- what the device does -----------------------------------------------------------------

    def dma_write(self, iova: int, length: int) -> None:
        """The device writes [iova, iova+length): its tracker and its IOMMU domain see it."""
        if length <= 0:
            return
        with self._lock:
            if self.logging_active:
                self._log_dma(iova, iova + length)
            hwpt = self.attached_hwpt
        if hwpt is not None:
            hwpt.record_dma(iova, length)

    def dma(self, burst: Callable[[], list[tuple[int, int]]]) -> bool:
        """Run one DMA burst if the device may initiate DMA now; returns whether it ran.

        `burst` writes guest memory and returns the (iova, length) ranges it wrote; they are
        logged after the memory write, as hardware would. A device outside RUNNING/PRE_COPY is
        quiesced (the P2P, STOP and STOP_COPY states forbid new DMA), and the burst runs under
        the lock every state transition holds, so the state a transition captures is exactly
        what was written."""
        if self.migration is None:
            for iova, length in burst():
                self.dma_write(iova, length)
            return True
        with self.migration.lock:
            if self.migration.state not in DMA_STATES:
                return False
            for iova, length in burst():
                self.dma_write(iova, length)
            return True

    def release(self) -> None:
        """Last close of the device: tracking stops and migration returns to RUNNING."""
        self.log_stop()
        if self.migration:
            self.migration.reset()

    # -- driver specifics ---------------------------------------------------------------------

    def _start(self, nodes: list[Node], page_size: int) -> tuple[int, list[Node]]:
        """Returns (granted page size, tracked nodes)."""
        raise NotImplementedError

    def _read_and_clear(self, iova: int, length: int, bitmap: IovaBitmap) -> None:
        raise NotImplementedError

    def _log_dma(self, lo: int, hi: int) -> None:
        """Hardware logs writes inside its tracked ranges only; the rest is invisible."""
        if self._log is None:
            return
        for start, length in self.tracked_ranges:
            a, b = max(lo, start), min(hi, start + length)
            if a < b:
                self._log.mark(a, b)
