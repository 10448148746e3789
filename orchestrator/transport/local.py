"""The local page sink: copy guest pages from the source RAM file into the destination's.

Both files are mapped shared. A run of at least `RUN_PAGES` contiguous pages moves as one slice
copy (a plain memcpy, read once and written once); scattered pages move by numpy gather/scatter
in cache-sized batches, so the gathered copy is still in cache when it is scattered. Either way
one C loop per run or batch, never a Python loop per page. Page numbers are guest-physical;
each RAM region maps its guest-physical pages onto its own file offset.
"""

from __future__ import annotations

import asyncio
import mmap
from dataclasses import dataclass

import numpy as np

from orchestrator.dirty.memory import MemoryLayout, RamRegion
from orchestrator.dirty.ranges import page_runs, union_runs
from orchestrator.transport.base import OnSent, page_numbers
from orchestrator.transport.bucket import TokenBucket
from orchestrator.transport.ramfile import (
    MappedRegion,
    clear_file,
    data_runs,
    map_ram,
    nonzero_pages,
    region_rows,
    release,
    split_pages,
)

# Scattered pages per gather/scatter. Measured with `python -m bench` (micro.copy): a 512 KiB
# gather is still in L2 when it is scattered, nearly twice the bandwidth of a 32 MiB batch.
BATCH_PAGES = 128
# A run this long amortises a Python iteration (a few microseconds) over >= 256 KiB of memcpy.
RUN_PAGES = 64
# Up to this many pages are copied on the event loop's thread: the copy (about 0.1 ms) is
# cheaper than a thread handoff, and a final copy this small runs inside the downtime.
INLINE_PAGES = 256
# Under a bandwidth cap pages move in slices of this many, each waiting for its tokens.
PACE_PAGES = 256


@dataclass
class _Region(MappedRegion):
    """Both sides of a region: the destination file holds it at the same offset."""

    dst: np.ndarray
    dst_path: str

    def data_runs(self, path: str | None = None) -> np.ndarray:
        """Where the region's bytes in `path` (default: the source file) hold data."""
        return data_runs(path or self.src_path, self.offset, self.nbytes, self.page_size)


def _nonzero(reg: _Region) -> list[np.ndarray]:
    return list(nonzero_pages(reg.src, reg.data_runs()))


class LocalSink:
    """Source and destination RAM files on this host (both QEMUs share-mapped them).

    The copy methods are blocking (memory-bandwidth bound); the `PageSink` methods run them
    in a worker thread so the event loop keeps serving QMP and trackers meanwhile."""

    def __init__(self, layout: MemoryLayout, src_paths: dict[str, str], dst_paths: dict[str, str]) -> None:
        """`src_paths`/`dst_paths` map each region's source path to the file to open on that
        side (the destination's RAM file has its own name)."""
        self.page_size = layout.page_size
        self._maps: list[mmap.mmap] = []
        self.regions: list[_Region] = []
        self._bucket = TokenBucket(None)
        try:
            for r in layout.regions:
                self.regions.append(self._open(r, src_paths, dst_paths))
        except BaseException:
            self.close()
            raise

    @classmethod
    def flat(cls, layout: MemoryLayout, src: str, dst: str) -> LocalSink:
        """One file each side, holding all regions at their own offsets."""
        paths = {r.path or src: src for r in layout.regions}
        return cls(layout, paths, {k: dst for k in paths})

    def _open(self, r: RamRegion, src_paths: dict[str, str], dst_paths: dict[str, str]) -> _Region:
        key = r.path or next(iter(src_paths))
        size = r.offset + r.length
        smm, s = map_ram(src_paths[key], size, writable=False)
        self._maps.append(smm)
        dmm, d = map_ram(dst_paths[key], size, writable=True)
        self._maps.append(dmm)
        dst = region_rows(d, r, self.page_size)
        return _Region.of(r, self.page_size, s, src_paths[key], dst=dst, dst_path=dst_paths[key])

    @property
    def max_bandwidth(self) -> float | None:
        return self._bucket.rate

    def set_max_bandwidth(self, rate: float | None) -> None:
        """Cap the copy at `rate` bytes per second (None or 0: as fast as memory goes); a slice
        already waiting on the old cap goes by the new one."""
        self._bucket.set_rate(rate or None)

    def close(self) -> None:
        for region in self.regions:
            region.src = region.dst = np.empty((0, self.page_size), np.uint8)
        self.regions.clear()
        release(self._maps)

    def __enter__(self) -> LocalSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, pages: np.ndarray, on_sent: OnSent | None = None) -> int:
        """Copy these guest pages (sorted page numbers); returns bytes moved."""
        moved = 0
        for reg, local, gp in split_pages(self.regions, page_numbers(pages)):
            moved += self._copy(reg, local, gp, on_sent)
        return moved * self.page_size

    def _copy(self, reg: _Region, local: np.ndarray, gp: np.ndarray, on_sent: OnSent | None) -> int:
        """Copy region pages `local` (sorted), which are guest pages `gp`; returns pages moved.

        `on_sent` sees the destination's rows for a run (what it now holds, no extra copy) and
        the gathered snapshot for scattered pages.
        """
        runs = page_runs(local)
        lengths = runs[:, 1]
        long = lengths >= RUN_PAGES
        at = np.cumsum(lengths) - lengths  # where each run starts in `local`
        for (start, n), i in zip(runs[long].tolist(), at[long].tolist(), strict=False):
            dst = reg.dst[start : start + n]
            np.copyto(dst, reg.src[start : start + n])
            if on_sent:
                on_sent(gp[i : i + n], dst)
        scattered = np.repeat(~long, lengths)
        idx, gp = local[scattered], gp[scattered]
        for i in range(0, idx.size, BATCH_PAGES):
            batch = idx[i : i + BATCH_PAGES]
            data = reg.src[batch]  # gather: one snapshot of these pages
            reg.dst[batch] = data
            if on_sent:
                on_sent(gp[i : i + BATCH_PAGES], data)
        return local.size

    def send_nonzero(self, on_sent: OnSent | None = None) -> tuple[int, int]:
        """Round 0: clear each destination region (its file may hold anything: an older
        guest, a failed migration), then copy every source page that is not all zero.
        Returns (pages, bytes) moved."""
        total = 0
        for reg in self.regions:
            clear_file(reg.dst_path, reg.offset, reg.nbytes)
            for nz in nonzero_pages(reg.src, reg.data_runs()):
                total += self._copy(reg, nz, nz + reg.first_page, on_sent)
        return total, total * self.page_size

    async def send_round0(self, on_sent: OnSent | None = None) -> tuple[int, int]:
        if self._bucket.rate is None:
            return await asyncio.to_thread(self.send_nonzero, on_sent)
        total = 0
        for reg in self.regions:
            await asyncio.to_thread(clear_file, reg.dst_path, reg.offset, reg.nbytes)
            found = await asyncio.to_thread(_nonzero, reg)
            for nz in found:
                total += await self._paced(reg, nz, nz + reg.first_page, on_sent)
        return total, total * self.page_size

    async def send_pages(self, pages: np.ndarray, on_sent: OnSent | None = None) -> int:
        if self._bucket.rate is not None:
            moved = 0
            for reg, local, gp in split_pages(self.regions, page_numbers(pages)):
                moved += await self._paced(reg, local, gp, on_sent)
            return moved * self.page_size
        if pages.size <= INLINE_PAGES:
            return self.send(pages, on_sent)
        return await asyncio.to_thread(self.send, pages, on_sent)

    async def _paced(self, reg: _Region, local: np.ndarray, gp: np.ndarray, on_sent: OnSent | None) -> int:
        """Copy in slices, each after the bucket lets its bytes through (the cap may change
        while a round runs, even while a slice waits: `set_max_bandwidth`)."""
        moved = 0
        for i in range(0, local.size, PACE_PAGES):
            part = slice(i, i + PACE_PAGES)
            await self._bucket.take(local[part].size * self.page_size)
            moved += await asyncio.to_thread(self._copy, reg, local[part], gp[part], on_sent)
        return moved

    async def verify(self) -> np.ndarray:
        return await asyncio.to_thread(self.mismatched_pages)

    def mismatched_pages(self) -> np.ndarray:
        """Guest page numbers whose bytes differ between source and destination (run while
        both sides are paused): every page either file holds data in, byte for byte; pages
        that are holes in both are zeros in both."""
        bad: list[np.ndarray] = []
        for reg in self.regions:
            runs = union_runs(reg.data_runs(), reg.data_runs(reg.dst_path))
            for first, n in runs.tolist():
                for lo in range(first, first + n, BATCH_PAGES):
                    hi = min(lo + BATCH_PAGES, first + n)
                    s, d = reg.src[lo:hi].view(np.uint64), reg.dst[lo:hi].view(np.uint64)
                    diff = np.flatnonzero((s != d).any(axis=1))
                    if diff.size:
                        bad.append(diff + lo + reg.first_page)
        return np.concatenate(bad) if bad else np.zeros(0, np.int64)
