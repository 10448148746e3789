"""Micro benchmarks of the shared dirty bitmap for a 1 TiB guest at 4 KiB pages.

That is 2^28 pages, a 32 MiB bitmap. Merge bandwidth is reported beside np.copyto of the same
32 MiB measured in the same rounds: an OR-merge reads two buffers and writes one, memcpy reads
one and writes one, so a merge near 2/3 of memcpy is as good as memory allows.
"""

from __future__ import annotations

import numpy as np

from bench import Case, Options, Result, gbps, median_seconds, ms, suite
from orchestrator.dirty.bitmap import DirtyBitmap
from orchestrator.dirty.bits import report_words, words_for

PAGE = 4096
NPAGES = 1 << 28  # 1 TiB / 4 KiB
SPARSE_PAGES = 10_000


def _words(npages: int) -> np.ndarray:
    """The words of a report over `npages` pages, in a kernel-ready report buffer."""
    return report_words(npages)[: words_for(npages)]


def _report(dirty_pages: np.ndarray) -> np.ndarray:
    """A report buffer (bitmap page size, base 0) with the given pages set."""
    words = _words(NPAGES)
    np.bitwise_or.at(words, dirty_pages >> 6, np.left_shift(np.uint64(1), (dirty_pages & 63).astype(np.uint64)))
    return words


@suite("micro")
def merge(options: Options) -> Result:
    """OR-merge of one tracker's full 1 TiB report: aligned fast path, shifted, and 2 MiB pages."""
    report = _words(NPAGES)
    report[:] = np.random.default_rng(0).integers(0, 2**64, report.size, dtype=np.uint64)
    copy = np.empty_like(report)
    bitmap = DirtyBitmap(NPAGES)
    huge = _words(NPAGES // 512)  # the same guest tracked at 2 MiB
    huge[::3] = np.uint64(0x0101_0101_0101_0101)
    seconds = median_seconds(
        {
            "memcpy": Case(lambda: np.copyto(copy, report)),
            "aligned": Case(lambda: bitmap.merge_report(0, PAGE, report)),
            "shifted": Case(lambda: bitmap.merge_report(5 * PAGE, PAGE, report)),
            "huge": Case(lambda: bitmap.merge_report(0, 512 * PAGE, huge)),
        },
        options.repeat,
    )
    memcpy = gbps(report.nbytes, seconds["memcpy"])
    aligned = gbps(report.nbytes, seconds["aligned"])
    shifted = gbps(report.nbytes, seconds["shifted"])
    return {
        "memcpy_gbps": memcpy,
        "merge_gbps": aligned,
        "merge_ratio": round(aligned / memcpy, 3),
        "merge_shifted_gbps": shifted,
        "merge_shifted_ratio": round(shifted / memcpy, 3),
        "merge_2mib_report_ms": ms(seconds["huge"]),
    }


@suite("micro")
def harvest(options: Options) -> Result:
    """Harvest into page numbers: sparse (10,000 pages spread out) and dense (every word dirty)."""
    sparse = _report(np.linspace(0, NPAGES - 1, SPARSE_PAGES, dtype=np.int64))
    dense = _report(np.arange(0, NPAGES, 64, dtype=np.int64) + 17)
    bitmap = DirtyBitmap(NPAGES)
    words = _words(NPAGES)  # the caller's reused buffer for harvest_words
    seconds = median_seconds(
        {
            "sparse": Case(bitmap.harvest, lambda: bitmap.merge_report(0, PAGE, sparse)),
            "dense": Case(bitmap.harvest, lambda: bitmap.merge_report(0, PAGE, dense)),
            "count": Case(bitmap.count, lambda: bitmap.merge_report(0, PAGE, dense)),
            "words": Case(lambda: bitmap.harvest_words(words), lambda: bitmap.merge_report(0, PAGE, sparse)),
            "runs": Case(lambda: DirtyBitmap.runs(words), lambda: np.copyto(words, sparse)),
        },
        options.repeat,
    )
    return {
        "harvest_1tib_ms": ms(seconds["sparse"]),
        "harvest_1tib_pages": SPARSE_PAGES,
        "harvest_dense_ms": ms(seconds["dense"]),
        "harvest_dense_pages": NPAGES // 64,
        "harvest_words_1tib_ms": ms(seconds["words"]),
        "runs_sparse_1tib_ms": ms(seconds["runs"]),
        "count_1tib_ms": ms(seconds["count"]),
    }
