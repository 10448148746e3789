"""Mapping a guest RAM file into numpy, shared with the QEMU that maps the same file, and
finding which parts of it hold data at all.

Nothing is faulted in ahead of time: guest RAM a guest never touched is a hole in its file
(tmpfs allocates on first write), reads as zeros, and needs neither reading nor allocating.
Round 0 and verification look only where the files hold data, and round 0 clears the
destination by punching holes (`clear`), which costs next to nothing where it is a hole already.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Self, TypeVar

import numpy as np

from orchestrator.dirty.memory import RamRegion
from orchestrator.transport.base import SinkError

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
ZERO_CHUNK = 1 << 20  # bytes per write where holes cannot be punched


def open_ram(path: str, writable: bool) -> int:
    """An fd on the RAM file, or `SinkError` naming it."""
    try:
        return os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    except OSError as exc:
        raise SinkError(f"cannot open RAM file {path}: {exc.strerror}") from None


def map_fd(fd: int, path: str, size: int, writable: bool) -> tuple[mmap.mmap, np.ndarray]:
    """Map the first `size` bytes of the open RAM file shared; the mapping and a byte view."""
    actual = os.fstat(fd).st_size
    if actual < size:
        raise SinkError(f"RAM file {path} has {actual} bytes, the guest layout needs {size}")
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
    return mm, np.frombuffer(mm, np.uint8)


def map_ram(path: str, size: int, writable: bool) -> tuple[mmap.mmap, np.ndarray]:
    """Map the first `size` bytes of `path` shared; returns the mapping and a byte view."""
    fd = open_ram(path, writable)
    try:
        return map_fd(fd, path, size, writable)
    finally:
        os.close(fd)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate [offset, offset+length): it reads as zeros, the file keeps its size, and on
    tmpfs or hugetlbfs the memory goes back to the host. A process mapping the file sees the
    zeros too (its page table entries are zapped)."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def clear(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) of the open file read as zeros: punch a hole, or where the
    filesystem cannot, write zeros over the parts that hold data."""
    try:
        punch_hole(fd, offset, length)
        return
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:
            raise
    zeros = bytes(ZERO_CHUNK)
    for start, stop in _data_spans(fd, offset, offset + length):
        for at in range(start, stop, ZERO_CHUNK):
            os.pwrite(fd, zeros[: min(ZERO_CHUNK, stop - at)], at)


def clear_file(path: str, offset: int, length: int) -> None:
    fd = open_ram(path, writable=True)
    try:
        clear(fd, offset, length)
    finally:
        os.close(fd)


def release(maps: list[mmap.mmap]) -> None:
    """Unmap what no view holds any more; a mapping still viewed goes when its view does."""
    for mm in maps:
        with contextlib.suppress(BufferError):
            mm.close()
    maps.clear()


def data_runs(path: str, offset: int, length: int, page_size: int) -> np.ndarray:
    """(first page, page count) rows, relative to `offset`, of the parts of
    [offset, offset+length) of `path` that hold data (SEEK_DATA / SEEK_HOLE). A hole reads as
    zeros; a page the guest writes later is dirty-tracked from then on, so a snapshot of
    where data was is enough for round 0."""
    runs: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for data, hole in _data_spans(fd, offset, offset + length):
            first = (data - offset) // page_size
            runs.append((first, -(-(hole - offset) // page_size) - first))
    finally:
        os.close(fd)
    return np.array(runs, np.int64).reshape(-1, 2)


def _data_spans(fd: int, pos: int, end: int) -> Iterator[tuple[int, int]]:
    """(start, stop) byte spans of [pos, end) where the file holds data."""
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                return
            raise
        if data >= end:
            return
        pos = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, pos


def region_rows(file_bytes: np.ndarray, r: RamRegion, page_size: int) -> np.ndarray:
    """The bytes of `r` in a mapped file (from its start), one page per row."""
    return file_bytes[r.offset : r.offset + r.length].reshape(-1, page_size)


@dataclass
class MappedRegion:
    """A RAM region as a sink sees it, in pages: guest pages [first_page, first_page + npages)
    are the rows of `src`, the source file's bytes from `offset` on."""

    first_page: int
    npages: int
    offset: int
    page_size: int
    src: np.ndarray  # (npages, page_size) view into the mapped source file
    src_path: str

    @classmethod
    def of(cls, r: RamRegion, page_size: int, src: np.ndarray, src_path: str, **more) -> Self:
        """The region `r` of the mapped file bytes `src`; `more` are a subclass's fields."""
        rows = region_rows(src, r, page_size)
        return cls(r.gpa // page_size, len(rows), r.offset, page_size, rows, src_path, **more)

    @property
    def file_first(self) -> int:
        """The page number of the region's first page in its file."""
        return self.offset // self.page_size

    @property
    def nbytes(self) -> int:
        return self.npages * self.page_size


Region = TypeVar("Region", bound=MappedRegion)


def split_pages(regions: Iterable[Region], pages: np.ndarray) -> Iterator[tuple[Region, np.ndarray, np.ndarray]]:
    """(region, indices within it, guest page numbers) of the sorted guest `pages`, for every
    region holding any of them."""
    for reg in regions:
        lo, hi = np.searchsorted(pages, [reg.first_page, reg.first_page + reg.npages])
        if hi > lo:
            guest = pages[lo:hi]
            yield reg, guest - reg.first_page, guest


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
