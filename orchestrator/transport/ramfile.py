"""Mapping a guest RAM file into numpy, shared with the QEMU that maps the same file."""

from __future__ import annotations

import mmap
import os

import numpy as np

from .base import SinkError


def map_ram(path: str, size: int, writable: bool) -> tuple[mmap.mmap, np.ndarray]:
    """Map the first `size` bytes of `path` shared; returns the mapping and a byte view."""
    flags = os.O_RDWR if writable else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise SinkError(f"cannot open RAM file {path}: {exc.strerror}") from None
    try:
        actual = os.fstat(fd).st_size
        if actual < size:
            raise SinkError(f"RAM file {path} has {actual} bytes, the guest layout needs {size}")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        # Fault every page in now, while the guest still runs: first-touch faults would
        # otherwise land in round 0 and, worse, in the final copy inside the downtime.
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE, prot)
    finally:
        os.close(fd)
    return mm, np.frombuffer(mm, np.uint8)


def file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError as exc:
        raise SinkError(f"cannot open RAM file {path}: {exc.strerror}") from None


def release(maps: list[mmap.mmap]) -> None:
    """Unmap what no view holds any more; a mapping still viewed goes when its view does."""
    for mm in maps:
        try:
            mm.close()
        except BufferError:
            pass
    maps.clear()
