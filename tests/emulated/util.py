"""Raw-byte ioctl builders for driving the emulated kernel the way a C program would."""

from __future__ import annotations

import ctypes
import errno
import mmap
import struct
from collections.abc import Callable, Sequence

import numpy as np

from orchestrator import uapi

GET, SET, PROBE = uapi.VFIO_DEVICE_FEATURE_GET, uapi.VFIO_DEVICE_FEATURE_SET, uapi.VFIO_DEVICE_FEATURE_PROBE
START = uapi.VFIO_DEVICE_FEATURE_DMA_LOGGING_START
STOP = uapi.VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP
REPORT = uapi.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT
MIGRATION = uapi.VFIO_DEVICE_FEATURE_MIGRATION
MIG_DEVICE_STATE = uapi.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
MIG_DATA_SIZE = uapi.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE
FEATURE = uapi.VFIO_DEVICE_FEATURE


class UserMem:
    """A page-aligned anonymous mapping: user memory the kernel reaches through pointers."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.map = mmap.mmap(-1, max(size, 1))
        self._c = (ctypes.c_char * len(self.map)).from_buffer(self.map)
        self.addr = ctypes.addressof(self._c)

    def bytes(self, offset: int = 0, n: int | None = None) -> bytes:
        n = self.size - offset if n is None else n
        return self.map[offset : offset + n]

    def put(self, offset: int, data: bytes) -> None:
        self.map[offset : offset + len(data)] = data

    def bits(self, offset: int, nbits: int) -> np.ndarray:
        """Bit values (LSB-first) of the bitmap starting at `offset`."""
        raw = np.frombuffer(self.bytes(offset, (nbits + 7) // 8), dtype=np.uint8)
        return np.unpackbits(raw, bitorder="little")[:nbits]


_libc = ctypes.CDLL(None, use_errno=True)
_PROT_NONE = 0


class GuardedMem(UserMem):
    """`size` usable bytes ending exactly where an inaccessible page begins."""

    def __init__(self, size: int) -> None:
        pages = -(-size // mmap.PAGESIZE)
        super().__init__((pages + 1) * mmap.PAGESIZE)
        self.guard = self.addr + pages * mmap.PAGESIZE
        assert _libc.mprotect(ctypes.c_void_p(self.guard), mmap.PAGESIZE, _PROT_NONE) == 0
        self.start = self.guard - size  # usable bytes: [start, guard)

    def put_at_end(self, data: bytes) -> int:
        """Place data so it ends at the guard page; returns its address."""
        off = self.guard - self.addr - len(data)
        self.put(off, data)
        return self.addr + off


def feature(flags: int, payload: bytes = b"", argsz: int | None = None) -> bytearray:
    argsz = 8 + len(payload) if argsz is None else argsz
    return bytearray(struct.pack("<II", argsz, flags) + payload)


def ranges_mem(ranges: Sequence[tuple[int, int]]) -> UserMem:
    mem = UserMem(16 * max(len(ranges), 1))
    mem.put(0, b"".join(struct.pack("<QQ", iova, length) for iova, length in ranges))
    return mem


def control(page_size: int, num_ranges: int, ranges_ptr: int) -> bytes:
    return bytes(uapi.vfio_device_feature_dma_logging_control(page_size, num_ranges, 0, ranges_ptr))


def errno_of(fn: Callable[[], object]) -> int:
    try:
        fn()
    except OSError as e:
        return e.errno
    return 0


def do_start(kernel, fd: int, ranges: Sequence[tuple[int, int]], page_size: int = 4096) -> int:
    """START; returns the page size the kernel wrote back."""
    mem = ranges_mem(ranges)
    arg = feature(SET | START, control(page_size, len(ranges), mem.addr))
    kernel.ioctl(fd, FEATURE, arg)
    return uapi.vfio_device_feature_dma_logging_control.unpack(arg, 8).page_size


def do_stop(kernel, fd: int) -> None:
    kernel.ioctl(fd, FEATURE, feature(SET | STOP))


def report_arg(iova: int, length: int, page_size: int, bitmap: int) -> bytearray:
    return feature(GET | REPORT, bytes(uapi.vfio_device_feature_dma_logging_report(iova, length, page_size, bitmap)))


def do_report(
    kernel, fd: int, iova: int, length: int, page_size: int = 4096, mem: UserMem | None = None, offset: int = 0
) -> np.ndarray:
    """REPORT into a fresh (or given) buffer; returns the bits covering the range."""
    nbits = max(-(-length // page_size), 1)
    mem = mem or UserMem(offset + (nbits + 7) // 8 + 8)
    kernel.ioctl(fd, FEATURE, report_arg(iova, length, page_size, mem.addr + offset))
    return mem.bits(offset, nbits)


def mig_set(kernel, fd: int, state: int) -> int:
    arg = feature(SET | MIG_DEVICE_STATE, struct.pack("<Ii", state, -1))
    kernel.ioctl(fd, FEATURE, arg)
    return struct.unpack_from("<i", arg, 12)[0]


def mig_get(kernel, fd: int) -> int:
    arg = feature(GET | MIG_DEVICE_STATE, struct.pack("<Ii", 0, 0))
    kernel.ioctl(fd, FEATURE, arg)
    return struct.unpack_from("<I", arg, 8)[0]


def expect_errno(code: int, fn: Callable[[], object]) -> None:
    got = errno_of(fn)
    assert got == code, f"expected {errno.errorcode.get(code, code)}, got {errno.errorcode.get(got, got)}"
