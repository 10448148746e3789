"""Writing a dirty report into the user's bitmap, as drivers/iommu/iova_bitmap.c does.

The user bitmap is a byte array at any alignment; bit n (LSB first, so little-endian u64 words)
covers IOVA `iova + (n << pgshift)`. Bits are only ever OR-ed in. Each dirty unit the driver
records (iova_bitmap_set) sets every bit it touches. A unit starting below `iova`, or in a byte
at or past `mapped_total_index`, is dropped whole: iova_bitmap_advance_to() finds no index.

The tail is bounded by pinned user pages, not by `length`: a unit that runs past the bitmap's
last byte makes iova_bitmap_set() pin a window starting at the unit's first byte,
DIV_ROUND_UP(bytes left, PAGE_SIZE) + !!offset_in_page(addr) pages (iova_bitmap_get), and set
bits up to the end of the last page pinned. So bits past `length` are set through the end of
that page (one page further than the bitmap's last byte when the window starts mid-page), and
none beyond it.

Pinning failures are silent in the kernel (iova_bitmap_set returns void): bits that would land
in an unmapped or read-only user page are lost and the ioctl still succeeds. We do the same, at
user-page granularity.
"""

from __future__ import annotations

import errno

import numpy as np

from orchestrator.dirty.bits import set_bit_range
from orchestrator.emulated.runs import U64_MAX, merge_runs
from orchestrator.emulated.usermem import copy_from_user, copy_to_user

USER_PAGE = 4096
# iova_bitmap_get pins at most one page of `struct page *`: 512 pages (2 MiB of bitmap) a window.
_MAX_PIN_PAGES = USER_PAGE // 8
# Dirty bits further apart than this many bitmap bytes are written in separate passes, so
# a sparse report over a huge range never reads or writes the untouched bytes between them.
_CLUSTER_GAP = 512


def _div_round_up(a: int, b: int) -> int:
    return -(-a // b)


class IovaBitmap:
    def __init__(self, iova: int, length: int, page_size: int, data: int) -> None:
        self.iova = iova
        self.length = length
        self.pgshift = (page_size & -page_size).bit_length() - 1  # __ffs(page_size)
        self.data = data
        self.mapped_total_index = (((length - 1) & U64_MAX) >> self.pgshift) // 8 + 1

    def set_units(self, first: np.ndarray, last: np.ndarray, size: int, base: int = 0) -> None:
        """iova_bitmap_set(base + u*size, size) for each unit u of the sorted inclusive runs."""
        if len(first) == 0:
            return
        u_min = max(_div_round_up(self.iova - base, size), 0)  # first unit not starting below iova
        # Last unit starting in a byte the bitmap has: later ones find no index and are dropped.
        u_max = _div_round_up(self.iova + (self.mapped_total_index * 8 << self.pgshift) - base, size) - 1
        if u_min > min(u_max, U64_MAX):
            return
        first = np.maximum(first, np.uint64(u_min))
        last = np.minimum(last, np.uint64(min(u_max, U64_MAX)))
        keep = first <= last
        first, last = first[keep], last[keep]
        if len(first) == 0:
            return
        sz, pg, b, iv = np.uint64(size), np.uint64(self.pgshift), np.uint64(base), np.uint64(self.iova)
        bit_first = (first * sz + b - iv) >> pg
        bit_last = (last * sz + b + (sz - np.uint64(1)) - iv) >> pg
        over = np.flatnonzero(bit_last >= np.uint64(self.mapped_total_index * 8))
        if len(over):  # only the unit straddling the bitmap's end: disjoint sorted runs
            i = int(over[-1])
            tail_byte = int((last[i] * sz + b - iv) >> pg) >> 3
            bit_last[i] = min(int(bit_last[i]), self._pinned_last_bit(tail_byte))
        self._or_bits(bit_first, bit_last)

    def _pinned_last_bit(self, start_byte: int) -> int:
        """The last bit of the last user page iova_bitmap_get pins for a window at `start_byte`.

        A window too large for one pin is continued by page-aligned windows, the last of which
        ends with the page holding the bitmap's last byte."""
        addr = self.data + start_byte
        npages = _div_round_up(self.mapped_total_index - start_byte, USER_PAGE) + (addr % USER_PAGE != 0)
        if npages > _MAX_PIN_PAGES:
            end = _div_round_up(self.data + self.mapped_total_index, USER_PAGE) * USER_PAGE
        else:
            end = (addr // USER_PAGE + npages) * USER_PAGE
        return (end - self.data) * 8 - 1

    def _or_bits(self, first: np.ndarray, last: np.ndarray) -> None:
        first, last = merge_runs(first, last)
        byte_first, byte_last = first >> np.uint64(3), last >> np.uint64(3)
        breaks = np.flatnonzero(byte_first[1:] - byte_last[:-1] > _CLUSTER_GAP) + 1
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(first)], strict=False):
            self._or_cluster(first[lo:hi], last[lo:hi])

    def _or_cluster(self, first: np.ndarray, last: np.ndarray) -> None:
        """Read the bytes the runs touch once, OR the bits in, write them back once."""
        b0, b1 = int(first[0]) >> 3, (int(last[-1]) >> 3) + 1
        word0 = b0 & ~7
        words = np.zeros((b1 - word0 + 7) // 8, dtype=np.uint64)
        rel_first = (first - np.uint64(word0 * 8)).astype(np.int64)
        rel_stop = (last - np.uint64(word0 * 8)).astype(np.int64) + 1
        lengths = rel_stop - rel_first
        short = lengths < 64
        if short.any():
            starts, lens = rel_first[short], lengths[short]
            offsets = np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
            bits = np.repeat(starts, lens) + offsets
            np.bitwise_or.at(words, bits >> 6, np.left_shift(np.uint64(1), (bits & 63).astype(np.uint64)))
        for start, stop in zip(rel_first[~short].tolist(), rel_stop[~short].tolist(), strict=False):
            set_bit_range(words, start, stop)
        ours = words.view(np.uint8)[b0 - word0 : b1 - word0]
        self._or_user(self.data + b0, ours)

    @staticmethod
    def _or_user(addr: int, ours: np.ndarray) -> None:
        try:
            _rmw(addr, ours)
        except OSError as e:
            if e.errno != errno.EFAULT:
                raise
            # Some page is bad: like pin_user_pages, go page by page and lose only those bits.
            pos = 0
            while pos < len(ours):
                step = min(len(ours) - pos, USER_PAGE - (addr + pos) % USER_PAGE)
                try:
                    _rmw(addr + pos, ours[pos : pos + step])
                except OSError as e2:
                    if e2.errno != errno.EFAULT:
                        raise
                pos += step


class DiscardedBitmap(IovaBitmap):
    """Where a failing report's bits go: the driver read and cleared them, userspace sees none."""

    def __init__(self) -> None:
        super().__init__(0, 1, 4096, 0)

    def set_units(self, first: np.ndarray, last: np.ndarray, size: int, base: int = 0) -> None:
        return None


def _rmw(addr: int, ours: np.ndarray) -> None:
    theirs = np.frombuffer(copy_from_user(addr, len(ours)), dtype=np.uint8)
    copy_to_user(addr, (theirs | ours).tobytes())
