"""The tracker set: drives every tracker, merges into one bitmap, and never loses a bit.

Policy (architecture invariants 4, 6, 7, 8, 10):
- every blocking call runs in a worker thread under a watchdog; a hung call is a failure;
- on any failure the tracker's whole covered range is marked dirty first; then the tracker is
  degraded: its covered range is marked dirty every round until a STOP+START succeeds;
- restarts back off exponentially, are never tried while an earlier call is still running
  (a hung ioctl holds the device), and after `max_restarts` consecutive failures the tracker
  stays perma-dirty and the migration goes on;
- after a successful restart the covered range is marked once more, because writes between
  the failure and the new START were logged nowhere;
- every tracker is stopped on every exit path, including cancellation.
"""

from __future__ import annotations

import asyncio
import errno as _errno
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..bitmap import DirtyBitmap
from ..blocking import run_blocking
from ..memory import MemoryLayout
from ..vfio.ranges import IovaRange
from .base import SentAware, StartOutcome, Tracker, mark_ranges
from .events import TrackerEvent, TrackerState, TrackerStats


@dataclass(frozen=True)
class RecoveryPolicy:
    timeout: float = 5.0  # seconds one tracker call may take before it counts as hung
    max_restarts: int = 3  # consecutive failed restarts before a tracker stays perma-dirty
    backoff_initial: float = 0.05
    backoff_max: float = 2.0

    def backoff(self, failures: int) -> float:
        return min(self.backoff_initial * (2**failures), self.backoff_max)


@dataclass
class _Slot:
    tracker: Tracker
    covered: list[IovaRange]
    stats: TrackerStats
    inflight: asyncio.Future | None = None
    failures: int = 0
    next_restart: float = 0.0
    live: bool = False  # a start was issued and no stop since: the device may be logging


def _errno_of(exc: BaseException | None) -> int | None:
    if isinstance(exc, TimeoutError):
        return _errno.ETIMEDOUT
    return getattr(exc, "errno", None)


class TrackerSet:
    def __init__(
        self,
        trackers: Sequence[Tracker],
        bitmap: DirtyBitmap,
        layout: MemoryLayout,
        policy: RecoveryPolicy = RecoveryPolicy(),
        on_event: Callable[[TrackerEvent], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        names = [t.name for t in trackers]
        if len(set(names)) != len(names):
            raise ValueError(f"tracker names must be unique, got {names}")
        if bitmap.page_size != layout.page_size:
            raise ValueError(f"bitmap page {bitmap.page_size} != layout page {layout.page_size}")
        self.bitmap = bitmap
        self.layout = layout
        self.policy = policy
        self.events: list[TrackerEvent] = []
        self._on_event = on_event
        self._clock = clock
        self._slots = [
            _Slot(t, t.covered(layout), TrackerStats(t.name, t.kind, layout.page_size)) for t in trackers
        ]

    # -- lifecycle ----------------------------------------------------------------------------
    async def __aenter__(self) -> TrackerSet:
        try:
            await self.start()
        except BaseException:
            await asyncio.shield(self.stop())
            raise
        return self

    async def __aexit__(self, *exc_info) -> None:
        await asyncio.shield(self.stop())

    async def start(self) -> None:
        await asyncio.gather(*(self._start_one(s) for s in self._slots))

    async def stop(self) -> None:
        await asyncio.gather(*(self._stop_one(s) for s in self._slots))

    async def collect(self, round_: int, final: bool = False) -> None:
        """One round: every tracker ORs what it saw into the shared bitmap, or falls back."""
        await asyncio.gather(*(self._collect_one(s, round_, final) for s in self._slots))

    def record_sent(self, pages: np.ndarray, data: np.ndarray) -> None:
        """Tell content-aware trackers what the destination now holds for these pages."""
        for s in self._slots:
            if isinstance(s.tracker, SentAware):
                s.tracker.record_sent(pages, data)

    @property
    def on_sent(self) -> Callable[[np.ndarray, np.ndarray], None] | None:
        """`record_sent` for a sink's `on_sent`, or None when no tracker needs the bytes sent:
        a sink may then send pages without taking a snapshot of them."""
        return self.record_sent if any(isinstance(s.tracker, SentAware) for s in self._slots) else None

    def stats(self) -> list[TrackerStats]:
        return [s.stats for s in self._slots]

    # -- one tracker ------------------------------------------------------------------------
    async def _call(self, slot: _Slot, fn, *args):
        fut = run_blocking(fn, *args, name=f"{slot.tracker.name}:{fn.__name__}")
        slot.inflight = fut

        def settled(f: asyncio.Future) -> None:
            if slot.inflight is f:
                slot.inflight = None
            if not f.cancelled():
                f.exception()  # retrieved: a late failure of an abandoned call is expected

        fut.add_done_callback(settled)
        return await asyncio.wait_for(asyncio.shield(fut), self.policy.timeout)

    def _emit(self, slot: _Slot, round_: int, kind: str, exc: BaseException | None, action: str) -> None:
        detail = "" if exc is None else (str(exc) or type(exc).__name__)
        ev = TrackerEvent(slot.tracker.name, round_, kind, _errno_of(exc), action, detail)
        self.events.append(ev)
        if self._on_event:
            self._on_event(ev)

    def _mark_covered(self, slot: _Slot) -> None:
        mark_ranges(self.bitmap, slot.covered)
        slot.stats.fallbacks += 1

    def _fail(self, slot: _Slot, round_: int, kind: str, exc: BaseException) -> None:
        """Invariant 4: assume the log is corrupted; everything it covers is dirty, first."""
        slot.stats.errors += 1
        self._mark_covered(slot)
        slot.stats.state = TrackerState.DEGRADED
        delay = self.policy.backoff(slot.failures)
        slot.next_restart = self._clock() + delay
        self._emit(slot, round_, kind, exc, f"covered range marked dirty; restart in {delay:.3g}s")

    def _started(self, slot: _Slot, round_: int, outcome: StartOutcome) -> None:
        slot.stats.page_size = outcome.page_size
        for a in outcome.attempts:
            if a.errno is not None:
                err = OSError(a.errno, _errno.errorcode.get(a.errno, str(a.errno)))
                self._emit(slot, round_, "start-fallback", err, f"{a.step} ({a.ranges} ranges) refused")
        if not outcome.tracked:
            slot.stats.state = TrackerState.PERMA_DIRTY
            self._emit(slot, round_, "perma-dirty", None, "nothing can be logged: covered range dirty every round")
            return
        slot.stats.state = TrackerState.RUNNING
        untracked = sum(r.length for r in outcome.untracked)
        note = f"; {untracked} reachable bytes untracked, dirty every round" if untracked else ""
        self._emit(
            slot, round_, "start", None,
            f"tracking {len(outcome.tracked)} ranges at {outcome.page_size} B pages{note}",
        )

    async def _start_one(self, slot: _Slot) -> None:
        slot.live = True
        try:
            outcome = await self._call(slot, slot.tracker.start, self.layout)
        except (Exception, TimeoutError) as exc:
            self._fail(slot, 0, "start-error", exc)
            return
        self._started(slot, 0, outcome)

    async def _collect_one(self, slot: _Slot, round_: int, final: bool) -> None:
        state = slot.stats.state
        if state == TrackerState.RUNNING:
            fn = getattr(slot.tracker, "collect_final", None) if final else None
            try:
                await self._call(slot, fn or slot.tracker.collect, self.bitmap)
            except TimeoutError as exc:
                self._fail(slot, round_, "timeout", exc)
            except Exception as exc:
                self._fail(slot, round_, "report-error", exc)
            else:
                slot.stats.reports += 1
            return
        if state == TrackerState.DEGRADED and not final and slot.inflight is None and self._clock() >= slot.next_restart:
            await self._restart(slot, round_)
        if state in (TrackerState.DEGRADED, TrackerState.PERMA_DIRTY):
            # After the restart attempt: a successful START logs from now on, and this mark
            # covers everything written before it.
            self._mark_covered(slot)

    async def _restart(self, slot: _Slot, round_: int) -> None:
        try:
            await self._call(slot, slot.tracker.stop)
        except (Exception, TimeoutError) as exc:
            self._emit(slot, round_, "stop-error", exc, "ignored; restarting anyway")
        try:
            outcome = await self._call(slot, slot.tracker.start, self.layout)
        except (Exception, TimeoutError) as exc:
            slot.failures += 1
            slot.stats.errors += 1
            if slot.failures > self.policy.max_restarts:
                slot.stats.state = TrackerState.PERMA_DIRTY
                self._emit(slot, round_, "perma-dirty", exc, f"gave up after {slot.failures} failed restarts")
            else:
                delay = self.policy.backoff(slot.failures)
                slot.next_restart = self._clock() + delay
                self._emit(slot, round_, "restart-failed", exc, f"next attempt in {delay:.3g}s")
            return
        slot.failures = 0
        slot.stats.restarts += 1
        self._emit(slot, round_, "restart", None, "STOP+START succeeded")
        self._started(slot, round_, outcome)

    async def _stop_one(self, slot: _Slot) -> None:
        if not slot.live:
            return
        slot.live = False
        try:
            await self._call(slot, slot.tracker.stop)
        except (Exception, TimeoutError) as exc:
            self._emit(slot, -1, "stop-error", exc, "tracker may still be logging")
        else:
            self._emit(slot, -1, "stop", None, "stopped")
        slot.stats.state = TrackerState.STOPPED
