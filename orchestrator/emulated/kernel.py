"""The emulated kernel: an fd table behind the byte-level `Syscalls` seam.

Device fds, migration data fds and iommufd fds live in one table, numbered like a process's
fds (lowest free from 3), so client code cannot tell this from the real syscalls.

Not every ioctl is emulated. A device fd implements VFIO_DEVICE_FEATURE (the features in
core.py) and the cdev BIND/ATTACH/DETACH_IOMMUFD_PT; a saving data fd implements
VFIO_MIG_GET_PRECOPY_INFO; /dev/iommu implements IOAS_ALLOC, IOAS_MAP, HWPT_ALLOC,
GET_HW_INFO and the two dirty-tracking commands. Anything else is ENOTTY, including ioctls a
real kernel implements (VFIO_DEVICE_GET_INFO, GET_REGION_INFO, RESET, IOMMU_DESTROY,
IOAS_UNMAP, ...), so tests of ENOTTY use request numbers no kernel knows.
"""

from __future__ import annotations

import errno
import threading
from typing import Protocol

from orchestrator.emulated.device_file import DeviceFile
from orchestrator.emulated.errors import kernel_error
from orchestrator.emulated.iommufd import Iommufd
from orchestrator.emulated.models.base import DeviceModel
from orchestrator.uapi import log_max_ranges


class KernelFile(Protocol):
    def ioctl(self, request: int, arg: bytearray) -> int: ...
    def read(self, n: int) -> bytes: ...
    def write(self, data: bytes) -> int: ...
    def release(self) -> None: ...


class EmulatedKernel:
    """`page_size` is the kernel's PAGE_SIZE: it sets LOG_MAX_RANGES and the IOAS alignment.

    `cdev_flags`: the cdev BIND/ATTACH/DETACH ioctls know their flags (BIND_FLAG_TOKEN,
    ATTACH/DETACH_PASID), as recent kernels do. False is Linux 6.12 (the real-kernel lab's),
    where each of them requires flags == 0 and any flag is EINVAL.

    `hugepage_size`: HPAGE_SIZE of a kernel with transparent huge pages (distribution
    kernels), which caps the alignment of IOVAs IOAS_MAP chooses; None for a kernel without
    (the lab's), where the cap is `page_size`."""

    def __init__(self, page_size: int = 4096, cdev_flags: bool = True, hugepage_size: int | None = 2 << 20) -> None:
        self.page_size = page_size
        self.cdev_flags = cdev_flags
        self.hugepage_size = hugepage_size
        self.log_max_ranges = log_max_ranges(page_size)
        self._files: dict[int, KernelFile] = {}
        self._open_count: dict[int, int] = {}  # id(model) -> open device fds
        self._lock = threading.Lock()

    # -- opening ------------------------------------------------------------------------------

    def install(self, file: KernelFile) -> int:
        with self._lock:
            fd = 3
            while fd in self._files:
                fd += 1
            self._files[fd] = file
            return fd

    def open_device(self, model: DeviceModel, cdev: bool = False) -> int:
        """Open the device as a group-obtained fd, or as a cdev that must BIND first."""
        with self._lock:
            self._open_count[id(model)] = self._open_count.get(id(model), 0) + 1
        return self.install(DeviceFile(self, model, cdev))

    def open_iommufd(self) -> int:
        return self.install(Iommufd(self.page_size, self.hugepage_size or self.page_size))

    # -- lookups ------------------------------------------------------------------------------

    def _file(self, fd: int) -> KernelFile:
        with self._lock:
            file = self._files.get(fd)
        if file is None:
            raise kernel_error(errno.EBADF)
        return file

    def device(self, fd: int) -> DeviceModel:
        file = self._file(fd)
        if not isinstance(file, DeviceFile):
            raise kernel_error(errno.EBADF)
        return file.model

    def iommufd(self, fd: int) -> Iommufd:
        file = self._file(fd)
        if not isinstance(file, Iommufd):
            raise kernel_error(errno.EBADFD)  # iommufd_ctx_from_fd on a foreign file
        return file

    def device_files(self, model: DeviceModel) -> list[DeviceFile]:
        """Every open fd of the device, group-obtained or cdev."""
        with self._lock:
            return [f for f in self._files.values() if isinstance(f, DeviceFile) and f.model is model]

    def device_closed(self, model: DeviceModel) -> None:
        with self._lock:
            left = self._open_count[id(model)] = self._open_count[id(model)] - 1
            if left == 0:
                del self._open_count[id(model)]
        if left == 0:
            model.release()

    # -- Syscalls -----------------------------------------------------------------------------

    def ioctl(self, fd: int, request: int, arg: bytearray) -> int:
        return self._file(fd).ioctl(request, arg)

    def read(self, fd: int, n: int) -> bytes:
        return self._file(fd).read(n)

    def write(self, fd: int, data: bytes) -> int:
        return self._file(fd).write(data)

    def close(self, fd: int) -> None:
        with self._lock:
            file = self._files.pop(fd, None)
        if file is None:
            raise kernel_error(errno.EBADF)
        file.release()
