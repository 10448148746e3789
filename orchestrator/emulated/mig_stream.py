"""The migration data fds: the saving stream a device produces and the resuming stream it takes.

Both layouts start with a 24-byte header shaped like mtty's; it and what follows are the
device's own format, opaque to userspace (`StreamFormat`):
- `RecordStream` (the default): the header {magic, major, minor, flags, reserved}, then
  records {kind, length, payload}. PRE_COPY puts a PRE_COPY
  record (a snapshot of the device state) after the header; STOP_COPY appends the FINAL
  record, whose payload is what the destination ends up with. Any state length round-trips.
- `MttyStream`: samples/vfio-mdev/mtty.c exactly (checked against Linux 6.12 by the
  real-kernel lab): the header {magic, major, minor, nr_ports, flags}, which a resume must
  match (EFAULT), the device state as nr_ports 36-byte port records; PRE_COPY offers the
  header alone, STOP_COPY appends the raw device state,
  the stop-copy length counts the header, and a resume takes at most the header plus the
  state's length (ENOMEM beyond) and at least all of it (EINVAL on leaving RESUMING).
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from orchestrator.emulated.errors import kernel_error
from orchestrator.emulated.ioctl_arg import IoctlArg
from orchestrator.uapi import VFIO_MIG_GET_PRECOPY_INFO, VFIO_MIGRATION_PRE_COPY, _Le, vfio_precopy_info

if TYPE_CHECKING:
    from orchestrator.emulated.migration import MigrationDriver

STREAM_MAGIC = 0x7E9D09898C3E2C4E  # mtty's MTTY_MAGIC
STREAM_MAJOR, STREAM_MINOR = 1, 0
REC_PRECOPY, REC_FINAL = 1, 2


class stream_header(_Le):
    _fields_ = [
        ("magic", ctypes.c_uint64),
        ("major", ctypes.c_uint32),
        ("minor", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


class record_header(_Le):
    _fields_ = [("kind", ctypes.c_uint32), ("length", ctypes.c_uint32)]


RECORD_SIZE = ctypes.sizeof(record_header)


class mtty_header(_Le):
    _fields_ = [
        ("magic", ctypes.c_uint64),
        ("major", ctypes.c_uint32),
        ("minor", ctypes.c_uint32),
        ("nr_ports", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    ]


HEADER_SIZE = ctypes.sizeof(stream_header)
SERIAL_PORT_SIZE = 36  # sizeof(struct serial_port) in mtty.c


def encode_header() -> bytes:
    return bytes(stream_header(STREAM_MAGIC, STREAM_MAJOR, STREAM_MINOR, 0, 0))


def encode_record(kind: int, payload: bytes) -> bytes:
    return bytes(record_header(kind, len(payload))) + payload


class StreamFormat(Protocol):
    """A device's stream: its header, what follows, and how it reads a resumed one back."""

    def header(self, state: bytes) -> bytes:
        """The HEADER_SIZE bytes every saving stream starts with."""

    def header_ok(self, header: bytes, state: bytes) -> bool:
        """Whether a resumed stream's header is one this device takes (else EFAULT)."""

    def precopy_body(self, state: bytes) -> bytes:
        """What PRE_COPY offers after the header."""

    def final(self, state: bytes) -> bytes:
        """What STOP_COPY appends (after the header, or after the precopy body)."""

    def stop_copy_length(self, state: bytes) -> int:
        """MIG_DATA_SIZE's answer."""

    def resume_capacity(self, state: bytes, max_data_size: int) -> int:
        """The most a resume may write, header included (ENOMEM past it)."""

    def load(self, body: bytes, state: bytes) -> bytes:
        """The state to load from what followed the header; EINVAL if it is not one."""


class RecordStream:
    def header(self, state: bytes) -> bytes:
        return encode_header()

    def header_ok(self, header: bytes, state: bytes) -> bool:
        h = stream_header.from_buffer_copy(header)
        return (h.magic, h.major, h.minor) == (STREAM_MAGIC, STREAM_MAJOR, STREAM_MINOR)

    def precopy_body(self, state: bytes) -> bytes:
        return encode_record(REC_PRECOPY, state)

    def final(self, state: bytes) -> bytes:
        return encode_record(REC_FINAL, state)

    def stop_copy_length(self, state: bytes) -> int:
        return len(self.final(state))

    def resume_capacity(self, state: bytes, max_data_size: int) -> int:
        return HEADER_SIZE + 2 * (RECORD_SIZE + max_data_size)  # the header and two full records

    def load(self, body: bytes, state: bytes) -> bytes:
        """The FINAL record's payload: records must tile the body, FINAL last."""
        pos, final = 0, None
        while pos < len(body):
            if pos + RECORD_SIZE > len(body):
                raise kernel_error(errno.EINVAL)
            rec = record_header.unpack(body, pos)
            end = pos + RECORD_SIZE + rec.length
            if rec.kind not in (REC_PRECOPY, REC_FINAL) or end > len(body) or final is not None:
                raise kernel_error(errno.EINVAL)
            if rec.kind == REC_FINAL:
                final = bytes(body[pos + RECORD_SIZE : end])
            pos = end
        if final is None:
            raise kernel_error(errno.EINVAL)
        return final


class MttyStream:
    """The device state is fixed-size (mtty: nr_ports serial port records), so its current
    length is the length every stream carries."""

    def header(self, state: bytes) -> bytes:
        return bytes(mtty_header(STREAM_MAGIC, STREAM_MAJOR, STREAM_MINOR, len(state) // SERIAL_PORT_SIZE, 0))

    def header_ok(self, header: bytes, state: bytes) -> bool:
        return header == self.header(state)  # mtty_resume_write: magic, versions, flags, nr_ports

    def precopy_body(self, state: bytes) -> bytes:
        return b""

    def final(self, state: bytes) -> bytes:
        return state

    def stop_copy_length(self, state: bytes) -> int:
        return HEADER_SIZE + len(state)

    def resume_capacity(self, state: bytes, max_data_size: int) -> int:
        return HEADER_SIZE + len(state)

    def load(self, body: bytes, state: bytes) -> bytes:
        if len(body) < len(state):
            raise kernel_error(errno.EINVAL)  # mtty_load_state: filled_size < mtty_data_size
        return bytes(body[: len(state)])


class SaveFile:
    """The saving fd: read-only, with the precopy-info ioctl."""

    def __init__(self, driver: MigrationDriver, initial: bytes, eos_errno: int | None) -> None:
        self.driver = driver
        self.buf = bytearray(initial)
        self.pos = 0
        self.precopy_size = 0
        self.final = False
        self.disabled = False
        self._eos_errno = eos_errno

    def append_final(self, record: bytes) -> None:
        self.buf += record
        self.final = True

    def read(self, n: int) -> bytes:
        with self.driver.lock:
            if self.disabled:
                raise kernel_error(errno.ENODEV)
            if self.pos >= len(self.buf) and not self.final and self._eos_errno is not None:
                # "temporary end of stream" during PRE_COPY: more may come, this is not EOF
                raise kernel_error(self._eos_errno)
            out = bytes(self.buf[self.pos : self.pos + max(n, 0)])
            self.pos += len(out)
            return out

    def write(self, data: bytes) -> int:
        raise kernel_error(errno.EBADF)

    def ioctl(self, request: int, arg: bytearray) -> int:
        """VFIO_MIG_GET_PRECOPY_INFO, in mtty's order of checks."""
        if request != VFIO_MIG_GET_PRECOPY_INFO or not self.driver.flags & VFIO_MIGRATION_PRE_COPY:
            raise kernel_error(errno.ENOTTY)
        user = IoctlArg(arg)
        info = user.read_struct(vfio_precopy_info)
        if info.argsz < ctypes.sizeof(vfio_precopy_info):
            raise kernel_error(errno.EINVAL)
        with self.driver.state_mutex:  # mtty and mlx5 check the state under it
            if not self.driver.in_precopy():
                raise kernel_error(errno.EINVAL)
            if self.disabled:
                raise kernel_error(errno.ENODEV)
            if self.pos > len(self.buf):
                raise kernel_error(errno.EINVAL)
            info.initial_bytes = max(self.precopy_size - self.pos, 0)
            info.dirty_bytes = 0
        user.write_struct(info)
        return 0

    def release(self) -> None:
        """Userspace closing its fd; the driver keeps its own reference until it disables it."""


class ResumeFile:
    """The resuming fd: write-only; validated when the device leaves RESUMING."""

    def __init__(self, capacity: int, header_ok: Callable[[bytes], bool]) -> None:
        self.buf = bytearray()
        self.capacity = capacity
        self.disabled = False
        self._header_ok = header_ok

    def read(self, n: int) -> bytes:
        raise kernel_error(errno.EBADF)

    def write(self, data: bytes) -> int:
        if self.disabled:
            raise kernel_error(errno.ENODEV)
        if len(self.buf) + len(data) > self.capacity:
            raise kernel_error(errno.ENOMEM)
        had_header = len(self.buf) >= HEADER_SIZE
        self.buf += data
        if not had_header and len(self.buf) >= HEADER_SIZE and not self._header_ok(bytes(self.buf[:HEADER_SIZE])):
            del self.buf[-len(data) :]
            raise kernel_error(errno.EFAULT)
        return len(data)

    def ioctl(self, request: int, arg: bytearray) -> int:
        raise kernel_error(errno.ENOTTY)

    def release(self) -> None:
        """As for SaveFile."""

    def body(self) -> bytes:
        """What followed the header; EINVAL if the header never arrived."""
        if len(self.buf) < HEADER_SIZE:
            raise kernel_error(errno.EINVAL)
        return bytes(self.buf[HEADER_SIZE:])
