"""A DMA engine for an emulated device: it really writes the guest RAM of its VM.

It sweeps its window page by page in a checkable pattern: write number n (1, 2, ...) stores
(n, page address ^ K) in the first 16 bytes of page (n-1) mod npages. Its position is the
device's state (`device_data`), so migration v2 carries it: the destination device resumes
the sweep where the source stopped, into the destination's RAM. Writes go through the
device model, so they are logged exactly as hardware logs them, and only while the device
may DMA.
"""

from __future__ import annotations

import functools
import struct
import threading
import time
from dataclasses import dataclass

import numpy as np

from orchestrator.emulated.models.base import DeviceModel

PAGE = 4096
TAG = 0x5BD1E9955BD1E995  # mixed into each record so a stale or misplaced page shows
_STATE = struct.Struct("<8sQQQ")
_MAGIC = b"DMAENG01"


@dataclass(frozen=True)
class EngineState:
    writes: int  # how many writes the sweep has made
    window_gpa: int
    window_pages: int

    def pack(self) -> bytes:
        return _STATE.pack(_MAGIC, self.writes, self.window_gpa, self.window_pages)

    @classmethod
    def unpack(cls, data: bytes) -> EngineState:
        magic, n, gpa, pages = _STATE.unpack_from(data)
        if magic != _MAGIC:
            raise ValueError("device state holds no DMA engine state")
        return cls(n, gpa, pages)


def expected_writes(state: EngineState) -> np.ndarray:
    """Per page of the window, the write number it must hold (0: never written)."""
    p = np.arange(state.window_pages, dtype=np.int64) + 1
    n = state.writes
    return np.where(p <= n, n - ((n - p) % state.window_pages), 0)


def check_window(ram: np.ndarray, state: EngineState) -> list[int]:
    """Guest page numbers in the window whose record disagrees with the engine state."""
    lo = state.window_gpa
    words = np.asarray(ram[lo : lo + state.window_pages * PAGE]).view(np.uint64).reshape(-1, PAGE // 8)
    want = expected_writes(state).astype(np.uint64)
    addr = (np.arange(state.window_pages, dtype=np.uint64) * np.uint64(PAGE) + np.uint64(lo)) ^ np.uint64(TAG)
    want_tag = np.where(want > 0, addr, np.uint64(0))
    bad = (words[:, 0] != want) | (words[:, 1] != want_tag)
    return (np.flatnonzero(bad) + lo // PAGE).tolist()


class DmaEngine:
    """Writes `rate` pages per second into the device's window while the device runs."""

    def __init__(
        self,
        model: DeviceModel,
        ram_path: str,
        window_gpa: int,
        window_pages: int,
        rate: int = 4000,
        tick_s: float = 0.002,
    ) -> None:
        if window_gpa % PAGE or window_pages <= 0:
            raise ValueError(f"DMA window {window_gpa:#x}+{window_pages} pages is not page-aligned and non-empty")
        self.model = model
        self.rate = rate
        self.tick_s = tick_s
        size = window_gpa + window_pages * PAGE
        self._ram = np.memmap(ram_path, np.uint64, mode="r+", shape=(size // 8,))
        self._window = self._ram[window_gpa // 8 :].reshape(window_pages, PAGE // 8)
        self._carry = 0.0
        if not model.device_data.startswith(_MAGIC):
            model.device_data = EngineState(0, window_gpa, window_pages).pack()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"dma-{id(model):x}", daemon=True)

    @property
    def state(self) -> EngineState:
        return EngineState.unpack(self.model.device_data)

    def check(self) -> list[int]:
        """Pages of the window that disagree with the engine's state (quiesce it first)."""
        return check_window(self._ram.view(np.uint8), self.state)

    def start(self) -> DmaEngine:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        del self._window
        self._ram._mmap.close()  # type: ignore[attr-defined]  # memmap has no public close; numpy's stubs omit _mmap

    def _run(self) -> None:
        next_t = time.monotonic()
        while not self._stop.wait(max(0.0, next_t - time.monotonic())):
            next_t += self.tick_s
            self._carry += self.rate * self.tick_s
            k = int(self._carry)
            if k:
                ran = self.model.dma(functools.partial(self._burst, k))
                # a quiesced device banks nothing: it does not catch up after resuming
                self._carry = self._carry - k if ran else 0.0

    def _burst(self, k: int) -> list[tuple[int, int]]:
        """Called with the device's transition lock held: write, advance the state, and
        return the written ranges for the log."""
        st = self.state
        k = min(k, st.window_pages)
        seq = np.arange(st.writes + 1, st.writes + k + 1, dtype=np.uint64)
        idx = ((seq - np.uint64(1)) % np.uint64(st.window_pages)).astype(np.int64)
        self._window[idx, 0] = seq
        self._window[idx, 1] = (idx.astype(np.uint64) * np.uint64(PAGE) + np.uint64(st.window_gpa)) ^ np.uint64(TAG)
        self.model.device_data = EngineState(st.writes + k, st.window_gpa, st.window_pages).pack()
        first = int(idx[0])
        if first + k <= st.window_pages:
            return [(st.window_gpa + first * PAGE, k * PAGE)]
        head = st.window_pages - first
        return [(st.window_gpa + first * PAGE, head * PAGE), (st.window_gpa, (k - head) * PAGE)]
