"""The byte-level syscall seam between the VFIO client and a kernel.

Everything the client does to a device goes through one of these four calls with the exact
bytes a C program would pass, so the same client drives a real kernel (`RealSyscalls`) or the
emulated one (`orchestrator.emulated.EmulatedKernel`) unchanged.
"""

from __future__ import annotations

import fcntl
import os
from typing import Protocol


class Syscalls(Protocol):
    def ioctl(self, fd: int, request: int, arg: bytearray) -> int:
        """Like `fcntl.ioctl(fd, request, arg, True)`: the kernel may rewrite `arg` in place;
        failure raises `OSError` carrying the errno."""

    def read(self, fd: int, n: int) -> bytes: ...

    def write(self, fd: int, data: bytes) -> int: ...

    def close(self, fd: int) -> None: ...


class RealSyscalls:
    """The host kernel."""

    def ioctl(self, fd: int, request: int, arg: bytearray) -> int:
        return int(fcntl.ioctl(fd, request, arg, True))

    def read(self, fd: int, n: int) -> bytes:
        return os.read(fd, n)

    def write(self, fd: int, data: bytes) -> int:
        return os.write(fd, data)

    def close(self, fd: int) -> None:
        os.close(fd)
