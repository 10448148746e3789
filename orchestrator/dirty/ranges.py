"""Ranges and runs: the one place intervals are merged, intersected and subtracted.

Two shapes of the same half-open idea, each where it fits:

- `IovaRange`: bytes [iova, iova + length) of the IOVA space, which without a vIOMMU is the
  guest-physical space the bitmap indexes. There are few of them (RAM regions, device windows,
  START plans), so they are plain Python objects; the VFIO client sends them as they are.
- page runs: (n, 2) int64 arrays of (first page, page count) rows. Harvests, file scans and
  page batches produce many, so every operation on them is numpy: no Python loop per run.

The emulated kernel keeps inclusive [first, last] u64 runs (an interval may end at 2^64 - 1);
`merge_inclusive` is the merge both it and `union_runs` use.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, order=True)
class IovaRange:
    iova: int
    length: int

    @property
    def end(self) -> int:
        """One past the last byte."""
        return self.iova + self.length

    @property
    def last(self) -> int:
        """The last byte (inclusive), as the kernel's interval tree keeps it."""
        return self.iova + self.length - 1


def widen(r: IovaRange, grain: int) -> IovaRange:
    """`r` aligned outward to multiples of `grain`: every byte it had, in whole grains."""
    lo = r.iova - r.iova % grain
    hi = -(-r.end // grain) * grain
    return IovaRange(lo, hi - lo)


def normalize(ranges: Iterable[IovaRange], grain: int) -> list[IovaRange]:
    """Sorted, disjoint, non-touching ranges covering the same grains as `ranges`."""
    out: list[IovaRange] = []
    for r in sorted(widen(r, grain) for r in ranges):
        if out and r.iova <= out[-1].end:
            if r.end > out[-1].end:
                out[-1] = IovaRange(out[-1].iova, r.end - out[-1].iova)
        else:
            out.append(r)
    return out


def intersect(ranges: list[IovaRange], to: list[IovaRange]) -> list[IovaRange]:
    """The bytes in both of two sorted, disjoint range lists."""
    out: list[IovaRange] = []
    i = j = 0
    while i < len(ranges) and j < len(to):
        a, b = ranges[i], to[j]
        lo, hi = max(a.iova, b.iova), min(a.end, b.end)
        if lo < hi:
            out.append(IovaRange(lo, hi - lo))
        if a.end <= b.end:
            i += 1
        else:
            j += 1
    return out


def subtract(ranges: list[IovaRange], minus: list[IovaRange]) -> list[IovaRange]:
    """The bytes of `ranges` not in `minus` (both sorted, disjoint)."""
    out: list[IovaRange] = []
    j = 0
    for a in ranges:
        cur = a.iova
        while j < len(minus) and minus[j].end <= cur:
            j += 1
        k = j  # `minus[k]` may reach into the next range too: do not move `j` past it
        while k < len(minus) and minus[k].iova < a.end:
            if minus[k].iova > cur:
                out.append(IovaRange(cur, minus[k].iova - cur))
            cur = max(cur, minus[k].end)
            k += 1
        if cur < a.end:
            out.append(IovaRange(cur, a.end - cur))
    return out


def merge_inclusive(first: np.ndarray, last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort and merge overlapping or adjacent inclusive runs [first[i], last[i]].

    Works on u64 arrays up to 2^64 - 1: `reach + 1` could wrap there, so adjacency is tested
    on the difference instead.
    """
    if len(first) == 0:
        return first, last
    order = np.argsort(first, kind="stable")
    first, last = first[order], last[order]
    reach = np.maximum.accumulate(last)
    new = np.ones(len(first), dtype=bool)
    with np.errstate(over="ignore"):
        new[1:] = (first[1:] > reach[:-1]) & (first[1:] - reach[:-1] > 1)
    heads = np.flatnonzero(new)
    return first[heads], np.maximum.reduceat(last, heads)


def union_runs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted, merged page runs covering every page of either run list (non-empty runs)."""
    rows = np.concatenate([a, b]).astype(np.int64, copy=False).reshape(-1, 2)
    first, last = merge_inclusive(rows[:, 0], rows[:, 0] + rows[:, 1] - 1)
    return np.column_stack((first, last - first + 1))


def page_runs(pages: np.ndarray) -> np.ndarray:
    """(first page, page count) rows of the stretches of `pages` that go up by one, in order:
    for sorted unique page numbers, the maximal runs."""
    pages = np.asarray(pages).astype(np.int64, copy=False)
    if not pages.size:
        return np.empty((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = pages[np.r_[0, breaks]]
    stops = pages[np.r_[breaks - 1, pages.size - 1]] + 1
    return np.column_stack((starts, stops - starts))
