"""The data file a `fwcfg=` fixture guest has QEMU's fw_cfg device copy into its RAM.

Its content is a formula so that the guest, and `fixtures.guest.pattern` on the host, can
tell from a page's words which copy it came from. `orchestrator.native.builds` writes the file
into the per-user cache with `write_fwcfg()`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FWCFG_SIZE = 16 << 20  # the data file
FWCFG_WORD_MUL = 0x9E3779B1


def fwcfg_words(offset: int, length: int) -> np.ndarray:
    """The bytes the data file's word formula gives for ``[offset, offset + length)``
    (``offset`` a multiple of 4; past the file's end the formula just goes on)."""
    first = offset // 4 + 1
    words = np.arange(first, first + length // 4, dtype=np.uint64).astype(np.uint32)
    return (words * np.uint32(FWCFG_WORD_MUL)).astype("<u4").view(np.uint8)


def fwcfg_file() -> np.ndarray:
    """The fw_cfg workload's data file: 16 MiB of little-endian u32 words, word ``i``
    holding ``(i + 1) * FWCFG_WORD_MUL`` (mod 2**32), so no two words are alike."""
    return fwcfg_words(0, FWCFG_SIZE)


def write_fwcfg(path: Path) -> None:
    """Write the data file (what QEMU's `-fw_cfg ...,file=` is given) to `path`."""
    fwcfg_file().tofile(path)
