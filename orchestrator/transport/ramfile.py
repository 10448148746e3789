"""Mapping a guest RAM file into numpy, shared with the QEMU that maps the same file, and
finding which parts of it hold data at all.

Nothing is faulted in ahead of time: guest RAM a guest never touched is a hole in its file
(tmpfs allocates on first write), reads as zeros, and needs neither reading nor allocating.
Round 0 and verification look only where the files hold data.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterator

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
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
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


def data_runs(path: str, offset: int, length: int, page_size: int) -> np.ndarray:
    """(first page, page count) rows, relative to `offset`, of the parts of
    [offset, offset+length) of `path` that hold data (SEEK_DATA / SEEK_HOLE). A hole reads as
    zeros; a page the guest writes later is dirty-tracked from then on, so a snapshot of
    where data was is enough for round 0."""
    end = offset + length
    runs: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = offset
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos
                    break
                raise
            if data >= end:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            first = (data - offset) // page_size
            runs.append((first, -(-(hole - offset) // page_size) - first))
            pos = hole
    finally:
        os.close(fd)
    return np.array(runs, np.int64).reshape(-1, 2)


def union_runs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Page runs covering every page of either run list."""
    spans = sorted(map(tuple, np.concatenate([a, b]).tolist()))
    out: list[list[int]] = []
    for first, n in spans:
        if out and first <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], first + n - out[-1][0])
        else:
            out.append([first, n])
    return np.array(out, np.int64).reshape(-1, 2)


SCAN_PAGES = 8192  # round 0 looks for zero pages 32 MiB at a time


def nonzero_pages(rows: np.ndarray, runs: np.ndarray, chunk: int = SCAN_PAGES) -> Iterator[np.ndarray]:
    """Indices of the `rows` (one page each) inside `runs` that are not all zero, looked
    for `chunk` pages at a time."""
    for first, n in runs.tolist():
        for lo in range(first, first + n, chunk):
            block = rows[lo : min(lo + chunk, first + n)].view(np.uint64)
            # An OR-reduce per page is the cheapest exact zero test numpy has (no bool temp).
            nz = np.flatnonzero(np.bitwise_or.reduce(block, axis=1)) + lo
            if nz.size:
                yield nz
