"""The two kernels a differential case runs against, behind one interface.

`EmulatedLab` is `orchestrator.emulated` in this process; `RealLab` is the kernel this process
runs on, which must be the lab's (VFIO, IOMMUFD, the mtty sample and our dirtydev module: see
fixtures/realkernel/). Both hand out devices the same way: a VFIO cdev fd bound to a fresh
iommufd and attached to its IOAS, with the byte-level `Syscalls` to drive it. Everything a case
asserts on goes through those syscalls; only the "hardware" side (a device's DMA, injected
faults) differs, and `Device` hides it; so does `HwptRig` for IOMMU dirty tracking (the
iommufd selftest's mock domain on the real side, an emulated device's domain here).
"""

from __future__ import annotations

import ctypes
import enum
import itertools
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from orchestrator import uapi
from orchestrator.emulated import EmulatedKernel, Fault, Mlx5Like, MttySample, PdsLike
from orchestrator.vfio import RealSyscalls, Syscalls

from . import iommufd_test as T


class Model(enum.IntEnum):
    """Which driver's rules dirtydev follows (its debugfs `model`)."""

    MLX5 = 0
    PDS = 1


class Kind(enum.Enum):
    MTTY = "mtty"  # samples/vfio-mdev/mtty.c, type mtty-2: migration, no-op log ops
    DIRTYDEV = "dirtydev"  # fixtures/realkernel/dirtydev: an mlx5-like tracker that logs


@dataclass(frozen=True)
class Caps:
    """dirtydev's model and tracker capabilities (mlx5's pg_track_* caps, in bytes; pds uses
    max_ranges as its region count and nothing else)."""

    model: Model = Model.MLX5
    max_ranges: int = 4
    min_page_size: int = 4096
    max_page_size: int = 1 << 21
    min_addr_space: int = 1 << 12
    max_addr_space: int = 1 << 42


class Device(Protocol):
    fd: int
    iommufd: int
    dev_id: int
    ioas_id: int

    def dma(self, iova: int, length: int, fill: int | None = None) -> None:
        """The device writes [iova, iova+length) (filling it with `fill` through the IOAS when
        given); its tracker logs what it tracks."""

    def inject(self, fault: Fault) -> None: ...

    def reattach(self) -> None: ...

    def fail_start(self, code: int) -> None:
        """The next START reaching the driver fails with `code`."""


@dataclass
class HwptRig:
    """An IOAS with a dirty-tracking HWPT (`hwpt_id`) that a device is attached to, and a
    HWPT without dirty tracking (`plain_hwpt_id`) on the same IOAS. `dirty(iova, length)`:
    the device writes there, which sets the dirty bit of every IO page it touches (IO pages
    of 2 KiB: the selftest's mock domain, which the emulated device copies)."""

    iommufd: int
    ioas_id: int
    dev_id: int  # the device the HWPTs were allocated for
    hwpt_id: int
    plain_hwpt_id: int
    dirty: Callable[[int, int], object]
    memory: list[object] = field(default_factory=list)  # user memory mapped into the IOAS, kept alive


class Lab(Protocol):
    sys: Syscalls

    def hwpt(self) -> HwptRig: ...

    def device(self, kind: Kind, caps: Caps = Caps()) -> Device: ...

    def unbound(self, kind: Kind) -> int:
        """A fresh device's cdev fd, not bound to any iommufd."""

    def reopen(self, dev: Device) -> int:
        """Another cdev fd of the same device, not bound."""

    def scope(self) -> AbstractContextManager[None]:
        """Devices and fds made inside are released on leaving it (mtty has 24 ports)."""

    def iommufd(self) -> int: ...


def ioctl_struct(sys: Syscalls, fd: int, request: int, obj: ctypes.Structure) -> ctypes.Structure:
    """One ioctl on a struct argument; returns the struct as the kernel left it."""
    buf = bytearray(bytes(obj))
    sys.ioctl(fd, request, buf)
    return type(obj).from_buffer_copy(buf)


def attach(sys: Syscalls, fd: int, pt_id: int) -> None:
    ioctl_struct(sys, fd, uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, uapi.vfio_device_attach_iommufd_pt(argsz=12, pt_id=pt_id))


def bind(sys: Syscalls, fd: int, iommufd: int) -> tuple[int, int]:
    """BIND_IOMMUFD, IOAS_ALLOC, ATTACH_IOMMUFD_PT: what a cdev needs before anything else.
    Returns (dev_id, ioas_id)."""
    bound = ioctl_struct(
        sys, fd, uapi.VFIO_DEVICE_BIND_IOMMUFD, uapi.vfio_device_bind_iommufd(argsz=16, iommufd=iommufd)
    )
    ioas = ioctl_struct(sys, iommufd, uapi.IOMMU_IOAS_ALLOC, uapi.iommu_ioas_alloc(size=12))
    attach(sys, fd, ioas.out_ioas_id)
    return bound.out_devid, ioas.out_ioas_id


def hwpt_alloc(sys: Syscalls, iommufd: int, dev_id: int, ioas_id: int, dirty: bool) -> int:
    flags = uapi.IOMMU_HWPT_ALLOC_DIRTY_TRACKING if dirty else 0
    req = uapi.iommu_hwpt_alloc(size=ctypes.sizeof(uapi.iommu_hwpt_alloc), flags=flags, dev_id=dev_id, pt_id=ioas_id)
    return ioctl_struct(sys, iommufd, uapi.IOMMU_HWPT_ALLOC, req).out_hwpt_id


def map_user(sys: Syscalls, iommufd: int, ioas_id: int, addr: int, length: int, iova: int) -> None:
    """IOAS_MAP of user memory at a fixed IOVA, readable and writable."""
    flags = uapi.IOMMU_IOAS_MAP_FIXED_IOVA | uapi.IOMMU_IOAS_MAP_READABLE | uapi.IOMMU_IOAS_MAP_WRITEABLE
    ioctl_struct(
        sys,
        iommufd,
        uapi.IOMMU_IOAS_MAP,
        uapi.iommu_ioas_map(
            size=ctypes.sizeof(uapi.iommu_ioas_map),
            flags=flags,
            ioas_id=ioas_id,
            user_va=addr,
            length=length,
            iova=iova,
        ),
    )


# -- the emulated kernel ----------------------------------------------------------------------


@dataclass
class EmulatedDevice:
    fd: int
    iommufd: int
    dev_id: int
    ioas_id: int
    model: Mlx5Like | MttySample | PdsLike

    def dma(self, iova: int, length: int, fill: int | None = None) -> None:
        if fill is not None:
            raise NotImplementedError("the emulated lab has no memory behind its IOAS")
        self.model.dma_write(iova, length)

    def inject(self, fault: Fault) -> None:
        self.model.inject(fault)

    def reattach(self) -> None:
        self.model.reattach()

    def fail_start(self, code: int) -> None:
        self.model.fail_start(code)


class EmulatedLab:
    """The lab's Linux 6.12 as the emulation models it: a 4 KiB page, no cdev flags, no
    transparent huge pages, mtty as shipped."""

    def __init__(self) -> None:
        self.sys = EmulatedKernel(4096, cdev_flags=False, hugepage_size=None)

    def iommufd(self) -> int:
        return self.sys.open_iommufd()

    @staticmethod
    def _model(kind: Kind, caps: Caps) -> Mlx5Like | MttySample | PdsLike:
        if kind is Kind.MTTY:
            return MttySample(nr_ports=2)
        if caps.model is Model.PDS:
            return PdsLike(max_regions=caps.max_ranges, migration_flags=0)
        return Mlx5Like(
            max_ranges=caps.max_ranges,
            min_page_size=caps.min_page_size,
            max_page_size=caps.max_page_size,
            min_addr_space=caps.min_addr_space,
            max_addr_space=caps.max_addr_space,
            migration_flags=0,
        )

    def unbound(self, kind: Kind) -> int:
        return self.sys.open_device(self._model(kind, Caps()), cdev=True)

    def reopen(self, dev: EmulatedDevice) -> int:
        return self.sys.open_device(dev.model, cdev=True)

    def scope(self) -> AbstractContextManager[None]:
        return nullcontext()

    def hwpt(self) -> HwptRig:
        model = Mlx5Like(migration_flags=0, iommu_page_size=T.MOCK_IO_PAGE)
        fd = self.sys.open_device(model, cdev=True)
        iommufd = self.iommufd()
        dev_id, ioas_id = bind(self.sys, fd, iommufd)
        hwpt_id = hwpt_alloc(self.sys, iommufd, dev_id, ioas_id, dirty=True)
        plain = hwpt_alloc(self.sys, iommufd, dev_id, ioas_id, dirty=False)
        attach(self.sys, fd, hwpt_id)
        return HwptRig(iommufd, ioas_id, dev_id, hwpt_id, plain, model.dma_write)

    def device(self, kind: Kind, caps: Caps = Caps()) -> EmulatedDevice:
        model = self._model(kind, caps)
        fd = self.sys.open_device(model, cdev=True)
        iommufd = self.iommufd()
        return EmulatedDevice(fd, iommufd, *bind(self.sys, fd, iommufd), model)


# -- the real kernel --------------------------------------------------------------------------

MDEV_BUS = Path("/sys/class/mdev_bus")
MDEV_DEVICES = Path("/sys/bus/mdev/devices")
DIRTYDEV_DEBUGFS = Path("/sys/kernel/debug/dirtydev")
_MDEV_TYPE = {Kind.MTTY: ("mtty", "mtty-2"), Kind.DIRTYDEV: ("dirtydev", "dirtydev-1")}
_FAULT_COMMAND = {
    Fault.REPORT_EIO_ONCE: "eio_once",
    Fault.REPORT_EIO_STICKY: "eio_sticky",
    Fault.DETACH: "detach",
}
_serial = itertools.count(1)


@dataclass
class RealDevice:
    fd: int
    iommufd: int
    dev_id: int
    ioas_id: int
    uuid: str
    kind: Kind

    def _ctl(self, command: str) -> None:
        if self.kind is not Kind.DIRTYDEV:
            raise NotImplementedError(f"{self.kind.value} has no control file")
        (DIRTYDEV_DEBUGFS / self.uuid / "ctl").write_text(command)

    def dma(self, iova: int, length: int, fill: int | None = None) -> None:
        self._ctl(f"dma {iova:x} {length:x}" + ("" if fill is None else f" {fill:x}"))

    def inject(self, fault: Fault) -> None:
        self._ctl(_FAULT_COMMAND[fault])

    def reattach(self) -> None:
        self._ctl("reattach")

    def fail_start(self, code: int) -> None:
        self._ctl(f"fail_start {code}")


def _create_mdev(kind: Kind) -> str:
    """A fresh mdev of the kind (a new device has the driver's initial state); its uuid."""
    parent, mtype = _MDEV_TYPE[kind]
    uuid = f"{os.getpid():08x}-{next(_serial):04x}-4000-8000-000000000000"
    (MDEV_BUS / parent / "mdev_supported_types" / mtype / "create").write_text(uuid)
    return uuid


def _cdev_of(uuid: str) -> Path:
    (node,) = (MDEV_DEVICES / uuid / "vfio-dev").iterdir()
    return Path("/dev/vfio/devices") / node.name


class RealLab:
    """The running kernel. Devices are removed and fds closed by `close()`."""

    def __init__(self) -> None:
        self.sys = RealSyscalls()
        self._cleanup = ExitStack()

    def iommufd(self) -> int:
        fd = os.open("/dev/iommu", os.O_RDWR)
        self._cleanup.callback(os.close, fd)
        return fd

    def _open(self, kind: Kind, caps: Caps) -> tuple[str, int]:
        uuid = _create_mdev(kind)
        self._cleanup.callback((MDEV_DEVICES / uuid / "remove").write_text, "1")
        if kind is Kind.DIRTYDEV:
            for name, value in vars(caps).items():
                (DIRTYDEV_DEBUGFS / uuid / name).write_text(str(int(value)))
        fd = os.open(_cdev_of(uuid), os.O_RDWR)
        self._cleanup.callback(os.close, fd)
        return uuid, fd

    def unbound(self, kind: Kind) -> int:
        return self._open(kind, Caps())[1]

    def reopen(self, dev: RealDevice) -> int:
        fd = os.open(_cdev_of(dev.uuid), os.O_RDWR)
        self._cleanup.callback(os.close, fd)
        return fd

    @contextmanager
    def scope(self) -> Iterator[None]:
        outer, self._cleanup = self._cleanup, ExitStack()
        try:
            yield
        finally:
            inner, self._cleanup = self._cleanup, outer
            inner.close()

    def hwpt(self) -> HwptRig:
        """The selftest's iommufd_dirty_tracking fixture: a mock device on the IOAS to
        allocate the HWPTs with, and one attached to the dirty-tracking HWPT."""
        iommufd = self.iommufd()
        ioas_id = ioctl_struct(self.sys, iommufd, uapi.IOMMU_IOAS_ALLOC, uapi.iommu_ioas_alloc(size=12)).out_ioas_id
        _, _, idev_id = T.mock_domain(self.sys, iommufd, ioas_id)
        hwpt_id = hwpt_alloc(self.sys, iommufd, idev_id, ioas_id, dirty=True)
        plain = hwpt_alloc(self.sys, iommufd, idev_id, ioas_id, dirty=False)
        T.mock_domain(self.sys, iommufd, hwpt_id)
        return HwptRig(
            iommufd,
            ioas_id,
            idev_id,
            hwpt_id,
            plain,
            lambda iova, length: T.set_dirty(self.sys, iommufd, hwpt_id, iova, length),
        )

    def device(self, kind: Kind, caps: Caps = Caps()) -> RealDevice:
        uuid, fd = self._open(kind, caps)
        iommufd = self.iommufd()
        return RealDevice(fd, iommufd, *bind(self.sys, fd, iommufd), uuid, kind)

    def close(self) -> None:
        self._cleanup.close()


@contextmanager
def real_lab() -> Iterator[RealLab]:
    lab = RealLab()
    try:
        yield lab
    finally:
        lab.close()
