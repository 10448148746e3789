"""The one shared dirty bitmap that every tracker's report is OR-merged into.

One bit per host page of guest-physical (IOVA) space, in the kernel's layout: bit k is page k,
held in little-endian u64 word k // 64 at position k % 64, LSB first. Keeping the kernel layout
means a report with the bitmap's page size and a 64-page-aligned base ORs in word for word.

Trackers never hand the shared words to the kernel: a REPORT sets bits with plain
read-modify-writes, so it would race with other merges. Each tracker reports into its own zeroed
buffer (`trackers.base.ReportBuffer`) and merges that under the bitmap's lock.

Byte-level views (`view(np.uint8)` + `bitorder="little"`) assume a little-endian host, as the
kernel ABI on x86_64 and arm64 does.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import numpy as np

from orchestrator.dirty.bits import page_words, set_bit_range, words_for
from orchestrator.dirty.ranges import page_runs

_ONES = np.uint64(0xFFFF_FFFF_FFFF_FFFF)

# Words per step of a shifted merge: the shifted temporaries stay cache-sized instead of
# allocating (and page-faulting) a second full-size bitmap. Picked by measurement (bench/).
_SHIFT_CHUNK = 1 << 17

# Runs at least this many pages long are set as ranges by `mark_runs`, shorter ones bit by bit.
_LONG_RUN = 1 << 12

# A harvest clears word by word while at most this fraction of words is dirty, else in one fill.
_SPARSE_CLEAR = 1 / 8


def _zeroed_words(nwords: int) -> np.ndarray:
    """Zeroed, page-aligned u64 words; zero pages cost nothing until touched."""
    return page_words(nwords)[:nwords]


def _check_page_size(page_size: int) -> None:
    if page_size <= 0 or page_size & (page_size - 1):
        raise ValueError(f"page size {page_size} is not a power of two")


def _check_iova(iova: int) -> None:
    if iova < 0:
        raise ValueError(f"negative iova {iova:#x}")


_BYTE_POPCOUNT = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)


def _popcount_table(words: np.ndarray) -> int:
    """Popcount via a byte table, for numpy < 2 (no np.bitwise_count)."""
    return int(_BYTE_POPCOUNT[words.view(np.uint8)].sum(dtype=np.int64))


def _popcount_native(words: np.ndarray) -> int:
    return int(np.bitwise_count(words).sum(dtype=np.int64))


popcount = _popcount_native if hasattr(np, "bitwise_count") else _popcount_table


def _or_bits(dst: np.ndarray, src: np.ndarray, bit: int) -> None:
    """OR the bits of `src` into `dst` starting at bit offset `bit`; bits past `dst` are dropped."""
    first, shift = divmod(bit, 64)
    n = min(src.size, dst.size - first)
    if n <= 0:
        return
    if shift == 0:
        target = dst[first : first + n]
        np.bitwise_or(target, src[:n], out=target)
        return
    up, down = np.uint64(shift), np.uint64(64 - shift)
    tmp = np.empty(min(n, _SHIFT_CHUNK), dtype=np.uint64)
    for start in range(0, n, _SHIFT_CHUNK):
        part = src[start : min(start + _SHIFT_CHUNK, n)]
        shifted = tmp[: part.size]
        low = dst[first + start : first + start + part.size]
        np.left_shift(part, up, out=shifted)
        np.bitwise_or(low, shifted, out=low)
        high = dst[first + start + 1 : first + start + 1 + part.size]
        np.right_shift(part, down, out=shifted)
        np.bitwise_or(high, shifted[: high.size], out=high)


@cache
def _spread_table(factor: int) -> np.ndarray:
    """(256, factor) bytes: byte value v with each of its bits repeated `factor` times."""
    bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")
    return np.packbits(np.repeat(bits, factor, axis=1), axis=1, bitorder="little")


def _replicate(words: np.ndarray, factor: int) -> np.ndarray:
    """Bit k becomes bits [k*factor, (k+1)*factor): a coarse report page covers `factor` pages."""
    raw = words.view(np.uint8)
    if factor < 8:
        return _spread_table(factor)[raw].reshape(-1).view(np.uint64)
    # Each report bit becomes factor/8 whole bytes of 0x00 or 0xFF; repeat the widest unit.
    nbytes = factor // 8
    unit = np.dtype(f"<u{min(nbytes, 8)}")
    fill = np.unpackbits(raw, bitorder="little").astype(unit)
    np.multiply(fill, np.iinfo(unit).max, out=fill)
    return np.repeat(fill, nbytes // unit.itemsize).view(np.uint64)


def _coalesce(words: np.ndarray, factor: int) -> np.ndarray:
    """Bit j is set iff any of bits [j*factor, (j+1)*factor) is: a bitmap page is dirty if any
    finer report page inside it is. For factor > 64, len(words) must be a multiple of factor/64."""
    raw = words.view(np.uint8)
    if factor < 8:
        hit = np.unpackbits(raw, bitorder="little").reshape(-1, factor).any(axis=1)
    elif factor <= 64:
        hit = raw.view(f"<u{factor // 8}") != 0
    else:
        hit = words.reshape(-1, factor // 64).any(axis=1)
    out = np.zeros(words_for(hit.size), dtype=np.uint64)
    packed = np.packbits(hit, bitorder="little")
    out.view(np.uint8)[: packed.size] = packed
    return out


def _positions(index: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Sorted bit numbers of `values`, word i of which is word `index[i]` of a bitmap.

    Only nonzero bytes are unpacked, so the cost follows the dirty bytes, not 64 bits per word.
    (flatnonzero runs on bool arrays throughout: numpy's bool path is several times faster.)
    """
    raw = values.view(np.uint8)
    at = np.flatnonzero(raw != 0)
    bits = np.unpackbits(raw[at], bitorder="little").view(bool)
    hits = np.flatnonzero(bits)
    byte = at[hits >> 3]
    positions: np.ndarray = (index[byte >> 3] << 6) | ((byte & 7) << 3) | (hits & 7)
    return positions


def _nonzero_words(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    index = np.flatnonzero(words != 0)
    return index, words[index]


class DirtyBitmap:
    """Dirty bits for `npages` pages of `page_size` bytes, starting at IOVA 0.

    Thread-safe: merges and marks run from worker threads and take one lock. Harvests swap in a
    zeroed spare buffer under that lock, so a bit merged concurrently lands either in this
    harvest or in the next one, never in neither.
    """

    def __init__(self, npages: int, page_size: int = 4096) -> None:
        if npages <= 0:
            raise ValueError(f"npages must be positive, got {npages}")
        _check_page_size(page_size)
        self._npages = npages
        self._page_size = page_size
        self._nwords = words_for(npages)
        # Bits past npages in the last word must stay clear so counts and harvests are exact.
        self._tail = np.uint64((1 << (npages - 1) % 64 + 1) - 1)
        self._lock = threading.Lock()
        self._harvest_lock = threading.Lock()  # serialises users of the spare buffer
        self._words = _zeroed_words(self._nwords)
        self._spare = _zeroed_words(self._nwords)

    @property
    def npages(self) -> int:
        return self._npages

    @property
    def page_size(self) -> int:
        return self._page_size

    def mark(self, iova: int, length: int) -> None:
        """Mark every page that [iova, iova + length) touches, clipped to the bitmap."""
        _check_iova(iova)
        if length <= 0:
            return
        first = iova // self._page_size
        stop = min(-(-(iova + length) // self._page_size), self._npages)
        with self._lock:
            set_bit_range(self._words, first, stop)

    def mark_runs(self, first: np.ndarray, stop: np.ndarray) -> None:
        """Mark pages [first[i], stop[i]) for every i, clipped to the bitmap: a scan's page
        runs in one locked OR. Short runs are expanded to bits in numpy (no loop per page or
        per run); only runs of a whole block of words or more are set range by range."""
        first = np.maximum(np.asarray(first, np.int64), 0)
        stop = np.minimum(np.asarray(stop, np.int64), self._npages)
        keep = stop > first
        first, stop = first[keep], stop[keep]
        lengths = stop - first
        long = lengths >= _LONG_RUN
        short_first, short_len = first[~long], lengths[~long]
        index = values = None
        if short_len.size:
            starts = np.cumsum(short_len) - short_len
            pages = np.repeat(short_first - starts, short_len) + np.arange(int(short_len.sum()))
            pages.sort()
            words = pages >> 6
            edges = np.flatnonzero(np.diff(words)) + 1
            heads = np.r_[0, edges]
            bits = np.left_shift(np.uint64(1), (pages & 63).astype(np.uint64))
            index, values = words[heads], np.bitwise_or.reduceat(bits, heads)
        with self._lock:
            if index is not None:
                self._words[index] |= values
            for lo, hi in zip(first[long].tolist(), stop[long].tolist(), strict=True):
                set_bit_range(self._words, lo, hi)

    def mark_all(self) -> None:
        """Mark every page: the fallback when a tracker's log can no longer be trusted."""
        with self._lock:
            self._words.fill(_ONES)
            self._words[-1] &= self._tail

    def merge_report(self, iova: int, page_size: int, words: np.ndarray) -> None:
        """OR in a report: bit k of `words` covers [iova + k*page_size, +page_size).

        Pages touched by a set bit are marked, rounded outward and clipped to the bitmap. The
        page-size conversion runs outside the lock; only the final OR holds it.
        """
        _check_page_size(page_size)
        _check_iova(iova)
        src = np.ascontiguousarray(words, dtype=np.uint64)
        if src.ndim != 1:
            raise ValueError("a report is a 1-D array of u64 words")
        grain = min(page_size, self._page_size)
        if iova % grain:
            # Every report page straddles two grains: the union of the report placed at the
            # grain below and at the grain above marks exactly the pages it touches.
            base = iova - iova % grain
            self.merge_report(base, page_size, src)
            self.merge_report(base + grain, page_size, src)
            return
        end = self._npages * self._page_size
        if iova >= end:
            return
        nbits = min(src.size * 64, -(-(end - iova) // page_size))
        src = src[: words_for(nbits)]
        first_page = iova // self._page_size
        if page_size >= self._page_size:
            if page_size > self._page_size:
                src = _replicate(src, page_size // self._page_size)
            self._or_in(first_page, src)
            return
        factor = self._page_size // page_size
        lead = iova % self._page_size // page_size
        group = max(factor // 64, 1)
        if lead or src.size % group:
            aligned = np.zeros(-(-words_for(nbits + lead) // group) * group, dtype=np.uint64)
            _or_bits(aligned, src, lead)
            src = aligned
        self._or_in(first_page, _coalesce(src, factor))

    def _or_in(self, first_page: int, src: np.ndarray) -> None:
        with self._lock:
            _or_bits(self._words, src, first_page)
            self._words[-1] &= self._tail

    def count(self) -> int:
        """Number of dirty pages."""
        with self._lock:
            return popcount(self._words)

    def dirty_pages(self) -> np.ndarray:
        """Sorted dirty page numbers (int64), without clearing them."""
        with self._lock:
            index, values = _nonzero_words(self._words)
        return _positions(index, values)

    def harvest(self) -> np.ndarray:
        """Sorted dirty page numbers (int64), cleared atomically with respect to merges.

        Only nonzero words are expanded, so a sparse 1 TiB bitmap costs one scan of its words.
        """
        with self._taken() as taken:
            index, values = _nonzero_words(taken)
            if index.size > _SPARSE_CLEAR * taken.size:
                taken.fill(0)
            else:
                taken[index] = 0
        return _positions(index, values)

    def harvest_words(self, out: np.ndarray | None = None) -> np.ndarray:
        """A copy of the dirty words (kernel layout), cleared atomically; for callers that want
        `runs` or their own scan. Pass `out` (uint64, one word per 64 pages) to reuse a buffer."""
        if out is None:
            out = _zeroed_words(self._nwords)
        with self._taken() as taken:
            np.copyto(out, taken)
            taken.fill(0)
        return out

    @contextmanager
    def _taken(self) -> Iterator[np.ndarray]:
        """Swap the zeroed spare into service and lend out the words it replaced.

        The swap is O(1) under the merge lock, so merges never wait for a scan. The borrower
        zeroes the words, which become the next spare; if it fails instead, the bits go back.
        """
        with self._harvest_lock:
            with self._lock:
                taken, self._words = self._words, self._spare
            try:
                yield taken
            except BaseException:
                self._or_in(0, taken)
                taken.fill(0)
                raise
            finally:
                self._spare = taken

    @staticmethod
    def runs(pages_or_words: np.ndarray) -> np.ndarray:
        """(start_page, npages) rows of the maximal dirty runs, as an (n, 2) int64 array.

        Takes sorted unique page numbers (a signed integer array, as from `harvest`: see
        `ranges.page_runs`) or kernel layout words (uint64, as from `harvest_words`). Words are
        never expanded bit by bit: a run boundary is a bit that differs from the one below it,
        and only nonzero words and their successors can hold one.
        """
        data = np.asarray(pages_or_words)
        if data.dtype != np.uint64:
            return page_runs(data)
        near = data != 0
        near[1:] |= near[:-1]
        index = np.flatnonzero(near)
        words = data[index]
        below = np.where(index > 0, data[index - 1], 0) >> np.uint64(63)
        bounds = _positions(index, words ^ ((words << np.uint64(1)) | below))
        if bounds.size % 2:  # a run reaching the last bit has no closing edge
            bounds = np.append(bounds, data.size * 64)
        starts, stops = bounds[0::2], bounds[1::2]
        return np.column_stack((starts, stops - starts))
