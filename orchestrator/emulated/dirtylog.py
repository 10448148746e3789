"""A device's (or IOMMU domain's) internal dirty log: which units of 2**shift bytes were written.

DMA writes arrive far more often than reports, so a write only appends a run; runs are sorted
and merged when the log is read. Whole-range writes stay one run however large they are.
"""

from __future__ import annotations

import threading

import numpy as np

from orchestrator.emulated.runs import merge_runs

_EMPTY = np.empty(0, dtype=np.uint64)


class UnitLog:
    def __init__(self, shift: int) -> None:
        self.shift = shift
        self._lock = threading.Lock()
        self._pending: list[tuple[int, int]] = []
        self._first = _EMPTY
        self._last = _EMPTY

    def mark(self, lo: int, hi: int) -> None:
        """Every unit touched by bytes [lo, hi) is dirty."""
        if hi > lo:
            with self._lock:
                self._pending.append((lo >> self.shift, (hi - 1) >> self.shift))

    def clear(self) -> None:
        with self._lock:
            self._pending.clear()
            self._first = self._last = _EMPTY

    def _normalise(self) -> None:
        if self._pending:
            extra = np.array(self._pending, dtype=np.uint64).reshape(-1, 2)
            self._pending.clear()
            self._first, self._last = merge_runs(
                np.concatenate([self._first, extra[:, 0]]), np.concatenate([self._last, extra[:, 1]])
            )

    def take(self, lo: int, hi: int, clear: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Runs of dirty units touching bytes [lo, hi), clipped to them; removed if `clear`."""
        if hi <= lo:
            return _EMPTY, _EMPTY
        u_lo, u_hi = np.uint64(lo >> self.shift), np.uint64((hi - 1) >> self.shift)
        with self._lock:
            self._normalise()
            first, last = self._first, self._last
            i0 = int(np.searchsorted(last, u_lo, side="left"))
            i1 = int(np.searchsorted(first, u_hi, side="right"))
            if i0 >= i1:
                return _EMPTY, _EMPTY
            out_first = np.maximum(first[i0:i1], u_lo)
            out_last = np.minimum(last[i0:i1], u_hi)
            if clear:
                keep_first, keep_last = [first[:i0]], [last[:i0]]
                if first[i0] < u_lo:
                    keep_first.append(first[i0 : i0 + 1])
                    keep_last.append(np.array([u_lo - np.uint64(1)], dtype=np.uint64))
                if last[i1 - 1] > u_hi:
                    keep_first.append(np.array([u_hi + np.uint64(1)], dtype=np.uint64))
                    keep_last.append(last[i1 - 1 : i1])
                keep_first.append(first[i1:])
                keep_last.append(last[i1:])
                self._first, self._last = np.concatenate(keep_first), np.concatenate(keep_last)
            return out_first, out_last
