"""Convergence policies: given what the last rounds showed, continue, switch over, or stop.

Pure functions of observations (no clocks, no I/O), so experiments can swap policies and a
simulator can drive them exactly as a real migration does.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Protocol

from orchestrator.migration.engine.errors import PolicyError
from orchestrator.migration.engine.records import RoundRecord


class Decision(enum.StrEnum):
    CONTINUE = "continue"
    SWITCHOVER = "switchover"
    CANCEL = "cancel"


@dataclass(frozen=True)
class Observation:
    """State after a collect: what the final round would have to move right now."""

    round: int  # rounds completed so far (round 0 is the full copy)
    pending_pages: int  # dirty in the shared bitmap, not yet sent
    page_size: int
    device_bytes: int  # device state still to move at switchover (stop-copy size)
    bandwidth_bps: float  # smoothed send bandwidth, bytes per second
    elapsed_s: float  # since the migration started
    collect_s: float = 0.0  # how long the last collect took: the final one runs paused too
    ram_bytes: int = 0  # the guest's RAM size
    rounds: tuple[RoundRecord, ...] = ()  # every round so far, oldest first
    throttle: float = 0.0  # the share of vCPU time taken from the guest now

    @property
    def pending_bytes(self) -> int:
        return self.pending_pages * self.page_size + self.device_bytes

    @property
    def expected_downtime_s(self) -> float:
        if self.bandwidth_bps <= 0:
            return float("inf")
        return self.pending_bytes / self.bandwidth_bps + self.collect_s


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    reason: str
    converged: bool = False  # the expected downtime fit the limit (not forced by a cap)
    #: The share of vCPU time to take from the guest from now on (0: none); None leaves it.
    throttle: float | None = None

    def __post_init__(self) -> None:
        if self.throttle is not None and not 0.0 <= self.throttle < 1.0:
            raise PolicyError(f"a throttle is a share of vCPU time in [0, 1), got {self.throttle}")


class OnLimit(enum.StrEnum):
    """What a migration that hits a round or time cap does."""

    CANCEL = "cancel"  # the source keeps the guest
    FORCE = "force"  # switch over anyway, with a longer downtime


class Policy(Protocol):
    def decide(self, obs: Observation) -> Verdict: ...


def downtime_limit_of(policy: Policy) -> float | None:
    """The limit `with_downtime_limit` would change: the policy's own, or the one of the policy
    it wraps (`inner`); None for a policy without one."""
    limit = getattr(policy, "downtime_limit_s", None)
    if isinstance(limit, (int, float)):
        return float(limit)
    inner = getattr(policy, "inner", None)
    return None if inner is None else downtime_limit_of(inner)


def with_downtime_limit(policy: Policy, limit_s: float) -> Policy:
    """The same policy with another downtime limit (a caller tuning a running migration).
    Every policy with a `downtime_limit_s` field takes one; a policy that wraps another
    (`inner`) passes it on."""
    if not (0 < limit_s < math.inf):
        raise PolicyError(f"a downtime limit must be finite and positive, got {limit_s} s")
    if not dataclasses.is_dataclass(policy) or isinstance(policy, type):
        raise PolicyError(f"{type(policy).__name__} has no downtime limit to set")
    names = {f.name for f in dataclasses.fields(policy)}
    if "downtime_limit_s" in names:
        return dataclasses.replace(policy, downtime_limit_s=limit_s)
    if "inner" in names:
        inner = with_downtime_limit(policy.inner, limit_s)
        return dataclasses.replace(policy, inner=inner)
    raise PolicyError(f"{type(policy).__name__} has no downtime limit to set")


#: QEMU's own defaults (downtime-limit 300 ms), and the caps on a migration that does not
#: converge; the other policies start from the same figures.
DOWNTIME_LIMIT_S = 0.3
MAX_ROUNDS = 30
MAX_TIME_S = 300.0


@dataclass(frozen=True)
class DowntimePolicy:
    """QEMU's rule: switch over once the expected downtime fits the limit. Caps on rounds and
    time bound a migration that does not converge; `on_limit` says what happens then:
    `cancel` (the source keeps running) or `force` (switch over anyway, longer downtime)."""

    downtime_limit_s: float = DOWNTIME_LIMIT_S
    max_rounds: int = MAX_ROUNDS
    max_time_s: float = MAX_TIME_S
    on_limit: OnLimit = OnLimit.CANCEL

    def __post_init__(self) -> None:
        if self.on_limit not in tuple(OnLimit):
            raise PolicyError(f"on_limit must be one of {[m.value for m in OnLimit]}, got {self.on_limit!r}")
        object.__setattr__(self, "on_limit", OnLimit(self.on_limit))
        if not (0 < self.downtime_limit_s < math.inf and self.max_rounds >= 1 and 0 < self.max_time_s < math.inf):
            raise PolicyError("downtime limit, round cap and time cap must be finite and positive")

    def decide(self, obs: Observation) -> Verdict:
        dt_ms = obs.expected_downtime_s * 1e3
        if obs.expected_downtime_s <= self.downtime_limit_s:
            return Verdict(
                Decision.SWITCHOVER,
                f"expected downtime {dt_ms:.1f} ms <= limit {self.downtime_limit_s * 1e3:.0f} ms",
                converged=True,
            )
        cap = None
        if obs.round >= self.max_rounds:
            cap = f"round cap {self.max_rounds} reached"
        elif obs.elapsed_s >= self.max_time_s:
            cap = f"time cap {self.max_time_s:g} s reached"
        if cap is None:
            return Verdict(Decision.CONTINUE, f"expected downtime {dt_ms:.1f} ms > limit")
        if self.on_limit is OnLimit.FORCE:
            return Verdict(Decision.SWITCHOVER, f"{cap}; forcing switchover (expected downtime {dt_ms:.1f} ms)")
        return Verdict(Decision.CANCEL, f"{cap} without converging (expected downtime {dt_ms:.1f} ms); cancelled")
