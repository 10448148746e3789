"""What the tracker set tells its users: structured events and per-tracker counters."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class TrackerState(enum.StrEnum):
    RUNNING = "running"
    DEGRADED = "degraded"  # failed; its covered range is marked dirty until a restart succeeds
    PERMA_DIRTY = "perma-dirty"  # gave up restarting; covered range dirty every round
    STOPPED = "stopped"


class EventKind(enum.StrEnum):
    """What happened to a tracker; the set emits one event per happening."""

    START = "start"
    START_FALLBACK = "start-fallback"  # one step of START's fallback ladder was refused
    START_ERROR = "start-error"
    REPORT_ERROR = "report-error"
    TIMEOUT = "timeout"  # a call outlived the watchdog
    RESTART = "restart"
    RESTART_FAILED = "restart-failed"
    PERMA_DIRTY = "perma-dirty"
    STOP = "stop"
    STOP_ERROR = "stop-error"


@dataclass(frozen=True)
class TrackerEvent:
    tracker: str
    round: int  # -1: at exit
    kind: EventKind
    errno: int | None
    action: str
    detail: str = ""


@dataclass
class TrackerStats:
    name: str
    kind: str
    page_size: int = 0
    reports: int = 0
    errors: int = 0
    fallbacks: int = 0
    restarts: int = 0
    state: TrackerState = TrackerState.STOPPED

    def counts(self) -> dict[str, str | int]:
        """What a report, `query-migrate` or a summary shows of a tracker, as JSON-ready data."""
        return {
            "name": self.name,
            "kind": self.kind,
            "state": self.state.value,
            "reports": self.reports,
            "errors": self.errors,
            "fallbacks": self.fallbacks,
            "restarts": self.restarts,
        }
