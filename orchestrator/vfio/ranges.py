"""IOVA ranges for DMA_LOGGING_START: the uAPI's checks and the fallback ladder.

The range type and its set operations are `orchestrator.dirty.ranges`; this module adds what VFIO asks.

A device may refuse a range set (too many ranges, firmware limits, address-space caps), and the
uAPI says userspace should "try higher values but give up if the above can't be achieved".
The ladder turns that into a fixed sequence of ever coarser plans; every plan covers every
byte of the input, so coarsening only ever adds tracked (over-reported) memory, never loses any.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from orchestrator.dirty import ranges as _ranges
from orchestrator.dirty.ranges import IovaRange
from orchestrator.vfio.errors import VfioUsageError

U64_LIMIT = 1 << 64
FOUR_GIB = 1 << 32


@dataclass(frozen=True)
class StartPlan:
    """One rung of the ladder: a name for events and the ranges to ask for."""

    step: str
    ranges: tuple[IovaRange, ...]


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def as_ranges(ranges: Iterable[IovaRange | tuple[int, int]]) -> list[IovaRange]:
    return [r if isinstance(r, IovaRange) else IovaRange(int(r[0]), int(r[1])) for r in ranges]


def normalize(ranges: Iterable[IovaRange | tuple[int, int]], page_size: int) -> list[IovaRange]:
    """Check the ranges as the uAPI needs them (non-empty, inside the 64-bit IOVA space), then
    sort, align outward to page_size, and merge overlapping or touching ones."""
    if not is_pow2(page_size):
        raise VfioUsageError(f"page size {page_size:#x} is not a power of two")
    checked = sorted(as_ranges(ranges))
    for r in checked:
        if r.length <= 0:
            raise VfioUsageError(f"range at {r.iova:#x} has length {r.length}: ranges must be non-empty")
        if r.iova < 0 or r.end > U64_LIMIT:
            raise VfioUsageError(f"range {r.iova:#x}+{r.length:#x} is outside the 64-bit IOVA space")
    return _ranges.normalize(checked, page_size)


def combine_smallest_gap(ranges: list[IovaRange], limit: int) -> list[IovaRange]:
    """Merge the adjacent pair with the smallest hole until at most `limit` remain.

    Same choice as the kernel's vfio_combine_iova_ranges (gap = next.iova - prev.last, the
    lowest address wins a tie), so a plan we send is what a driver would have built anyway.
    """
    if limit < 1:
        raise VfioUsageError(f"range limit must be at least 1, got {limit}")
    out = sorted(ranges)
    if len(out) <= limit:
        return out
    if limit == 1:
        return [IovaRange(out[0].iova, out[-1].end - out[0].iova)]
    while len(out) > limit:
        k = min(range(len(out) - 1), key=lambda i: out[i + 1].iova - out[i].last)
        out[k : k + 2] = [IovaRange(out[k].iova, out[k + 1].end - out[k].iova)]
    return out


def buckets(ranges: list[IovaRange]) -> list[IovaRange]:
    """QEMU's split: one span for memory below 4 GiB, one for memory above."""
    low = [r for r in ranges if r.last < FOUR_GIB]
    high = [r for r in ranges if r.last >= FOUR_GIB]
    return [combine_smallest_gap(part, 1)[0] for part in (low, high) if part]


def start_ladder(
    ranges: Iterable[IovaRange | tuple[int, int]],
    page_size: int,
    max_ranges: int,
    mid_ranges: int = 16,
    align: int | None = None,
) -> Iterator[StartPlan]:
    """Yield START plans from exact to coarsest: exact (or smallest-gap down to the kernel's
    limit), smallest-gap down to `mid_ranges`, 32/64-bit buckets, one span. Each rung has
    strictly fewer ranges than the one before; after the last rung the caller gives up and
    treats the device's reachable memory as perma-dirty.

    `align` (a power-of-two multiple of page_size) widens every range to that grid. Drivers
    fold our ranges into regions of their own and some only report correctly from offsets
    that are whole bitmap words into a region (pds: 64 pages); when every range starts on
    the grid, so does every region a driver can build from them."""
    grid = align or page_size
    if grid % page_size:
        raise VfioUsageError(f"alignment {grid:#x} is not a multiple of the page size {page_size:#x}")
    exact = normalize(ranges, grid)
    if not exact:
        raise VfioUsageError("no IOVA ranges to track")
    rungs = [
        ("exact" if len(exact) <= max_ranges else "combined", combine_smallest_gap(exact, max_ranges)),
        ("combined", combine_smallest_gap(exact, mid_ranges)),
        ("buckets", buckets(exact)),
        ("span", combine_smallest_gap(exact, 1)),
    ]
    previous: int | None = None
    for step, plan in rungs:
        if previous is None or len(plan) < previous:
            previous = len(plan)
            yield StartPlan(step, tuple(plan))
