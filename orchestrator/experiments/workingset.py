"""The working-set curve W(t) of a probe trace: how many distinct pages the guest writes in a
window of length t, the quantity QEMU's calc-dirty-rate samples for one t (its calc-time) and
a migration round of length t must send again.

With harvests every period p, the pages of a window of k periods are the union of k
consecutive harvests; W(k p) is that union's size, averaged over every window of the trace
(its maximum beside it, for a guest whose writing comes in bursts).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from orchestrator.dirty.bitmap import popcount
from orchestrator.experiments.errors import ExperimentError
from orchestrator.experiments.trace import Harvest, Trace, TraceKind, bits_of


@dataclass(frozen=True)
class WorkingSetPoint:
    periods: int  # k: harvests per window
    window_s: float  # k times the probe's period
    mean_pages: float  # distinct pages written in a window, averaged over the windows
    max_pages: int
    windows: int  # how many windows of k consecutive harvests the trace has

    def rate_bytes_per_s(self, page_size: int) -> float:
        """W(t) / t in bytes: calc-dirty-rate's dirty rate for a calc-time of t."""
        return self.mean_pages * page_size / self.window_s


def working_set(
    harvests: Sequence[Harvest], npages: int, period_s: float, periods: Iterable[int] | None = None
) -> list[WorkingSetPoint]:
    """W(k * period_s) for each k of `periods` (default every k from 1 to the number of harvests)."""
    if period_s <= 0:
        raise ExperimentError(f"a probe period must be positive, got {period_s}")
    n = len(harvests)
    ks = sorted(set(range(1, n + 1) if periods is None else periods))
    if not ks or ks[0] < 1 or ks[-1] > n:
        raise ExperimentError(f"windows of {ks} harvests asked of a trace with {n}")
    packed = [np.packbits(bits_of(h.pages, npages)).view(np.uint8) for h in harvests]
    counts: dict[int, list[int]] = {k: [] for k in ks}
    longest = ks[-1]
    for start in range(n):
        union = np.zeros_like(packed[0])
        for k in range(1, min(longest, n - start) + 1):
            np.bitwise_or(union, packed[start + k - 1], out=union)
            if k in counts:
                counts[k].append(_count(union))
    return [WorkingSetPoint(k, k * period_s, float(np.mean(counts[k])), max(counts[k]), len(counts[k])) for k in ks]


def _count(packed: np.ndarray) -> int:
    pad = (-packed.size) % 8
    words = np.concatenate([packed, np.zeros(pad, np.uint8)]).view(np.uint64) if pad else packed.view(np.uint64)
    return popcount(words)


def working_set_of(trace: Trace, periods: Iterable[int] | None = None) -> list[WorkingSetPoint]:
    """W(t) of a probe trace (its harvests and period, from its header)."""
    h = trace.header
    if h.kind is not TraceKind.PROBE or h.period_s is None:
        raise ExperimentError(f"W(t) comes from a probe trace; this one is a {h.kind.value} trace")
    if not trace.harvests:
        raise ExperimentError("the probe trace has no harvests")
    return working_set(trace.harvests, h.npages, h.period_s, periods)
