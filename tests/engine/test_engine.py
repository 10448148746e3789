"""The sans-IO engine and the downtime policy, driven by a tiny simulated guest."""

import pytest

from orchestrator.migration.engine import (
    Decision,
    DowntimePolicy,
    Observation,
    Phase,
    PrecopyEngine,
)
from orchestrator.migration.engine.sequence import (
    AwaitCompletion,
    Cancel,
    Cancelled,
    Collect,
    Collected,
    Completed,
    Continue,
    Continued,
    DevicesLoaded,
    DevicesRunning,
    DevicesStopCopy,
    DevicesStopped,
    Listen,
    Listening,
    LoadDevices,
    Migrate,
    MigrationSequence,
    Prepare,
    Prepared,
    PreSwitchover,
    RunDestinationDevices,
    SendPages,
    SendRound0,
    Sent,
    Started,
    StartTrackers,
    StopTrackers,
    TrackersStopped,
)

#: How a simulated QEMU, its devices and trackers answer every other action: at once, successfully.
ANSWER = {
    Prepare: Prepared(src_running=True),
    StartTrackers: Started(),
    Listen: Listening(),
    Migrate: PreSwitchover(True),
    DevicesStopCopy: DevicesStopped(),
    LoadDevices: DevicesLoaded(),
    Continue: Continued(),
    AwaitCompletion: Completed(downtime_ms=1.0),
    RunDestinationDevices: DevicesRunning(),
    Cancel: Cancelled(),
    StopTrackers: TrackersStopped(),
}

PAGE = 4096


def obs(pending, bw, rnd=1, dev=0, elapsed=1.0):
    return Observation(rnd, pending, PAGE, dev, bw, elapsed)


def test_switchover_when_downtime_fits():
    p = DowntimePolicy(downtime_limit_s=0.3)
    v = p.decide(obs(pending=1000, bw=1e9))  # 4 MB at 1 GB/s = 4 ms
    assert v.decision == Decision.SWITCHOVER and v.converged
    assert "4.1 ms <= limit 300 ms" in v.reason


def test_device_bytes_count_toward_downtime():
    p = DowntimePolicy(downtime_limit_s=0.3)
    assert p.decide(obs(pending=0, bw=1e9, dev=int(0.2e9))).decision == Decision.SWITCHOVER
    assert p.decide(obs(pending=0, bw=1e9, dev=int(0.4e9))).decision == Decision.CONTINUE


def test_no_bandwidth_yet_means_continue():
    assert DowntimePolicy().decide(obs(pending=1, bw=0.0)).decision == Decision.CONTINUE


@pytest.mark.parametrize("on_limit,decision", [("cancel", Decision.CANCEL), ("force", Decision.SWITCHOVER)])
def test_caps(on_limit, decision):
    p = DowntimePolicy(max_rounds=5, max_time_s=10, on_limit=on_limit)
    v = p.decide(obs(pending=10**9, bw=1e6, rnd=5))
    assert v.decision == decision and not v.converged and "round cap 5" in v.reason
    v = p.decide(obs(pending=10**9, bw=1e6, rnd=1, elapsed=11))
    assert v.decision == decision and "time cap" in v.reason


def test_policy_rejects_nonsense():
    with pytest.raises(ValueError, match="on_limit"):
        DowntimePolicy(on_limit="pray")
    with pytest.raises(ValueError):
        DowntimePolicy(downtime_limit_s=0)


def test_ewma_bandwidth():
    e = PrecopyEngine(page_size=PAGE, ewma_alpha=0.5, min_sample_bytes=0)
    e.record_round(100, 100, 400_000, 0.001)  # 400 MB/s
    assert e.bandwidth_bps == pytest.approx(4e8)
    r = e.record_round(10, 100, 400_000, 0.004)  # 100 MB/s
    assert e.bandwidth_bps == pytest.approx(2.5e8)
    assert r.round == 1 and r.expected_downtime_ms == pytest.approx(10 * PAGE / 2.5e8 * 1e3)


def simulate(dirty_rate_pps, bw_bps, total_pages, policy):
    """A guest dirtying pages at a constant rate, a link of fixed bandwidth, driven through
    the same `MigrationSequence` as a real migration: every action answered on virtual time."""
    e = PrecopyEngine(page_size=PAGE, policy=policy)
    m = MigrationSequence(e, total_pages, total_pages * PAGE)
    t, pending = 0.0, total_pages
    while (action := m.next_action()) is not None:
        match action:
            case SendRound0() | SendPages():
                dur = pending * PAGE / bw_bps
                t += dur
                m.send(Sent(pending, pending * PAGE, dur))
                pending = min(total_pages, int(dirty_rate_pps * dur))
            case Collect():
                m.send(Collected(pending, 0, 0.0, t))
            case _:
                m.send(ANSWER[type(action)])
    return e, e.verdict, m


def test_converging_guest_switches_over():
    e, v, m = simulate(dirty_rate_pps=20_000, bw_bps=1e9, total_pages=262_144, policy=DowntimePolicy())
    assert v.decision == Decision.SWITCHOVER and e.converged
    assert m.phase is Phase.DONE and m.outcome.status == "completed"
    assert len(e.rounds) <= 5
    counts = [r.dirty_pages for r in e.rounds]
    assert counts == sorted(counts, reverse=True)


def test_non_converging_guest_is_cancelled_or_forced():
    pol = DowntimePolicy(downtime_limit_s=0.001, max_rounds=8)
    e, v, m = simulate(dirty_rate_pps=400_000, bw_bps=1e9, total_pages=262_144, policy=pol)
    assert v.decision == Decision.CANCEL and not e.converged and len(e.rounds) == 8
    assert m.phase is Phase.ABORTED and m.outcome.status == "cancelled"
    pol = DowntimePolicy(downtime_limit_s=0.001, max_rounds=8, on_limit="force")
    e, v, _ = simulate(dirty_rate_pps=400_000, bw_bps=1e9, total_pages=262_144, policy=pol)
    assert v.decision == Decision.SWITCHOVER and not e.converged


def test_round0_rate_counts_scanned_bytes():
    e = PrecopyEngine(page_size=PAGE)
    e.record_round(1000, 10, 10 * PAGE, 0.01, work_bytes=1000 * PAGE)
    assert e.bandwidth_bps == pytest.approx(1000 * PAGE / 0.01)


def test_collect_time_counts_toward_downtime():
    p = DowntimePolicy(downtime_limit_s=0.3)
    assert p.decide(Observation(1, 0, PAGE, 0, 1e9, 1.0, collect_s=0.2)).decision == Decision.SWITCHOVER
    v = p.decide(Observation(1, 0, PAGE, 0, 1e9, 1.0, collect_s=0.4))
    assert v.decision == Decision.CONTINUE and "400.0 ms" in v.reason


def test_tiny_rounds_do_not_move_the_estimate():
    e = PrecopyEngine(page_size=PAGE)
    e.record_round(1000, 1000, 1000 * PAGE, 0.004)
    before = e.bandwidth_bps
    e.record_round(1, 1, PAGE, 0.001)  # 4 MB/s of pure overhead
    assert e.bandwidth_bps == before
