"""How the emulated kernel fails a syscall."""

from __future__ import annotations

import os


def kernel_error(code: int) -> OSError:
    """The exception a failing syscall raises in Python: `fcntl.ioctl` turns -errno into this."""
    return OSError(code, os.strerror(code))
