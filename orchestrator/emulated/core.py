"""drivers/vfio/vfio_main.c: VFIO_DEVICE_FEATURE dispatch and the core's per-feature checks.

The core validates and copies; the device model (its vfio_log_ops / mig_ops) decides.
Argument sizes are `feature.argsz - 8`, as the core passes them to its handlers. Any other
feature goes to the driver's device_feature op: vfio-pci models (mlx5, pds, no-logging) have
vfio_pci_core_ioctl_feature, whose LOW_POWER_* features take SET only; mtty has no such op
(ENOTTY). The power state itself is not modelled: a low-power SET that passes the checks is a
no-op here (its wakeup eventfd is not validated).
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable

from orchestrator.emulated.errors import kernel_error
from orchestrator.emulated.ioctl_arg import IoctlArg
from orchestrator.emulated.iova_bitmap import IovaBitmap
from orchestrator.emulated.migration import DataFile
from orchestrator.emulated.models.base import DeviceModel
from orchestrator.emulated.ranges import RangeTree, node_for
from orchestrator.emulated.runs import U64_MAX
from orchestrator.emulated.usermem import copy_from_user
from orchestrator.uapi import (
    VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
    VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY,
    VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP,
    VFIO_DEVICE_FEATURE_LOW_POWER_EXIT,
    VFIO_DEVICE_FEATURE_MASK,
    VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
    VFIO_DEVICE_FEATURE_MIGRATION,
    VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET,
    vfio_device_feature,
    vfio_device_feature_dma_logging_control,
    vfio_device_feature_dma_logging_range,
    vfio_device_feature_dma_logging_report,
    vfio_device_feature_mig_data_size,
    vfio_device_feature_mig_state,
    vfio_device_feature_migration,
)

DATA = ctypes.sizeof(vfio_device_feature)  # offset of data[] in the ioctl argument
_RANGE_SIZE = ctypes.sizeof(vfio_device_feature_dma_logging_range)
_GET, _SET, _PROBE = VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_SET, VFIO_DEVICE_FEATURE_PROBE

InstallFd = Callable[[DataFile], int]


def check_feature(flags: int, argsz: int, supported_ops: int, minsz: int) -> bool:
    """vfio_check_feature: False means "PROBE succeeded, stop here"; errors raise."""
    if flags & (_GET | _SET) & ~supported_ops:
        raise kernel_error(errno.EINVAL)
    if flags & _PROBE:
        return False
    if not flags & (_GET | _SET):
        raise kernel_error(errno.EINVAL)
    if argsz < minsz:
        raise kernel_error(errno.EINVAL)
    return True


def is_aligned(x: int, a: int) -> bool:
    """IS_ALIGNED on u64: a mask test, so page_size 0 accepts only 0."""
    return x & ((a - 1) & U64_MAX) == 0


class FeatureContext:
    """What a feature handler needs: the device, the user's argument, the kernel's limits."""

    def __init__(self, model: DeviceModel, arg: IoctlArg, log_max_ranges: int, install_fd: InstallFd) -> None:
        self.model = model
        self.arg = arg
        self.log_max_ranges = log_max_ranges
        self.install_fd = install_fd


def device_feature(ctx: FeatureContext) -> int:
    """vfio_ioctl_device_feature."""
    feature = ctx.arg.read_struct(vfio_device_feature)
    if feature.argsz < DATA:
        raise kernel_error(errno.EINVAL)
    if feature.flags & ~(VFIO_DEVICE_FEATURE_MASK | _GET | _SET | _PROBE):
        raise kernel_error(errno.EINVAL)
    if not feature.flags & _PROBE and feature.flags & _SET and feature.flags & _GET:
        raise kernel_error(errno.EINVAL)
    handler = _HANDLERS.get(feature.flags & VFIO_DEVICE_FEATURE_MASK)
    if handler is None:
        raise kernel_error(errno.ENOTTY)  # no device_feature op for anything else
    handler(ctx, feature.flags, feature.argsz - DATA)
    return 0


def _need_log_ops(ctx: FeatureContext) -> None:
    if not ctx.model.has_log_ops:
        raise kernel_error(errno.ENOTTY)


def _need_mig_ops(ctx: FeatureContext) -> None:
    if ctx.model.migration is None:
        raise kernel_error(errno.ENOTTY)


def _logging_start(ctx: FeatureContext, flags: int, argsz: int) -> None:
    _need_log_ops(ctx)
    if not check_feature(flags, argsz, _SET, ctypes.sizeof(vfio_device_feature_dma_logging_control)):
        return
    control = ctx.arg.read_struct(vfio_device_feature_dma_logging_control, DATA)
    if control.num_ranges == 0:
        raise kernel_error(errno.EINVAL)
    if control.num_ranges > ctx.log_max_ranges:
        raise kernel_error(errno.E2BIG)
    tree = RangeTree()
    for i in range(control.num_ranges):
        # One copy per range, checks in between: errno precedence follows the array order.
        rng = vfio_device_feature_dma_logging_range.from_buffer_copy(
            copy_from_user((control.ranges + i * _RANGE_SIZE) & U64_MAX, _RANGE_SIZE)
        )
        if not is_aligned(rng.iova, control.page_size) or not is_aligned(rng.length, control.page_size):
            raise kernel_error(errno.EINVAL)
        if rng.iova + rng.length > U64_MAX:
            raise kernel_error(errno.EOVERFLOW)
        node = node_for(rng.iova, rng.length)
        if tree.overlaps(node):
            raise kernel_error(errno.EINVAL)
        tree.insert(node)
    control.page_size = ctx.model.log_start(tree.in_order(), control.page_size)
    try:
        ctx.arg.write_struct(control, DATA)
    except OSError:
        ctx.model.log_stop()
        raise


def _logging_stop(ctx: FeatureContext, flags: int, argsz: int) -> None:
    _need_log_ops(ctx)
    if check_feature(flags, argsz, _SET, 0):
        ctx.model.log_stop()


def _logging_report(ctx: FeatureContext, flags: int, argsz: int) -> None:
    _need_log_ops(ctx)
    if not check_feature(flags, argsz, _GET, ctypes.sizeof(vfio_device_feature_dma_logging_report)):
        return
    report = ctx.arg.read_struct(vfio_device_feature_dma_logging_report, DATA)
    if report.page_size < 4096 or report.page_size & (report.page_size - 1):
        raise kernel_error(errno.EINVAL)
    if report.iova + report.length > U64_MAX:
        raise kernel_error(errno.EOVERFLOW)
    bitmap = IovaBitmap(report.iova, report.length, report.page_size, report.bitmap)
    ctx.model.log_read_and_clear(report.iova, report.length, bitmap)


def _migration(ctx: FeatureContext, flags: int, argsz: int) -> None:
    _need_mig_ops(ctx)
    if check_feature(flags, argsz, _GET, ctypes.sizeof(vfio_device_feature_migration)):
        ctx.arg.write_struct(vfio_device_feature_migration(ctx.model.migration_flags), DATA)


def _mig_device_state(ctx: FeatureContext, flags: int, argsz: int) -> None:
    _need_mig_ops(ctx)
    if not check_feature(flags, argsz, _GET | _SET, ctypes.sizeof(vfio_device_feature_mig_state)):
        return
    mig = ctx.arg.read_struct(vfio_device_feature_mig_state, DATA)
    migration = ctx.model.migration
    assert migration is not None
    mig.data_fd = -1
    if flags & _GET:
        mig.device_state = migration.get_state()
        ctx.arg.write_struct(mig, DATA)
        return
    try:
        data_file = migration.set_state(mig.device_state)
    except OSError:
        # The core still copies {requested_state, -1} back before returning the error.
        ctx.arg.write_struct(mig, DATA)
        raise
    if data_file is not None:
        mig.data_fd = ctx.install_fd(data_file)
    ctx.arg.write_struct(mig, DATA)


def _mig_data_size(ctx: FeatureContext, flags: int, argsz: int) -> None:
    _need_mig_ops(ctx)
    if check_feature(flags, argsz, _GET, ctypes.sizeof(vfio_device_feature_mig_data_size)):
        assert ctx.model.migration is not None
        ctx.arg.write_struct(vfio_device_feature_mig_data_size(ctx.model.migration.data_size()), DATA)


def _low_power(minsz: int) -> Callable[[FeatureContext, int, int], None]:
    """vfio_pci_core_pm_entry / _pm_entry_with_wakeup / _pm_exit: vfio_check_feature(SET)."""

    def handler(ctx: FeatureContext, flags: int, argsz: int) -> None:
        if not ctx.model.vfio_pci:
            raise kernel_error(errno.ENOTTY)
        if check_feature(flags, argsz, _SET, minsz):
            ctx.arg.read(DATA, minsz)

    return handler


_HANDLERS: dict[int, Callable[[FeatureContext, int, int], None]] = {
    VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY: _low_power(0),
    VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP: _low_power(8),  # {s32 eventfd, u32 reserved}
    VFIO_DEVICE_FEATURE_LOW_POWER_EXIT: _low_power(0),
    VFIO_DEVICE_FEATURE_MIGRATION: _migration,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE: _mig_device_state,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_START: _logging_start,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP: _logging_stop,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT: _logging_report,
    VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: _mig_data_size,
}
