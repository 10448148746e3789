"""Bit-range operations on little-endian uint64 word arrays (the kernel's bitmap layout).

Bit k lives in word k // 64 at position k % 64, LSB first. Both the emulated kernel (writing
reports) and the shared dirty bitmap need "set bits [start, stop)" without a per-bit loop.
"""

from __future__ import annotations

import mmap

import numpy as np

_ONES = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


def _mask_from(bit: int) -> np.uint64:
    """Bits bit..63 of one word."""
    return np.uint64((0xFFFF_FFFF_FFFF_FFFF << bit) & 0xFFFF_FFFF_FFFF_FFFF)


def set_bit_range(words: np.ndarray, start: int, stop: int) -> None:
    """OR ones into bits [start, stop) of `words` (uint64, kernel layout)."""
    if stop <= start:
        return
    first, last = start >> 6, (stop - 1) >> 6
    head = _mask_from(start & 63)
    tail = np.uint64(0xFFFF_FFFF_FFFF_FFFF >> (63 - ((stop - 1) & 63)))
    if first == last:
        words[first] |= head & tail
        return
    words[first] |= head
    words[first + 1 : last] = _ONES
    words[last] |= tail


def words_for(nbits: int) -> int:
    """uint64 words needed for nbits bits."""
    return (nbits + 63) >> 6


PAGE_WORDS = mmap.PAGESIZE // 8


def page_words(nwords: int) -> np.ndarray:
    """At least `nwords` zeroed u64 words, starting and ending on a page boundary.

    Anonymous memory: zero pages cost nothing until touched. Whole pages matter for report
    buffers: the kernel pins a user bitmap page by page and, for a dirty unit that runs past
    the queried length, sets bits up to the end of the last page it pinned (iova_bitmap_set
    is bounded by the pinned pages, not by the length) - into memory a tight buffer does not
    own."""
    n = max(1, -(-nwords // PAGE_WORDS)) * PAGE_WORDS
    return np.frombuffer(mmap.mmap(-1, n * 8), dtype=np.uint64)
