"""Inclusive [first, last] runs of u64 indices, as numpy arrays.

Device logs, IOMMU domains and bitmap writes all deal in runs of pages; merging them first
turns "every page dirty" into one run instead of a page-by-page loop. The merge is the
shared one of `orchestrator.dirty.ranges`.
"""

from __future__ import annotations

from orchestrator.dirty.ranges import merge_inclusive as merge_runs

__all__ = ["U64_MAX", "merge_runs"]

U64_MAX = (1 << 64) - 1
