"""What the engine keeps of each round: the one record every report, trace and policy reads."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RoundRecord:
    round: int
    dirty_pages: int
    sent_pages: int
    sent_bytes: int
    duration_ms: float
    bandwidth_bps: float
    expected_downtime_ms: float
    #: When the round's send ended, since the migration started: policies that look at progress
    #: over time (stall detection, completion timeouts) read it.
    ended_ms: float = 0.0
