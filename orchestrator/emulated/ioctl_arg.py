"""The ioctl argument buffer as the kernel sees it: user memory reached through `arg`.

With a real fd, `fcntl.ioctl(fd, req, buf, True)` copies `buf` into a 1024-byte stack buffer,
passes the kernel a pointer to that, and copies it back: a payload shorter than what the kernel
reads is padded with whatever the stack held, not faulted. Here the kernel sees `buf` itself,
and reading or writing past its end fails with EFAULT (as copy_from_user on an unmapped
address), so a short argument shows up as an error instead of as garbage input.
"""

from __future__ import annotations

import ctypes
import errno
from typing import TypeVar

from orchestrator.emulated.errors import kernel_error

S = TypeVar("S", bound=ctypes.Structure)


class IoctlArg:
    def __init__(self, buf: bytearray) -> None:
        self.buf = buf

    def _check(self, offset: int, n: int) -> None:
        if offset < 0 or offset + n > len(self.buf):
            raise kernel_error(errno.EFAULT)

    def read(self, offset: int, n: int) -> bytes:
        self._check(offset, n)
        return bytes(self.buf[offset : offset + n])

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        self.buf[offset : offset + len(data)] = data

    def read_struct(self, cls: type[S], offset: int = 0) -> S:
        return cls.from_buffer_copy(self.read(offset, ctypes.sizeof(cls)))

    def read_prefix(self, cls: type[S], n: int) -> S:
        """The first n bytes of a struct (a minsz copy), the rest zero."""
        return cls.from_buffer_copy(self.read(0, n).ljust(ctypes.sizeof(cls), b"\0"))

    def write_struct(self, obj: ctypes.Structure, offset: int = 0) -> None:
        self.write(offset, bytes(obj))


def offsetofend(cls: type[ctypes.Structure], name: str) -> int:
    f = getattr(cls, name)
    return f.offset + f.size
