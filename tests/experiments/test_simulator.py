"""The simulator: the real sequence and engine on a virtual clock, against hand-computed runs."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from orchestrator.experiments.model import CollectModel, GuestWorkload, LinkModel, StepCosts
from orchestrator.experiments.simulator import Scenario, Simulation, simulate
from orchestrator.migration.engine import Decision, DowntimePolicy, Observation, OnLimit, Verdict
from orchestrator.migration.events import EventName

PAGE = 4096
MIB = 1 << 20
RAM = 64 * MIB
BW = 8192 * PAGE  # 32 MiB/s: the 8192-page working set in one second


def scenario(append: str = "pattern=sweep wss=32M rate=4000K", **kw) -> Scenario:
    return Scenario(
        GuestWorkload.from_command_line(append, RAM),
        RAM,
        link=LinkModel(BW, scan_bps=RAM / 0.5),
        collect=CollectModel(0.0, 0.0),
        steps=StepCosts({"Migrate": 0.01}, resume_s=0.02),
        **kw,
    )


def test_a_converging_sweep_by_hand():
    # Round 0: 0.5 s scanning 64 MiB, 1 s sending 8192 pages; the guest wrote 1500 pages
    # (1000 a second): 1500 / 8192 s expected, under 300 ms: switch over. 10 ms to QEMU's STOP
    # add 10 pages; the final copy moves 1510 pages, then 20 ms to RESUME.
    rep = simulate(scenario(), DowntimePolicy())
    assert rep.status.value == "completed" and rep.guest.value == "destination"
    assert [(r.dirty_pages, r.sent_pages) for r in rep.rounds] == [(16384, 8192), (1510, 1510)]
    assert rep.downtime_ms == pytest.approx((1510 / 8192 + 0.02) * 1e3)
    assert rep.total_ms == pytest.approx((1.5 + 0.01 + 1510 / 8192 + 0.02) * 1e3)
    assert rep.bytes_sent == (8192 + 1510) * PAGE
    assert "<= limit 300 ms" in rep.decision


def test_a_guest_too_fast_for_the_link_hits_the_cap():
    fast = "pattern=random wss=32M rate=256M"  # 65536 writes a second over 8192 pages
    rep = simulate(scenario(fast), DowntimePolicy(max_rounds=5))
    assert rep.status.value == "cancelled" and rep.guest.value == "source" and len(rep.rounds) == 5
    assert rep.downtime_ms is None
    forced = simulate(scenario(fast), DowntimePolicy(max_rounds=5, on_limit=OnLimit.FORCE))
    assert forced.status.value == "completed" and len(forced.rounds) == 6


@dataclass(frozen=True)
class ThrottleOnce:
    """Round 1: continue at `level`; round 2: switch over (whatever it expects)."""

    level: float | None

    def decide(self, obs: Observation) -> Verdict:
        if obs.round == 1:
            return Verdict(Decision.CONTINUE, "throttle", throttle=self.level)
        return Verdict(Decision.SWITCHOVER, "enough")


def dirty_at_collect_2(level: float | None) -> int:
    sim = Simulation(scenario(), ThrottleOnce(level))
    decisions = []
    sim.listen(lambda ev: decisions.append(ev.data) if ev.name is EventName.DECISION else None)
    sim.run()
    return decisions[1]["pending-pages"]


def test_a_throttle_scales_the_dirty_rate():
    # Round 1 sends 1500 pages (1500/8192 s), at 1000 pages a second of guest time.
    full = dirty_at_collect_2(None)
    assert full == round(1500 / 8192 * 1000)
    assert dirty_at_collect_2(0.5) == round(1500 / 8192 * 1000 * 0.5)
    assert dirty_at_collect_2(0.75) == round(1500 / 8192 * 1000 * 0.25)
    assert dirty_at_collect_2(0.0) == full  # negative control: a throttle of nothing changes nothing


def test_events_are_the_drivers():
    sim = Simulation(scenario(), DowntimePolicy())
    seen = []
    sim.listen(seen.append)
    rep = sim.run()
    names = [ev.name for ev in seen]
    assert names.count(EventName.MIGRATION_PASS) == len(rep.rounds)
    assert names.count(EventName.HARVEST) == len(rep.rounds) - 1  # round 0 harvests nothing
    harvests = [ev for ev in seen if ev.name is EventName.HARVEST]
    assert [ev.record.size for ev in harvests] == [r.sent_pages for r in rep.rounds[1:]]
    assert [ev.data["status"] for ev in seen if ev.name is EventName.MIGRATION][-1] == "completed"
    assert [ev.elapsed_s for ev in seen] == sorted(ev.elapsed_s for ev in seen)  # the virtual clock


def test_auto_converge_lets_a_guest_too_fast_for_the_link_converge():
    from orchestrator.migration.engine.throttling import ThrottlingPolicy

    fast = "pattern=random wss=32M rate=256M"
    tight = DowntimePolicy(downtime_limit_s=0.05, max_rounds=20)
    alone = Simulation(scenario(fast), tight)
    assert alone.run().status.value == "cancelled"
    throttled = Simulation(scenario(fast), ThrottlingPolicy(inner=tight))
    levels = []
    throttled.listen(lambda ev: levels.append(ev.data["level"]) if ev.data.get("action") == "Throttle" else None)
    rep = throttled.run()
    assert rep.status.value == "completed" and throttled.engine.converged
    assert levels and levels == sorted(levels) and levels[0] == pytest.approx(0.2)
