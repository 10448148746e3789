"""Auto-converge: slow the guest down when it dirties memory faster than the rounds move it.

QEMU's rule (migration/ram.c, `migration_trigger_throttle` and `mig_throttle_guest_down`),
applied per round instead of per second of bitmap syncs: a round whose dirty bytes exceed
`threshold` (throttle-trigger-threshold, 50%) of the bytes the round before sent is "high";
every second high round (the count is not reset by a low one, only by throttling) starts the
throttle at `initial` (cpu-throttle-initial, 20%) or raises it by `increment`
(cpu-throttle-increment, 10%) up to `maximum` (max-cpu-throttle, 99%). With `tailslow`
(cpu-throttle-tailslow) a raise is no more than what should bring the dirty rate down to the
threshold. When to switch over is the `inner` policy's call; this one only adds the throttle
to its verdicts.

QEMU's own auto-converge throttles inside QEMU's RAM migration, which the orchestrator does not
use: the throttle goes to an `Actuator` (`orchestrator.qemu.throttle` for real QEMUs).
The count of high rounds is replayed from the observation's rounds on every decision, so the
policy keeps no state and a simulator gets the same throttle as a real run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from orchestrator.migration.engine.errors import PolicyError
from orchestrator.migration.engine.policy import Decision, DowntimePolicy, Observation, Policy, Verdict
from orchestrator.migration.engine.records import RoundRecord

#: High rounds that make one throttle step (QEMU's `dirty_rate_high_cnt >= 2`).
HIGH_ROUNDS = 2


@dataclass(frozen=True)
class ThrottlingPolicy:
    inner: Policy = field(default_factory=DowntimePolicy)
    threshold: float = 0.5  # dirty bytes of a round, as a share of the bytes the round before sent
    initial: float = 0.2
    increment: float = 0.1
    maximum: float = 0.99
    tailslow: bool = False
    #: A policy that may ask for a throttle: its migration needs an actuator.
    throttles: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise PolicyError(f"threshold must be a share of the bytes sent in (0, 1], got {self.threshold}")
        for name in ("initial", "increment", "maximum"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise PolicyError(f"{name} must be a share of vCPU time in (0, 1), got {value}")
        if self.initial > self.maximum:
            raise PolicyError(f"initial {self.initial} is above maximum {self.maximum}")

    def _high(self, sent_before: RoundRecord, dirty_pages: int, page_size: int) -> bool:
        return dirty_pages * page_size > self.threshold * sent_before.sent_bytes

    def _raised(self, now: float, dirty_bytes: int, sent_bytes: int) -> float:
        if now <= 0:
            return self.initial
        step = self.increment
        if self.tailslow and dirty_bytes > 0:
            cpu_now = 1.0 - now
            cpu_ideal = cpu_now * (self.threshold * sent_bytes) / dirty_bytes
            step = min(cpu_now - cpu_ideal, self.increment)
        return round(min(now + step, self.maximum), 6)  # 0.3, not 0.30000000000000004

    def decide(self, obs: Observation) -> Verdict:
        verdict = self.inner.decide(obs)
        if verdict.decision is not Decision.CONTINUE or not obs.rounds:
            return verdict
        last = obs.rounds[-1]
        if not self._high(last, obs.pending_pages, obs.page_size):
            return verdict
        # Round k's dirty pages were dirtied while round k-1 was sent (round 0 has none).
        earlier = sum(
            self._high(before, rec.dirty_pages, obs.page_size)
            for before, rec in zip(obs.rounds, obs.rounds[1:], strict=False)
        )
        if (earlier + 1) % HIGH_ROUNDS:
            return verdict
        level = self._raised(obs.throttle, obs.pending_pages * obs.page_size, last.sent_bytes)
        if level == obs.throttle:
            return verdict
        return dataclasses.replace(
            verdict, reason=f"{verdict.reason}; throttling the guest to {level:.0%}", throttle=level
        )


def throttles(policy: Policy) -> bool:
    """Whether `policy`, or a policy it wraps, may ask for a throttle (then the migration needs
    an actuator: without one a throttle request fails it)."""
    while True:
        if getattr(policy, "throttles", False):
            return True
        inner = getattr(policy, "inner", None)
        if inner is None:
            return False
        policy = inner
