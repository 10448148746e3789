"""What the tracker set tells its users: structured events and per-tracker counters."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any


class TrackerState(enum.StrEnum):
    RUNNING = "running"
    DEGRADED = "degraded"  # failed; its covered range is marked dirty until a restart succeeds
    PERMA_DIRTY = "perma-dirty"  # gave up restarting; covered range dirty every round
    STOPPED = "stopped"


@dataclass(frozen=True)
class TrackerEvent:
    tracker: str
    round: int
    kind: str  # start, start-fallback, report-error, timeout, restart, restart-failed, perma-dirty, stop, stop-error
    errno: int | None
    action: str
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        return d
