"""copy_from_user / copy_to_user for the in-process emulated kernel.

The client hands the kernel raw addresses (range arrays, report bitmaps) inside ioctl
payloads. Reading and writing them through process_vm_readv/writev on our own pid makes a
bad pointer fail with EFAULT, as it would in the kernel, instead of crashing the process.
"""

from __future__ import annotations

import ctypes
import errno
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_writev.restype = ctypes.c_ssize_t


class _iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _transfer(fn, local_addr: int, remote_addr: int, n: int) -> None:
    done = 0
    while done < n:
        local = _iovec(local_addr + done, n - done)
        remote = _iovec(remote_addr + done, n - done)
        got = fn(os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got <= 0:
            err = ctypes.get_errno() if got < 0 else errno.EFAULT
            raise OSError(err, os.strerror(err))
        done += got


def copy_from_user(addr: int, n: int) -> bytearray:
    """Read n bytes at a user address; EFAULT if any of it is unmapped."""
    out = bytearray(n)
    if n:
        if addr == 0:
            raise OSError(errno.EFAULT, os.strerror(errno.EFAULT))
        buf = (ctypes.c_char * n).from_buffer(out)
        _transfer(_libc.process_vm_readv, ctypes.addressof(buf), addr, n)
    return out


def copy_to_user(addr: int, data: bytes | bytearray | memoryview) -> None:
    """Write bytes to a user address; EFAULT if any of it is unmapped or read-only."""
    n = len(data)
    if not n:
        return
    if addr == 0:
        raise OSError(errno.EFAULT, os.strerror(errno.EFAULT))
    src = bytearray(data)
    buf = (ctypes.c_char * n).from_buffer(src)
    _transfer(_libc.process_vm_writev, ctypes.addressof(buf), addr, n)
