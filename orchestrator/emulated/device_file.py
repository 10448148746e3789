"""An open VFIO device fd (vfio_device_fops): ioctl dispatch, cdev binding, release.

A cdev fd (/dev/vfio/devices/vfioN) grants nothing until VFIO_DEVICE_BIND_IOMMUFD succeeds:
every other ioctl, read and write is EINVAL. Only one fd of a device can be bound (the core's
open_count: a second cdev's BIND is EINVAL), and none while the device's group is open (EBUSY).
A group-obtained fd is usable at once and has no iommufd ioctls (they fall through to the driver,
which does not know them: ENOTTY).

Implemented: VFIO_DEVICE_FEATURE and the cdev BIND/ATTACH/DETACH ioctls. Everything else a real
vfio-pci driver answers (GET_INFO, GET_REGION_INFO, GET_IRQ_INFO, SET_IRQS, RESET, ...) is
ENOTTY here, and so are device reads and writes (EINVAL): no regions are emulated.
"""

from __future__ import annotations

import ctypes
import errno
from typing import TYPE_CHECKING

from orchestrator.emulated.core import FeatureContext, device_feature
from orchestrator.emulated.errors import kernel_error
from orchestrator.emulated.ioctl_arg import IoctlArg, offsetofend
from orchestrator.emulated.iommufd import Iommufd, IommufdDevice
from orchestrator.emulated.models.base import DeviceModel
from orchestrator.emulated.usermem import copy_from_user
from orchestrator.uapi import (
    VFIO_DEVICE_ATTACH_IOMMUFD_PT,
    VFIO_DEVICE_ATTACH_PASID,
    VFIO_DEVICE_BIND_FLAG_TOKEN,
    VFIO_DEVICE_BIND_IOMMUFD,
    VFIO_DEVICE_DETACH_IOMMUFD_PT,
    VFIO_DEVICE_DETACH_PASID,
    VFIO_DEVICE_FEATURE,
    vfio_device_attach_iommufd_pt,
    vfio_device_bind_iommufd,
    vfio_device_detach_iommufd_pt,
)

if TYPE_CHECKING:
    from orchestrator.emulated.kernel import EmulatedKernel

_UUID_SIZE = 16


class DeviceFile:
    def __init__(self, kernel: EmulatedKernel, model: DeviceModel, cdev: bool) -> None:
        self.kernel = kernel
        self.model = model
        self.cdev = cdev
        self.iommufd: Iommufd | None = None
        self.idev: IommufdDevice | None = None

    @property
    def access_granted(self) -> bool:
        return not self.cdev or self.idev is not None

    def ioctl(self, request: int, arg: bytearray) -> int:
        if request == VFIO_DEVICE_BIND_IOMMUFD:
            return self._bind(IoctlArg(arg))
        if not self.access_granted:
            raise kernel_error(errno.EINVAL)
        if self.cdev and request == VFIO_DEVICE_ATTACH_IOMMUFD_PT:
            return self._attach(IoctlArg(arg))
        if self.cdev and request == VFIO_DEVICE_DETACH_IOMMUFD_PT:
            return self._detach(IoctlArg(arg))
        if request == VFIO_DEVICE_FEATURE:
            ctx = FeatureContext(self.model, IoctlArg(arg), self.kernel.log_max_ranges, self.kernel.install)
            return device_feature(ctx)
        raise kernel_error(errno.ENOTTY)

    def read(self, n: int) -> bytes:
        """Region access is not emulated: EINVAL, which is what vfio-pci returns for an offset
        in no region and what an unbound cdev returns for any access."""
        raise kernel_error(errno.EINVAL)

    def write(self, data: bytes) -> int:
        raise kernel_error(errno.EINVAL)

    def release(self) -> None:
        if self.iommufd is not None and self.idev is not None:
            self.iommufd.unbind(self.idev)
        self.kernel.device_closed(self.model)

    def _known(self, flags: int) -> int:
        """The flags this kernel's cdev ioctls accept: none before they grew any."""
        return flags if self.kernel.cdev_flags else 0

    def _bind(self, user: IoctlArg) -> int:
        minsz = offsetofend(vfio_device_bind_iommufd, "out_devid")
        bind = user.read_prefix(vfio_device_bind_iommufd, minsz)
        if bind.argsz < minsz or bind.flags & ~self._known(VFIO_DEVICE_BIND_FLAG_TOKEN) or bind.iommufd < 0:
            raise kernel_error(errno.EINVAL)
        if not self.cdev or self.idev is not None:
            raise kernel_error(errno.EINVAL)  # group fds never bind; "cannot be bound twice"
        others = [f for f in self.kernel.device_files(self.model) if f is not self]
        if any(not f.cdev for f in others):
            raise kernel_error(errno.EBUSY)  # vfio_device_block_group: the group is open
        if bind.flags & VFIO_DEVICE_BIND_FLAG_TOKEN:
            if bind.argsz < ctypes.sizeof(vfio_device_bind_iommufd):
                raise kernel_error(errno.EINVAL)
            ptr = int.from_bytes(user.read(vfio_device_bind_iommufd.token_uuid_ptr.offset, 8), "little")
            copy_from_user(ptr, _UUID_SIZE)  # the VF token is read; no VF here checks it
        ictx = self.kernel.iommufd(bind.iommufd)
        if any(f.access_granted for f in others):
            raise kernel_error(errno.EINVAL)  # vfio_df_open: a cdev must be the device's only opener
        self.iommufd, self.idev = ictx, ictx.bind(self.model)
        user.write(vfio_device_bind_iommufd.out_devid.offset, self.idev.id.to_bytes(4, "little"))
        return 0

    def _attach(self, user: IoctlArg) -> int:
        minsz = offsetofend(vfio_device_attach_iommufd_pt, "pt_id")
        attach = user.read_prefix(vfio_device_attach_iommufd_pt, minsz)
        if attach.argsz < minsz or attach.flags & ~self._known(VFIO_DEVICE_ATTACH_PASID):
            raise kernel_error(errno.EINVAL)
        if attach.flags & VFIO_DEVICE_ATTACH_PASID:
            raise kernel_error(errno.EOPNOTSUPP)  # no pasid_attach_ioas on these devices
        assert self.iommufd is not None and self.idev is not None
        pt_id = self.iommufd.attach(self.idev, attach.pt_id)
        user.write(vfio_device_attach_iommufd_pt.pt_id.offset, pt_id.to_bytes(4, "little"))
        return 0

    def _detach(self, user: IoctlArg) -> int:
        minsz = offsetofend(vfio_device_detach_iommufd_pt, "flags")
        detach = user.read_prefix(vfio_device_detach_iommufd_pt, minsz)
        if detach.argsz < minsz or detach.flags & ~self._known(VFIO_DEVICE_DETACH_PASID):
            raise kernel_error(errno.EINVAL)
        if detach.flags & VFIO_DEVICE_DETACH_PASID:
            raise kernel_error(errno.EOPNOTSUPP)
        assert self.iommufd is not None and self.idev is not None
        self.iommufd.detach(self.idev)
        return 0
