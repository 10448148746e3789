"""A typed client of one VFIO device fd: DMA logging and migration v2.

Every call validates its input first (a clear `VfioUsageError` before any ioctl), then builds
the exact bytes a C caller would pass — `struct vfio_device_feature` header plus payload, user
pointers as raw addresses — and hands them to the `Syscalls` seam.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import mmap
from collections.abc import Iterable
from typing import TypeVar

import numpy as np

from orchestrator import uapi as U
from orchestrator.dirty.bits import report_span
from orchestrator.dirty.ranges import IovaRange
from orchestrator.vfio.errors import VfioError, VfioUsageError, from_oserror
from orchestrator.vfio.ranges import U64_LIMIT, as_ranges, is_pow2
from orchestrator.vfio.syscalls import Syscalls

State = U.vfio_device_mig_state
MIN_REPORT_PAGE = 4096

_S = TypeVar("_S", bound=U._Le)


def check_page_size(page_size: int, what: str) -> None:
    if not isinstance(page_size, int) or not is_pow2(page_size) or page_size < MIN_REPORT_PAGE:
        raise VfioUsageError(f"{what}: page size {page_size!r} must be a power of two >= {MIN_REPORT_PAGE}")


def check_span(iova: int, length: int, what: str) -> None:
    if iova < 0 or length <= 0:
        raise VfioUsageError(f"{what}: range {iova:#x}+{length:#x} must have iova >= 0 and length > 0")
    if iova + length > U64_LIMIT:
        raise VfioUsageError(f"{what}: range {iova:#x}+{length:#x} wraps past the 64-bit IOVA space")


def check_out_bitmap(out: np.ndarray, nbits: int, what: str) -> None:
    """The kernel ORs into the caller's buffer through a raw pointer: it must be real,
    writable, contiguous uint64 memory, and as large as a report may write (`bits.report_span`:
    a dirty unit running past the query's end has its bits set to the end of the pages the
    kernel pinned), ending on a page boundary. `bits.report_words` allocates such buffers."""
    if not isinstance(out, np.ndarray) or out.dtype != np.uint64:
        raise VfioUsageError(f"{what}: bitmap must be a numpy uint64 array")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise VfioUsageError(f"{what}: bitmap must be C-contiguous and writable")
    need = report_span(nbits)
    if out.size < need:
        raise VfioUsageError(
            f"{what}: bitmap holds {out.size} words, a report of {nbits} bits may write {need} "
            "(whole pages and one more); allocate it with orchestrator.dirty.bits.report_words"
        )
    if (out.ctypes.data + out.nbytes) % mmap.PAGESIZE:
        raise VfioUsageError(
            f"{what}: bitmap must end on a page boundary (the kernel sets bits up to the end of "
            "the pages it pinned); allocate it with orchestrator.dirty.bits.report_words"
        )


class VfioDevice:
    """One device fd. Holds no tracking state of its own: the kernel is the authority."""

    def __init__(self, fd: int, syscalls: Syscalls, name: str | None = None) -> None:
        self.fd = fd
        self.sys = syscalls
        self.name = name or f"vfio-fd{fd}"

    # -- VFIO_DEVICE_FEATURE plumbing -------------------------------------------------------
    def _feature(self, op: str, flags: int, payload: bytes = b"") -> bytearray:
        buf = bytearray(U.vfio_device_feature(argsz=8 + len(payload), flags=flags).pack() + payload)
        try:
            self.sys.ioctl(self.fd, U.VFIO_DEVICE_FEATURE, buf)
        except OSError as exc:
            raise from_oserror(op, exc, self.name) from None
        return buf

    def _get(self, feature: int, struct_type: type[_S], op: str) -> _S:
        buf = self._feature(op, U.VFIO_DEVICE_FEATURE_GET | feature, bytes(ctypes.sizeof(struct_type)))
        return struct_type.unpack(buf, 8)

    # -- DMA logging ------------------------------------------------------------------------
    def probe_dma_logging(self) -> bool:
        """True when DMA_LOGGING_START is supported."""
        try:
            self._feature(
                "DMA_LOGGING_START probe",
                U.VFIO_DEVICE_FEATURE_PROBE | U.VFIO_DEVICE_FEATURE_SET | U.VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            )
        except VfioError as exc:
            # ENOTTY: no log ops. EINVAL: a kernel that predates the feature (its default
            # feature path said EINVAL before it said ENOTTY).
            if exc.errno in (errno.ENOTTY, errno.EINVAL):
                return False
            raise
        return True

    def start_dma_logging(self, ranges: Iterable[IovaRange | tuple[int, int]], page_size: int) -> int:
        """Start logging over exactly these ranges; returns the page size the driver granted."""
        what = f"{self.name}: DMA_LOGGING_START"
        check_page_size(page_size, what)
        rs = sorted(as_ranges(ranges))
        if not rs:
            raise VfioUsageError(f"{what}: at least one range is required")
        if len(rs) > U.LOG_MAX_RANGES:
            raise VfioUsageError(f"{what}: {len(rs)} ranges, the kernel accepts at most {U.LOG_MAX_RANGES}")
        for r in rs:
            check_span(r.iova, r.length, what)
            if r.iova % page_size or r.length % page_size:
                raise VfioUsageError(f"{what}: range {r.iova:#x}+{r.length:#x} is not aligned to {page_size:#x}")
        for a, b in itertools.pairwise(rs):
            if b.iova <= a.last:
                raise VfioUsageError(f"{what}: ranges {a.iova:#x}+{a.length:#x} and {b.iova:#x}+{b.length:#x} overlap")
        array = (U.vfio_device_feature_dma_logging_range * len(rs))(
            *(U.vfio_device_feature_dma_logging_range(r.iova, r.length) for r in rs)
        )
        control = U.vfio_device_feature_dma_logging_control(
            page_size=page_size, num_ranges=len(rs), ranges=ctypes.addressof(array)
        )
        buf = self._feature(
            "DMA_LOGGING_START",
            U.VFIO_DEVICE_FEATURE_SET | U.VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            control.pack(),
        )
        return int(U.vfio_device_feature_dma_logging_control.unpack(buf, 8).page_size)

    def stop_dma_logging(self) -> None:
        self._feature("DMA_LOGGING_STOP", U.VFIO_DEVICE_FEATURE_SET | U.VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP)

    def report_dma_log(self, iova: int, length: int, page_size: int, out: np.ndarray) -> None:
        """Read-and-clear the device log for [iova, iova+length) into `out` (OR semantics:
        the kernel only sets bits, so `out` must start zeroed). Bit k covers
        iova + k*page_size, little-endian u64 words, LSB first."""
        what = f"{self.name}: DMA_LOGGING_REPORT"
        check_page_size(page_size, what)
        check_span(iova, length, what)
        check_out_bitmap(out, -(-length // page_size), what)
        report = U.vfio_device_feature_dma_logging_report(
            iova=iova, length=length, page_size=page_size, bitmap=out.ctypes.data
        )
        self._feature(
            "DMA_LOGGING_REPORT",
            U.VFIO_DEVICE_FEATURE_GET | U.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
            report.pack(),
        )

    # -- migration v2 -----------------------------------------------------------------------
    def migration_flags(self) -> int:
        return int(self._get(U.VFIO_DEVICE_FEATURE_MIGRATION, U.vfio_device_feature_migration, "MIGRATION").flags)

    def get_state(self) -> State:
        st = self._get(U.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, U.vfio_device_feature_mig_state, "MIG_DEVICE_STATE get")
        return State(st.device_state)

    def set_state(self, state: State | int) -> int | None:
        """Move the device to `state`; returns the new data-transfer fd, or None if the arc
        opened no new session. On failure the error says which state the device is really in
        (the kernel echoes the requested state, so it has to be asked)."""
        target = State(state)
        if target == State.VFIO_DEVICE_STATE_ERROR:
            raise VfioUsageError(f"{self.name}: ERROR cannot be requested as a device state")
        payload = U.vfio_device_feature_mig_state(device_state=target, data_fd=-1).pack()
        try:
            buf = self._feature(
                f"MIG_DEVICE_STATE -> {target.name}",
                U.VFIO_DEVICE_FEATURE_SET | U.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
                payload,
            )
        except VfioError as exc:
            try:
                now = self.get_state().name
            except VfioError:
                now = "unknown (GET failed too)"
            raise type(exc)(exc.op, exc.errno, f"{exc.detail}; device is now {now}") from None
        fd = U.vfio_device_feature_mig_state.unpack(buf, 8).data_fd
        return None if fd < 0 else fd

    def stop_copy_size(self) -> int:
        size = self._get(U.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, U.vfio_device_feature_mig_data_size, "MIG_DATA_SIZE")
        return int(size.stop_copy_length)

    def precopy_info(self, data_fd: int) -> tuple[int, int]:
        """(initial_bytes, dirty_bytes) of the PRE_COPY session on `data_fd`."""
        buf = bytearray(U.vfio_precopy_info(argsz=ctypes.sizeof(U.vfio_precopy_info)).pack())
        try:
            self.sys.ioctl(data_fd, U.VFIO_MIG_GET_PRECOPY_INFO, buf)
        except OSError as exc:
            raise from_oserror("MIG_GET_PRECOPY_INFO", exc, self.name) from None
        info = U.vfio_precopy_info.unpack(buf)
        return info.initial_bytes, info.dirty_bytes

    def read_data(self, data_fd: int, n: int) -> bytes:
        """Read device state; b'' at end of stream. ENOMSG (the temporary end of precopy
        data) raises `EndOfStream` so callers can tell "for now" from "for good"."""
        try:
            return self.sys.read(data_fd, n)
        except OSError as exc:
            raise from_oserror("read migration data", exc, self.name) from None

    def write_data(self, data_fd: int, data: bytes) -> int:
        try:
            return self.sys.write(data_fd, data)
        except OSError as exc:
            raise from_oserror("write migration data", exc, self.name) from None

    def close_data(self, data_fd: int) -> None:
        try:
            self.sys.close(data_fd)
        except OSError as exc:
            raise from_oserror("close migration data fd", exc, self.name) from None


__all__ = ["IovaRange", "State", "VfioDevice", "check_out_bitmap", "check_page_size", "check_span"]
