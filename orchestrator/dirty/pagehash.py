"""Per-page 64-bit hashes of guest memory, vectorised.

A page hash is sum(word[i] * K[i]) mod 2^64 with fixed odd multipliers K: every K[i] is
invertible mod 2^64, so any change confined to one word always changes the hash, and the zero
page hashes to 0 (which is what a fresh destination holds). Work is chunked so a large guest
never needs a temporary the size of its memory.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

_CHUNK_BYTES = 8 << 20


@lru_cache(maxsize=4)
def _multipliers(words_per_page: int) -> np.ndarray:
    rng = np.random.default_rng(0x5EED_D1A7)
    k = rng.integers(0, 1 << 63, size=words_per_page, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    k.flags.writeable = False  # shared by every call
    return k


def page_hashes(memory: np.ndarray, page_size: int = 4096) -> np.ndarray:
    """Hash every page of `memory` (a byte or uint64 view whose size is a page multiple)."""
    words = np.ascontiguousarray(memory).view(np.uint64).reshape(-1, page_size // 8)
    k = _multipliers(page_size // 8)
    out = np.empty(words.shape[0], np.uint64)
    step = max(1, _CHUNK_BYTES // page_size)
    for lo in range(0, words.shape[0], step):
        block = words[lo : lo + step]
        out[lo : lo + step] = np.einsum("ij,j->i", block, k)  # wraps mod 2^64, no temporary
    return out
