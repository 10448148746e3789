"""The recovery decisions of one tracker, sans-IO: events in, decisions out.

`TrackerSet` owns the threads, the watchdog and the bitmap; this machine owns what a failure
means (the invariant on tracker errors): which round collects, restarts or only marks, when the next restart may
be tried, when to give up. Time is whatever clock the caller passes (`now`), so every rule is
testable without threads and a simulator can drive it on virtual time.

The rule that loses no dirty bit: whenever the tracker's report may be missing something —
it failed, it is not logging, or it has just restarted (writes between the failure and the
new START were logged nowhere) — the decision is to mark its whole reach dirty.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from orchestrator.trackers.errors import TrackerError
from orchestrator.trackers.events import TrackerState, TrackerStats


@dataclass(frozen=True)
class RecoveryPolicy:
    timeout: float = 5.0  # seconds one tracker call may take before it counts as hung
    max_restarts: int = 3  # consecutive failed restarts before a tracker stays perma-dirty
    backoff_initial: float = 0.05
    backoff_max: float = 2.0

    def backoff(self, failures: int) -> float:
        return min(self.backoff_initial * (2.0**failures), self.backoff_max)


class Step(enum.StrEnum):
    """What one round does with the tracker."""

    COLLECT = "collect"  # ask for its report
    RESTART = "restart"  # STOP+START, then tell the machine how it went (its verdict marks)
    MARK = "mark"  # mark its reach dirty, nothing else


@dataclass(frozen=True)
class Verdict:
    """The decision after an event. `mark`: mark the tracker's whole reach dirty now."""

    mark: bool
    state: TrackerState
    retry_in: float | None = None  # seconds until a restart may be tried (degraded only)


class RecoveryOrderError(TrackerError, RuntimeError):
    """An event the tracker's state cannot have produced (a bug in the caller)."""


@dataclass
class Recovery:
    """One tracker's recovery state. `stats` are its counters, kept here so the numbers in a
    report are the machine's own."""

    stats: TrackerStats
    policy: RecoveryPolicy = field(default_factory=RecoveryPolicy)
    failures: int = 0  # consecutive failed restarts
    next_restart: float = 0.0

    @property
    def state(self) -> TrackerState:
        return self.stats.state

    def _expect(self, event: str, *states: TrackerState) -> None:
        if self.state not in states:
            raise RecoveryOrderError(f"{self.stats.name}: {event} while {self.state.value}")

    def _verdict(self, state: TrackerState, mark: bool, retry_in: float | None = None) -> Verdict:
        self.stats.state = state
        self.stats.fallbacks += mark
        return Verdict(mark, state, retry_in)

    def _degrade(self, now: float) -> Verdict:
        delay = self.policy.backoff(self.failures)
        self.next_restart = now + delay
        return self._verdict(TrackerState.DEGRADED, True, delay)

    def plan(self, now: float, final: bool, busy: bool) -> Step:
        """This round's step. `busy`: an earlier call is still in flight (a hung ioctl holds
        the device), so no restart; the final round never restarts (the guest is paused and
        its last writes must be known now, not after a START)."""
        self._expect("plan", TrackerState.RUNNING, TrackerState.DEGRADED, TrackerState.PERMA_DIRTY)
        if self.state is TrackerState.RUNNING:
            return Step.COLLECT
        if self.state is TrackerState.DEGRADED and not final and not busy and now >= self.next_restart:
            return Step.RESTART
        self.stats.fallbacks += 1
        return Step.MARK

    def started(self, tracked: bool) -> Verdict:
        """The first START returned; `tracked`: it logs something (else perma-dirty)."""
        self._expect("started", TrackerState.STOPPED)
        return self._verdict(TrackerState.RUNNING if tracked else TrackerState.PERMA_DIRTY, False)

    def start_failed(self, now: float) -> Verdict:
        self._expect("start failed", TrackerState.STOPPED)
        self.stats.errors += 1
        return self._degrade(now)

    def collected(self) -> Verdict:
        self._expect("collected", TrackerState.RUNNING)
        self.stats.reports += 1
        return self._verdict(TrackerState.RUNNING, False)

    def collect_failed(self, now: float) -> Verdict:
        """A report failed or timed out: assume the log is corrupted."""
        self._expect("collect failed", TrackerState.RUNNING)
        self.stats.errors += 1
        return self._degrade(now)

    def restarted(self, tracked: bool) -> Verdict:
        """STOP+START succeeded: trusted from now on, but its reach is marked once more."""
        self._expect("restarted", TrackerState.DEGRADED)
        self.failures = 0
        self.stats.restarts += 1
        return self._verdict(TrackerState.RUNNING if tracked else TrackerState.PERMA_DIRTY, True)

    def restart_failed(self, now: float) -> Verdict:
        self._expect("restart failed", TrackerState.DEGRADED)
        self.failures += 1
        self.stats.errors += 1
        if self.failures > self.policy.max_restarts:
            return self._verdict(TrackerState.PERMA_DIRTY, True)
        return self._degrade(now)

    def stopped(self) -> None:
        self.stats.state = TrackerState.STOPPED
