"""A running migration's state at any moment, in the names of QEMU's `query-migrate`.

Fields keep QEMU's meaning where QEMU has one (MigrationInfo: status, total-time, setup-time,
expected-downtime, downtime, and `ram`'s transferred, remaining, total, dirty-pages-rate,
dirty-sync-count, mbps, page-size); what QEMU has no word for sits under `x-orch`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator.migration.engine.sequence import JobStatus
from orchestrator.trackers.events import TrackerStats


@dataclass(frozen=True)
class RamInfo:
    transferred: int  # bytes of pages sent so far
    remaining: int  # bytes known dirty and not yet sent (all of RAM before round 0 is done)
    total: int  # bytes of guest RAM
    normal: int  # pages sent
    page_size: int
    dirty_pages_rate: float  # pages per second the trackers found, over the last round
    dirty_sync_count: int  # rounds done, round 0 included
    mbps: float  # the engine's bandwidth estimate, in megabits per second as QEMU reports it


@dataclass(frozen=True)
class MigrationInfo:
    status: JobStatus
    phase: str  # the sequence's own phase
    total_time_ms: float
    setup_time_ms: float | None  # until precopy began (None: not yet)
    expected_downtime_ms: float | None  # what the final copy would take now (None: not measured yet)
    downtime_ms: float | None  # measured, once the destination runs the guest
    ram: RamInfo
    downtime_limit_ms: float | None  # the policy's, when it has one
    max_bandwidth: float | None  # the page stream's cap in bytes per second (None: uncapped)
    throttle: float
    decision: str
    guest: str
    error: str | None
    trackers: tuple[TrackerStats, ...] = field(default_factory=tuple)

    def as_qmp(self) -> dict[str, Any]:
        """The object `query-migrate` returns: QEMU's field names, our extras under x-orch."""
        out: dict[str, Any] = {"status": self.status.value, "total-time": round(self.total_time_ms)}
        if self.setup_time_ms is not None:
            out["setup-time"] = round(self.setup_time_ms)
        if self.expected_downtime_ms is not None:
            out["expected-downtime"] = round(self.expected_downtime_ms)
        if self.downtime_ms is not None:
            out["downtime"] = round(self.downtime_ms)
        r = self.ram
        out["ram"] = {
            "transferred": r.transferred,
            "remaining": r.remaining,
            "total": r.total,
            "normal": r.normal,
            "normal-bytes": r.normal * r.page_size,
            "page-size": r.page_size,
            "dirty-pages-rate": round(r.dirty_pages_rate),
            "dirty-sync-count": r.dirty_sync_count,
            "mbps": r.mbps,
        }
        if self.throttle:
            out["cpu-throttle-percentage"] = round(self.throttle * 100)
        if self.error:
            out["error-desc"] = self.error
        out["x-orch"] = {
            "phase": self.phase,
            "downtime-limit": None if self.downtime_limit_ms is None else round(self.downtime_limit_ms),
            "max-bandwidth": self.max_bandwidth,
            "throttle": self.throttle,
            "decision": self.decision,
            "guest": self.guest,
            "trackers": [t.counts() for t in self.trackers],
        }
        return out
