"""What every emulated device shares: vfio_log_ops entry points, faults, migration, DMA.

Subclasses supply the driver-specific parts (`_start`, `_read_and_clear`); the
entry points here fix the order real drivers check things in: mlx5's (detach, then "already
active", then the hardware), which pds shares where it has the same checks.

Two locks, as in the drivers: `state_mutex` is the driver's (mlx5 and pds `state_mutex`), held by
START, STOP, REPORT and every migration state change, so a REPORT stuck waiting for the firmware
blocks them all. DMA is the hardware's and never takes it; it serialises with state transitions
through the migration driver's transition lock only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from errno import EINVAL, EIO
from typing import TYPE_CHECKING

from orchestrator.emulated.dirtylog import UnitLog
from orchestrator.emulated.errors import kernel_error
from orchestrator.emulated.faults import Fault, FaultState
from orchestrator.emulated.iova_bitmap import DiscardedBitmap, IovaBitmap
from orchestrator.emulated.mig_stream import RecordStream, StreamFormat
from orchestrator.emulated.migration import MigrationDriver
from orchestrator.emulated.ranges import Node
from orchestrator.emulated.runs import U64_MAX
from orchestrator.uapi import (
    VFIO_DEVICE_STATE_PRE_COPY,
    VFIO_DEVICE_STATE_RUNNING,
    VFIO_MIGRATION_P2P,
    VFIO_MIGRATION_STOP_COPY,
)

if TYPE_CHECKING:
    from orchestrator.emulated.iommufd import Hwpt

DEFAULT_MAX_DATA_SIZE = 1 << 20
DMA_STATES = (VFIO_DEVICE_STATE_RUNNING, VFIO_DEVICE_STATE_PRE_COPY)


def ilog2(value: int) -> int:
    """Floor log2; -1 for 0, which any clamp to a minimum then absorbs."""
    return value.bit_length() - 1


def require_pow2(name: str, value: int) -> int:
    if value <= 0 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")
    return value


class DeviceModel:
    """An emulated VFIO device. `has_log_ops` False means the driver registers no vfio_log_ops."""

    has_log_ops = True
    # A vfio-pci variant driver (vfio_pci_core_ioctl_feature), not an mdev like mtty.
    vfio_pci = True
    # mlx5 and pds refuse a second START and a REPORT while idle; mtty accepts anything.
    strict_log_state = True
    precopy_eos_errno: int | None = None
    # The migration stream's layout after the header (mig_stream.py).
    stream: StreamFormat = RecordStream()

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
        self.state_mutex = threading.RLock()
        self._faults = FaultState(default_hang_timeout=hang_timeout)
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
                self.state_mutex,
                self.precopy_eos_errno,
                max_data_size,
                self.stream,
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
        if fault is Fault.DETACH:
            self._detach()
        else:
            self._faults.inject(fault, hang_timeout)

    def _detach(self) -> None:
        """mlx5vf_cmd_close_migratable then `mdev_detach`: set_tracker_error wakes a REPORT
        waiting on the firmware (it fails with EIO); under the state mutex the data fds are
        disabled and the tracker is freed, so its log is gone for good."""
        self._faults.release_hang()
        with self.state_mutex:
            if self.migration is not None:
                self.migration.disable_files()
            self._free_tracker()
            self._faults.detached = True

    def reattach(self) -> None:
        """The VF is enabled again (MLX5_PF_NOTIFY_ENABLE_VF): START works again, from scratch."""
        with self.state_mutex:
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
        with self.state_mutex:
            self.start_calls += 1
            self._faults.check_attached()
            if self.strict_log_state and self.logging_active:
                raise kernel_error(EINVAL)
            self._faults.check_start()
            granted, tracked = self._start(nodes, page_size)
            self.granted_page_size = granted
            self.tracked_ranges = [(s, (last - s + 1) & U64_MAX) for s, last in tracked]
            self.logging_active = True
            return granted

    def log_stop(self) -> int:
        with self.state_mutex:
            self.stop_calls += 1
            self._free_tracker()
            return 0

    def log_read_and_clear(self, iova: int, length: int, bitmap: IovaBitmap) -> None:
        """mlx5vf_tracker_read_and_clear's order: not active, detached, tracker error, then the
        firmware, which may hang or fail after consuming the queried part of its log."""
        with self.state_mutex:
            self.report_calls += 1
            if self.strict_log_state and not self.logging_active:
                raise kernel_error(EINVAL)
            self._faults.check_attached()
            self._faults.check_sticky()
            self._faults.hang_if_armed()
            if self._faults.take_eio_once():
                self._read_and_clear(iova, length, DiscardedBitmap())
                raise kernel_error(EIO)
            self._read_and_clear(iova, length, bitmap)

    def _free_tracker(self) -> None:
        """The driver frees its tracker (mlx5 _mlx5vf_free_page_tracker_resources, pds
        pds_vfio_dirty_disable): the log and any tracker error go with it."""
        self._log = None
        self.logging_active = False
        self.tracked_ranges = []
        self.granted_page_size = None
        self._faults.sticky_eio = False

    # -- what the device does -----------------------------------------------------------------

    def dma_write(self, iova: int, length: int) -> None:
        """The device writes [iova, iova+length): its tracker and its IOMMU domain see it.

        Hardware takes no driver lock: a REPORT stuck under the state mutex does not stop it."""
        if length <= 0:
            return
        if self.logging_active:
            self._log_dma(iova, iova + length)
        hwpt = self.attached_hwpt
        if hwpt is not None:
            hwpt.record_dma(iova, length)

    def dma(self, burst: Callable[[], list[tuple[int, int]]]) -> bool:
        """Run one DMA burst if the device may initiate DMA now; returns whether it ran.

        `burst` writes guest memory and returns the (iova, length) ranges it wrote; they are
        logged after the memory write, as hardware would. The uAPI lets a device that can tell
        P2P transactions apart stop only those in the *_P2P states; these devices cannot, so
        they stop all DMA there (which the uAPI allows): outside RUNNING/PRE_COPY the device is
        quiesced. The burst runs under the transition lock every state change holds, so the
        state a transition captures is exactly what was written."""
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
        log = self._log  # STOP may free it meanwhile: marking the old one is harmless
        if log is None:
            return
        for start, length in self.tracked_ranges:
            a, b = max(lo, start), min(hi, start + length)
            if a < b:
                log.mark(a, b)
