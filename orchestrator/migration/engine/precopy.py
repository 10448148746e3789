"""The sans-IO precopy engine: bookkeeping of rounds and the bandwidth estimate.

The driver that owns I/O (QEMU, a simulator) tells the engine what each round did and asks
it what to do next; the engine never touches memory, sockets or clocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.migration.engine.policy import DowntimePolicy, Observation, Policy, Verdict
from orchestrator.migration.engine.records import RoundRecord


@dataclass
class PrecopyEngine:
    page_size: int = 4096
    policy: Policy = field(default_factory=DowntimePolicy)
    ewma_alpha: float = 0.5  # weight of the newest round in the bandwidth estimate
    min_sample_bytes: int = 1 << 20  # smaller rounds measure fixed overhead, not bandwidth
    ram_bytes: int = 0  # what the guest has: policies that scale with memory size read it
    rounds: list[RoundRecord] = field(default_factory=list)
    bandwidth_bps: float = 0.0
    throttle: float = 0.0  # the share of vCPU time taken from the guest now
    observation: Observation | None = None  # what the policy saw last
    verdict: Verdict | None = None

    def __post_init__(self) -> None:
        if not 0 < self.ewma_alpha <= 1:
            raise ValueError(f"ewma_alpha must be in (0, 1], got {self.ewma_alpha}")

    def record_round(
        self,
        dirty_pages: int,
        sent_pages: int,
        sent_bytes: int,
        duration_s: float,
        work_bytes: int | None = None,
        ended_s: float = 0.0,
    ) -> RoundRecord:
        """A round finished sending: fold its throughput into the estimate. `work_bytes` is
        what the round had to read when that is more than it sent (round 0 scans all of RAM
        to skip zero pages), so the sample is a rate of work, not of what happened to be
        non-zero."""
        work = sent_bytes if work_bytes is None else work_bytes
        if duration_s > 0 and work > 0 and (work >= self.min_sample_bytes or self.bandwidth_bps == 0):
            sample = work / duration_s
            a = self.ewma_alpha
            self.bandwidth_bps = sample if self.bandwidth_bps == 0 else a * sample + (1 - a) * self.bandwidth_bps
        expected = dirty_pages * self.page_size / self.bandwidth_bps if self.bandwidth_bps else float("inf")
        rec = RoundRecord(
            round=len(self.rounds),
            dirty_pages=dirty_pages,
            sent_pages=sent_pages,
            sent_bytes=sent_bytes,
            duration_ms=duration_s * 1e3,
            bandwidth_bps=self.bandwidth_bps,
            expected_downtime_ms=expected * 1e3,
            ended_ms=ended_s * 1e3,
        )
        self.rounds.append(rec)
        return rec

    def next_step(self, pending_pages: int, device_bytes: int, elapsed_s: float, collect_s: float = 0.0) -> Verdict:
        """After a collect: ask the policy whether to send another round or switch over."""
        obs = Observation(
            round=len(self.rounds),
            pending_pages=pending_pages,
            page_size=self.page_size,
            device_bytes=device_bytes,
            bandwidth_bps=self.bandwidth_bps,
            elapsed_s=elapsed_s,
            collect_s=collect_s,
            ram_bytes=self.ram_bytes,
            rounds=tuple(self.rounds),
            throttle=self.throttle,
        )
        self.observation, self.verdict = obs, self.policy.decide(obs)
        return self.verdict

    @property
    def converged(self) -> bool:
        return self.verdict is not None and self.verdict.converged
