"""Convergence policies of the management stacks that run QEMU, beside QEMU's own threshold rule
(`DowntimePolicy`): Nova's downtime ramp, KubeVirt's progress and completion timeouts, and a
stall detector. Each is a frozen dataclass of plain numbers, so the registry can build it from
`--set k=v` and a trace can name it; each decides from one `Observation`, with no clock or
memory of its own (the rounds it needs are in the observation).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from orchestrator.migration.engine.errors import PolicyError
from orchestrator.migration.engine.policy import DOWNTIME_LIMIT_S, MAX_TIME_S, Decision, Observation, OnLimit, Verdict

GIB = 1 << 30


def _finite_positive(**values: float) -> None:
    for name, value in values.items():
        if not 0 < value < math.inf:
            raise PolicyError(f"{name} must be finite and positive, got {value}")


def _on_limit(value: str) -> OnLimit:
    try:
        return OnLimit(value)
    except ValueError:
        raise PolicyError(f"on_limit must be one of {[m.value for m in OnLimit]}, got {value!r}") from None


def _limited(obs: Observation, cap: str, on_limit: OnLimit) -> Verdict:
    """What a policy does once a cap or timeout is reached: cancel, or switch over anyway."""
    dt_ms = obs.expected_downtime_s * 1e3
    if on_limit is OnLimit.FORCE:
        return Verdict(Decision.SWITCHOVER, f"{cap}; forcing switchover (expected downtime {dt_ms:.1f} ms)")
    return Verdict(Decision.CANCEL, f"{cap} without converging (expected downtime {dt_ms:.1f} ms); cancelled")


def _fits(obs: Observation, limit_s: float) -> Verdict | None:
    if obs.expected_downtime_s <= limit_s:
        return Verdict(
            Decision.SWITCHOVER,
            f"expected downtime {obs.expected_downtime_s * 1e3:.1f} ms <= limit {limit_s * 1e3:.0f} ms",
            converged=True,
        )
    return None


def _ram_gib(obs: Observation) -> float:
    return obs.ram_bytes / GIB


@dataclass(frozen=True)
class DowntimeRamp:
    """Nova's rule: start with a small downtime limit and raise it in `steps` equal steps to
    `downtime_limit_s`, one step every `step_delay_s_per_gib` seconds per GiB of RAM, so a
    guest that converges easily pays little downtime and a busy one is still let through;
    past `completion_timeout_s_per_gib` seconds per GiB the migration is cancelled or forced.
    Step i (0..steps) allows base + i * (limit - base) / steps, base = limit / steps."""

    downtime_limit_s: float = 0.5
    steps: int = 10
    step_delay_s_per_gib: float = 75.0
    completion_timeout_s_per_gib: float = 800.0
    on_limit: OnLimit = OnLimit.CANCEL

    def __post_init__(self) -> None:
        object.__setattr__(self, "on_limit", _on_limit(self.on_limit))
        _finite_positive(
            downtime_limit_s=self.downtime_limit_s,
            step_delay_s_per_gib=self.step_delay_s_per_gib,
            completion_timeout_s_per_gib=self.completion_timeout_s_per_gib,
        )
        if self.steps < 1:
            raise PolicyError(f"steps must be at least 1, got {self.steps}")

    def schedule(self, ram_bytes: int) -> Iterator[tuple[float, float]]:
        """(from elapsed seconds, downtime limit in seconds) for each step of the ramp."""
        delay = self.step_delay_s_per_gib * ram_bytes / GIB
        base = self.downtime_limit_s / self.steps
        offset = (self.downtime_limit_s - base) / self.steps
        for i in range(self.steps + 1):
            yield delay * i, base + offset * i

    def limit_at(self, elapsed_s: float, ram_bytes: int) -> float:
        """The downtime limit the ramp allows `elapsed_s` into the migration."""
        allowed = 0.0
        for start, limit in self.schedule(ram_bytes):
            if elapsed_s >= start:
                allowed = limit
        return allowed

    def decide(self, obs: Observation) -> Verdict:
        limit = self.limit_at(obs.elapsed_s, obs.ram_bytes)
        if (fit := _fits(obs, limit)) is not None:
            return fit
        timeout = self.completion_timeout_s_per_gib * _ram_gib(obs)
        if obs.elapsed_s >= timeout:
            return _limited(obs, f"completion timeout {timeout:.0f} s reached", self.on_limit)
        dt_ms = obs.expected_downtime_s * 1e3
        return Verdict(Decision.CONTINUE, f"expected downtime {dt_ms:.1f} ms > ramp limit {limit * 1e3:.0f} ms")


def last_progress_s(obs: Observation) -> float:
    """When the data still to move last reached a new low (seconds since the start): the
    rounds' dirty counts and the pending count now, as KubeVirt reads libvirt's remaining
    data. Round 0 (everything) is the first low."""
    lowest, when = math.inf, 0.0
    for rec in obs.rounds:
        if rec.dirty_pages < lowest:
            lowest, when = rec.dirty_pages, rec.ended_ms / 1e3
    if obs.pending_pages < lowest:
        when = obs.elapsed_s
    return when


@dataclass(frozen=True)
class ProgressTimeouts:
    """KubeVirt's rule on top of the downtime limit: a migration whose remaining data has not
    reached a new low for `progress_timeout_s`, or that has run longer than
    `completion_timeout_s_per_gib` seconds per GiB of RAM, is cancelled (or forced)."""

    downtime_limit_s: float = DOWNTIME_LIMIT_S
    progress_timeout_s: float = 150.0
    completion_timeout_s_per_gib: float = 150.0
    on_limit: OnLimit = OnLimit.CANCEL

    def __post_init__(self) -> None:
        object.__setattr__(self, "on_limit", _on_limit(self.on_limit))
        _finite_positive(
            downtime_limit_s=self.downtime_limit_s,
            progress_timeout_s=self.progress_timeout_s,
            completion_timeout_s_per_gib=self.completion_timeout_s_per_gib,
        )

    def decide(self, obs: Observation) -> Verdict:
        if (fit := _fits(obs, self.downtime_limit_s)) is not None:
            return fit
        timeout = self.completion_timeout_s_per_gib * _ram_gib(obs)
        if obs.elapsed_s >= timeout:
            return _limited(obs, f"completion timeout {timeout:.0f} s reached", self.on_limit)
        still = obs.elapsed_s - last_progress_s(obs)
        if still >= self.progress_timeout_s:
            return _limited(obs, f"no progress for {still:.0f} s", self.on_limit)
        return Verdict(Decision.CONTINUE, f"expected downtime {obs.expected_downtime_s * 1e3:.1f} ms > limit")


@dataclass(frozen=True)
class StallDetection:
    """The downtime rule, but a migration that stops getting closer ends at once instead of
    at a cap: when the lowest dirty count of the last `window` collects is not at least
    `min_gain` (a share) below the lowest one before them, it has stalled (the guest
    dirties as fast as the link sends). `max_time_s` still bounds everything."""

    downtime_limit_s: float = DOWNTIME_LIMIT_S
    window: int = 3
    min_gain: float = 0.05
    max_time_s: float = MAX_TIME_S
    on_limit: OnLimit = OnLimit.FORCE

    def __post_init__(self) -> None:
        object.__setattr__(self, "on_limit", _on_limit(self.on_limit))
        _finite_positive(downtime_limit_s=self.downtime_limit_s, max_time_s=self.max_time_s)
        if self.window < 1:
            raise PolicyError(f"window must be at least 1 collect, got {self.window}")
        if not 0 <= self.min_gain < 1:
            raise PolicyError(f"min_gain is a share in [0, 1), got {self.min_gain}")

    def stalled(self, obs: Observation) -> bool:
        """Round 0 is left out: it counts every page, which says nothing about the guest."""
        counts = [r.dirty_pages for r in obs.rounds[1:]] + [obs.pending_pages]
        if len(counts) <= self.window:
            return False
        before, recent = min(counts[: -self.window]), min(counts[-self.window :])
        return recent > before * (1 - self.min_gain)

    def decide(self, obs: Observation) -> Verdict:
        if (fit := _fits(obs, self.downtime_limit_s)) is not None:
            return fit
        if self.stalled(obs):
            return _limited(obs, f"stalled: no {self.min_gain:.0%} gain over {self.window} collects", self.on_limit)
        if obs.elapsed_s >= self.max_time_s:
            return _limited(obs, f"time cap {self.max_time_s:g} s reached", self.on_limit)
        return Verdict(Decision.CONTINUE, f"expected downtime {obs.expected_downtime_s * 1e3:.1f} ms > limit")
