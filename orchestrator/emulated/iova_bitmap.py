"""Writing a dirty report into the user's bitmap, as drivers/iommu/iova_bitmap.c does.

The user bitmap is a byte array at any alignment; bit n (LSB first, so little-endian u64 words)
covers IOVA `iova + (n << pgshift)`. Bits are only ever OR-ed in. A dirty unit is recorded by
setting every bit it touches; a unit starting below `iova` is dropped whole (its index wraps),
and bits past the last byte of the bitmap (`mapped_total_index`) are dropped, while bits past
`length` inside that last byte are still set.

Pinning failures are silent in the kernel (iova_bitmap_set returns void): bits that would land
in an unmapped or read-only user page are lost and the ioctl still succeeds. We do the same, at
user-page granularity.
"""

from __future__ import annotations

import errno

import numpy as np

from ..bits import set_bit_range
from .runs import U64_MAX, merge_runs
from .usermem import copy_from_user, copy_to_user

USER_PAGE = 4096
# Dirty bits further apart than this many bitmap bytes are written in separate passes, so
# a sparse report over a huge range never reads or writes the untouched bytes between them.
_CLUSTER_GAP = 512


class IovaBitmap:
    def __init__(self, iova: int, length: int, page_size: int, data: int) -> None:
        self.iova = iova
        self.length = length
        self.pgshift = (page_size & -page_size).bit_length() - 1  # __ffs(page_size)
        self.data = data
        self.mapped_total_index = (((length - 1) & U64_MAX) >> self.pgshift) // 8 + 1

    def set_units(self, first: np.ndarray, last: np.ndarray, shift: int) -> None:
        """iova_bitmap_set(u << shift, 1 << shift) for each unit u of the inclusive runs."""
        if len(first) == 0:
            return
        u_min = -(-self.iova >> shift)  # first unit not starting below iova
        if u_min > U64_MAX >> shift:
            return
        first = np.maximum(first, np.uint64(u_min))
        keep = first <= last
        first, last = first[keep], last[keep]
        sh, pg, base = np.uint64(shift), np.uint64(self.pgshift), np.uint64(self.iova)
        bit_first = ((first << sh) - base) >> pg
        bit_last = (((last << sh) | np.uint64((1 << shift) - 1)) - base) >> pg
        max_bit = self.mapped_total_index * 8 - 1
        if max_bit < U64_MAX:
            bit_last = np.minimum(bit_last, np.uint64(max_bit))
        keep = bit_first <= bit_last
        self._or_bits(bit_first[keep], bit_last[keep])

    def _or_bits(self, first: np.ndarray, last: np.ndarray) -> None:
        if len(first) == 0:
            return
        first, last = merge_runs(first, last)
        byte_first, byte_last = first >> np.uint64(3), last >> np.uint64(3)
        breaks = np.flatnonzero(byte_first[1:] - byte_last[:-1] > _CLUSTER_GAP) + 1
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(first)]):
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
        for start, stop in zip(rel_first[~short].tolist(), rel_stop[~short].tolist()):
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


def _rmw(addr: int, ours: np.ndarray) -> None:
    theirs = np.frombuffer(copy_from_user(addr, len(ours)), dtype=np.uint8)
    copy_to_user(addr, (theirs | ours).tobytes())
