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

    Anonymous memory: zero pages cost nothing until touched."""
    n = max(1, -(-nwords // PAGE_WORDS)) * PAGE_WORDS
    return np.frombuffer(mmap.mmap(-1, n * 8), dtype=np.uint64)


def report_span(nbits: int) -> int:
    """Words a kernel report of `nbits` bits may write: its own, rounded up to whole pages,
    and one page more. For a dirty unit that runs past the queried length the kernel sets
    bits until the end of the pages it pinned (iova_bitmap_set is bounded by those, not by
    the length), and it pins from the unit's first bitmap byte: the rounded-up rest of the
    bitmap, plus one page when that byte is not page-aligned."""
    return (-(-words_for(nbits) // PAGE_WORDS) + 1) * PAGE_WORDS


def report_words(nbits: int) -> np.ndarray:
    """A zeroed buffer a kernel report of `nbits` bits can write without reaching memory
    the buffer does not own (`report_span`)."""
    return page_words(report_span(nbits))
