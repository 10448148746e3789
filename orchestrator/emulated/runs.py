"""Inclusive [first, last] runs of u64 indices, as numpy arrays.

Device logs, IOMMU domains and bitmap writes all deal in runs of pages; merging them first
turns "every page dirty" into one run instead of a page-by-page loop.
"""

from __future__ import annotations

import numpy as np

U64_MAX = (1 << 64) - 1


def merge_runs(first: np.ndarray, last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort and merge overlapping or adjacent inclusive runs (uint64 arrays)."""
    if len(first) == 0:
        return first, last
    order = np.argsort(first, kind="stable")
    first, last = first[order], last[order]
    reach = np.maximum.accumulate(last)
    # A run starts a new group unless it begins at or right after what came before;
    # `reach + 1` could wrap at U64_MAX, so compare the difference instead.
    new = np.ones(len(first), dtype=bool)
    with np.errstate(over="ignore"):
        new[1:] = (first[1:] > reach[:-1]) & (first[1:] - reach[:-1] > 1)
    heads = np.flatnonzero(new)
    return first[heads], np.maximum.reduceat(last, heads)
