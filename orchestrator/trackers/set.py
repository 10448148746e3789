"""The tracker set: drives every tracker, merges into one bitmap, and never loses a bit.

The I/O half of recovery (the architecture's invariants on tracker errors, untracked memory,
watched calls, content trackers and exit paths); its decisions are the
sans-IO `Recovery` machine's (`recovery.py`):
- every blocking call runs in a worker thread under a watchdog (`watchdog.watched`); a hung
  call is a failure, and the call it abandoned keeps the tracker busy until it really ends;
  only a `Bounded` tracker's final collect runs on the loop's thread, after every other
  tracker's call has been started, so it overlaps them and costs no handoff in the downtime;
- each round asks the machine what to do with each tracker (collect, restart, only mark),
  tells it how that went, and marks the tracker's covered range dirty whenever it says so;
- every tracker is stopped on every exit path, including cancellation.
"""

from __future__ import annotations

import asyncio
import errno as _errno
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator.dirty.bitmap import DirtyBitmap
from orchestrator.dirty.memory import MemoryLayout
from orchestrator.dirty.ranges import IovaRange
from orchestrator.trackers.base import Bounded, SentAware, StartOutcome, Tracker, mark_ranges
from orchestrator.trackers.events import EventKind, TrackerEvent, TrackerState, TrackerStats
from orchestrator.trackers.recovery import Recovery, RecoveryPolicy, Step, Verdict
from orchestrator.trackers.watchdog import watched


@dataclass
class _Slot:
    tracker: Tracker
    covered: list[IovaRange]
    recovery: Recovery
    inflight: int = 0  # calls not yet returned, abandoned ones included
    live: bool = False  # a start was issued and no stop since: the device may be logging

    @property
    def stats(self) -> TrackerStats:
        return self.recovery.stats


def _errno_of(exc: BaseException | None) -> int | None:
    if isinstance(exc, TimeoutError):
        return _errno.ETIMEDOUT
    return getattr(exc, "errno", None)


def _retry_note(v: Verdict) -> str:
    return "" if v.retry_in is None else f"{v.retry_in:.3g}s"


def _bounded(tracker: Tracker) -> bool:
    return isinstance(tracker, Bounded) and tracker.bounded_collect


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
            _Slot(t, t.covered(layout), Recovery(TrackerStats(t.name, t.kind, layout.page_size), policy))
            for t in trackers
        ]

    # -- lifecycle ----------------------------------------------------------------------------
    async def __aenter__(self) -> TrackerSet:
        try:
            await self.start()
        except BaseException:
            await asyncio.shield(self.stop())
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.shield(self.stop())

    async def start(self) -> None:
        await asyncio.gather(*(self._start_one(s) for s in self._slots))

    async def stop(self) -> None:
        await asyncio.gather(*(self._stop_one(s) for s in self._slots))

    async def collect(self, round_: int, final: bool = False) -> None:
        """One round: every tracker ORs what it saw into the shared bitmap, or falls back."""
        inline = [final and _bounded(s.tracker) for s in self._slots]
        order = sorted(range(len(self._slots)), key=inline.__getitem__)  # threads first
        await asyncio.gather(*(self._collect_one(self._slots[i], round_, final, inline[i]) for i in order))

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
    async def _call(self, slot: _Slot, fn: Callable[..., Any], *args: Any, inline: bool = False) -> Any:
        if inline:  # the tasks gathered before this one have started their threads already
            return fn(*args)
        slot.inflight += 1

        def settled() -> None:
            slot.inflight -= 1

        name = f"{slot.tracker.name}:{fn.__name__}"
        return await watched(fn, *args, timeout=self.policy.timeout, name=name, on_settled=settled)

    def _emit(self, slot: _Slot, round_: int, kind: EventKind, exc: BaseException | None, action: str) -> None:
        detail = "" if exc is None else (str(exc) or type(exc).__name__)
        ev = TrackerEvent(slot.tracker.name, round_, kind, _errno_of(exc), action, detail)
        self.events.append(ev)
        if self._on_event:
            self._on_event(ev)

    def _apply(self, slot: _Slot, verdict: Verdict) -> None:
        if verdict.mark:
            mark_ranges(self.bitmap, slot.covered)

    def _failed(self, slot: _Slot, round_: int, kind: EventKind, exc: BaseException, verdict: Verdict) -> None:
        """Any tracker error: the machine says the log may be corrupted; everything it covers is dirty."""
        self._apply(slot, verdict)
        self._emit(slot, round_, kind, exc, f"covered range marked dirty; restart in {_retry_note(verdict)}")

    def _started(self, slot: _Slot, round_: int, outcome: StartOutcome) -> None:
        slot.stats.page_size = outcome.page_size
        for a in outcome.attempts:
            if a.errno is not None:
                err = OSError(a.errno, _errno.errorcode.get(a.errno, str(a.errno)))
                self._emit(slot, round_, EventKind.START_FALLBACK, err, f"{a.step} ({a.ranges} ranges) refused")
        if not outcome.tracked:
            self._emit(
                slot, round_, EventKind.PERMA_DIRTY, None, "nothing can be logged: covered range dirty every round"
            )
            return
        untracked = sum(r.length for r in outcome.untracked)
        note = f"; {untracked} reachable bytes untracked, dirty every round" if untracked else ""
        self._emit(
            slot,
            round_,
            EventKind.START,
            None,
            f"tracking {len(outcome.tracked)} ranges at {outcome.page_size} B pages{note}",
        )

    async def _start_one(self, slot: _Slot) -> None:
        slot.live = True
        try:
            outcome = await self._call(slot, slot.tracker.start, self.layout)
        except (Exception, TimeoutError) as exc:
            self._failed(slot, 0, EventKind.START_ERROR, exc, slot.recovery.start_failed(self._clock()))
            return
        self._apply(slot, slot.recovery.started(bool(outcome.tracked)))
        self._started(slot, 0, outcome)

    async def _collect_one(self, slot: _Slot, round_: int, final: bool, inline: bool = False) -> None:
        step = slot.recovery.plan(self._clock(), final, busy=slot.inflight > 0)
        if step is Step.COLLECT:
            fn = getattr(slot.tracker, "collect_final", None) if final else None
            try:
                await self._call(slot, fn or slot.tracker.collect, self.bitmap, inline=inline)
            except TimeoutError as exc:
                self._failed(slot, round_, EventKind.TIMEOUT, exc, slot.recovery.collect_failed(self._clock()))
            except Exception as exc:
                self._failed(slot, round_, EventKind.REPORT_ERROR, exc, slot.recovery.collect_failed(self._clock()))
            else:
                slot.recovery.collected()
        elif step is Step.RESTART:
            await self._restart(slot, round_)
        else:
            mark_ranges(self.bitmap, slot.covered)

    async def _restart(self, slot: _Slot, round_: int) -> None:
        try:
            await self._call(slot, slot.tracker.stop)
        except (Exception, TimeoutError) as exc:
            self._emit(slot, round_, EventKind.STOP_ERROR, exc, "ignored; restarting anyway")
        try:
            outcome = await self._call(slot, slot.tracker.start, self.layout)
        except (Exception, TimeoutError) as exc:
            verdict = slot.recovery.restart_failed(self._clock())
            self._apply(slot, verdict)
            if verdict.state is TrackerState.PERMA_DIRTY:
                self._emit(
                    slot, round_, EventKind.PERMA_DIRTY, exc, f"gave up after {slot.recovery.failures} failed restarts"
                )
            else:
                self._emit(slot, round_, EventKind.RESTART_FAILED, exc, f"next attempt in {_retry_note(verdict)}")
            return
        # A successful START logs from now on; the machine's mark covers everything before it.
        self._apply(slot, slot.recovery.restarted(bool(outcome.tracked)))
        self._emit(slot, round_, EventKind.RESTART, None, "STOP+START succeeded")
        self._started(slot, round_, outcome)

    async def _stop_one(self, slot: _Slot) -> None:
        if not slot.live:
            return
        slot.live = False
        try:
            await self._call(slot, slot.tracker.stop)
        except (Exception, TimeoutError) as exc:
            self._emit(slot, -1, EventKind.STOP_ERROR, exc, "tracker may still be logging")
        else:
            self._emit(slot, -1, EventKind.STOP, None, "stopped")
        slot.recovery.stopped()
