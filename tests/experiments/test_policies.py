"""Each policy's decisions on crafted observations, and the registry that builds them by name."""

from __future__ import annotations

import pytest

from orchestrator.migration.engine import Decision, DowntimePolicy, Observation, OnLimit, PolicyError, RoundRecord
from orchestrator.migration.engine.policies import DowntimeRamp, ProgressTimeouts, StallDetection, last_progress_s
from orchestrator.migration.engine.policy import with_downtime_limit
from orchestrator.migration.engine.registry import POLICIES, describe, make_policy, parse_settings, rebuild

PAGE = 4096
GIB = 1 << 30


def obs(pending: int, elapsed: float, bandwidth: float = 1e9, ram: int = GIB, rounds=(), round_=1) -> Observation:
    return Observation(round_, pending, PAGE, 0, bandwidth, elapsed, ram_bytes=ram, rounds=tuple(rounds))


def rec(n: int, dirty: int, ended_s: float) -> RoundRecord:
    return RoundRecord(n, dirty, dirty, dirty * PAGE, 10.0, 1e9, 0.0, ended_s * 1e3)


def pending_for(downtime_s: float, bandwidth: float = 1e9) -> int:
    return int(downtime_s * bandwidth / PAGE)


# -- Nova's ramp ---------------------------------------------------------------------------------
def test_ramp_schedule_is_novas_arithmetic():
    # 1 GiB: a step every 75 s; base = 500/10 = 50 ms, each step 45 ms more, 500 ms at step 10.
    steps = list(DowntimeRamp().schedule(GIB))
    assert steps[0] == (0.0, pytest.approx(0.05))
    assert steps[1] == (75.0, pytest.approx(0.095))
    assert steps[-1] == (750.0, pytest.approx(0.5))
    assert len(steps) == 11
    assert DowntimeRamp().limit_at(149.9, GIB) == pytest.approx(0.095)
    assert DowntimeRamp().limit_at(2 * 75.0, 2 * GIB) == pytest.approx(0.095)  # 2 GiB: 150 s a step


def test_ramp_switches_over_once_the_limit_has_grown_enough():
    p = DowntimeRamp()
    want = pending_for(0.08)  # 80 ms: above step 0 (50 ms), below step 1 (95 ms)
    assert p.decide(obs(want, 10.0)).decision is Decision.CONTINUE
    v = p.decide(obs(want, 80.0))
    assert v.decision is Decision.SWITCHOVER and v.converged


def test_ramp_completion_timeout_cancels_or_forces():
    busy = pending_for(2.0)
    assert DowntimeRamp().decide(obs(busy, 799.0)).decision is Decision.CONTINUE
    v = DowntimeRamp().decide(obs(busy, 800.0))
    assert v.decision is Decision.CANCEL and "completion timeout 800 s" in v.reason
    v = DowntimeRamp(on_limit=OnLimit.FORCE).decide(obs(busy, 800.0))
    assert v.decision is Decision.SWITCHOVER and not v.converged


# -- KubeVirt's timeouts ---------------------------------------------------------------------
def test_progress_is_the_last_new_low_of_the_remaining_data():
    history = [rec(0, 262144, 1.0), rec(1, 1000, 2.0), rec(2, 900, 3.0), rec(3, 950, 4.0)]
    assert last_progress_s(obs(960, 5.0, rounds=history)) == 3.0
    assert last_progress_s(obs(800, 5.0, rounds=history)) == 5.0  # a new low right now


def test_no_progress_for_the_progress_timeout_cancels():
    history = [rec(0, 262144, 1.0), rec(1, 100_000, 2.0), rec(2, 90_000, 3.0), rec(3, 95_000, 4.0)]
    p = ProgressTimeouts()  # 4 GiB below: the completion timeout (600 s) is far off
    v = p.decide(obs(96_000, 153.0, ram=4 * GIB, rounds=history))
    assert v.decision is Decision.CANCEL and "no progress for 150 s" in v.reason
    # Negative control: the same time, but the remaining data reached a new low just now.
    assert p.decide(obs(80_000, 153.0, ram=4 * GIB, rounds=history)).decision is Decision.CONTINUE
    assert p.decide(obs(96_000, 152.9, ram=4 * GIB, rounds=history)).decision is Decision.CONTINUE


def test_completion_timeout_scales_with_memory():
    p = ProgressTimeouts(progress_timeout_s=1e6)
    busy = pending_for(1.0)
    assert p.decide(obs(busy, 299.0, ram=2 * GIB)).decision is Decision.CONTINUE
    assert p.decide(obs(busy, 300.0, ram=2 * GIB)).decision is Decision.CANCEL
    assert p.decide(obs(pending_for(0.1), 300.0, ram=2 * GIB)).decision is Decision.SWITCHOVER


# -- stall detection ---------------------------------------------------------------------------
def test_stall_forces_when_the_last_window_gains_too_little():
    history = [rec(0, 262144, 1), rec(1, 100_000, 2), rec(2, 50_000, 3), rec(3, 49_000, 4), rec(4, 49_500, 5)]
    p = StallDetection()
    # before the window: lowest 50,000; in it (49,000, 49,500, now 49,200): 2% better, under 5%.
    v = p.decide(obs(49_200, 6.0, 1e8, rounds=history))
    assert v.decision is Decision.SWITCHOVER and not v.converged and "stalled" in v.reason
    assert (
        StallDetection(on_limit=OnLimit.CANCEL).decide(obs(49_200, 6.0, 1e8, rounds=history)).decision
        is Decision.CANCEL
    )
    # Negative control: a guest still getting closer (10% better) is left alone.
    improving = [*history[:3], rec(3, 45_000, 4), rec(4, 44_000, 5)]
    assert p.decide(obs(43_000, 6.0, 1e8, rounds=improving)).decision is Decision.CONTINUE


def test_stall_needs_a_full_window_and_ignores_round0():
    p = StallDetection(window=3)
    history = [rec(0, 100, 1), rec(1, 100_000, 2), rec(2, 100_000, 3)]
    assert not p.stalled(obs(100_000, 4.0, rounds=history))  # three counts: no "before" yet
    assert p.stalled(obs(100_000, 5.0, rounds=[*history, rec(3, 100_000, 4)]))


@pytest.mark.parametrize("cls", list(POLICIES.values()))
def test_every_policy_takes_a_new_downtime_limit(cls):
    tuned = with_downtime_limit(cls(), 0.123)
    assert type(tuned) is cls
    assert getattr(tuned, "inner", tuned).downtime_limit_s == 0.123  # a wrapper passes it on


@pytest.mark.parametrize(
    "cls, bad",
    [
        (DowntimeRamp, {"steps": 0}),
        (DowntimeRamp, {"downtime_limit_s": float("inf")}),
        (ProgressTimeouts, {"progress_timeout_s": -1.0}),
        (StallDetection, {"min_gain": 1.0}),
        (StallDetection, {"window": 0}),
        (StallDetection, {"on_limit": "maybe"}),
    ],
)
def test_bad_settings_are_refused(cls, bad):
    with pytest.raises(PolicyError):
        cls(**bad)


# -- the registry ------------------------------------------------------------------------------
def test_settings_are_typed_by_the_fields():
    p = make_policy("nova", parse_settings(["steps=4", "downtime_limit_s=0.8", "on_limit=force"]))
    assert p == DowntimeRamp(downtime_limit_s=0.8, steps=4, on_limit=OnLimit.FORCE)
    assert make_policy("qemu", {"max_rounds": 7.0}) == DowntimePolicy(max_rounds=7)
    assert make_policy("threshold") == DowntimePolicy()


@pytest.mark.parametrize(
    "name, settings, message",
    [
        ("nova", {"stepz": "3"}, "no setting 'stepz'"),
        ("nova", {"steps": "three"}, "steps='three': must be an integer"),
        ("nova", {"steps": "2.5"}, "must be an integer"),
        ("downtime", {"downtime_limit_s": "nan"}, "must be finite"),
        ("downtime", {"on_limit": "later"}, "must be one of ['cancel', 'force']"),
        ("downtime", {"max_rounds": "0"}, "policy 'downtime'"),
        ("nope", {}, "no policy named 'nope'"),
    ],
)
def test_bad_names_and_values_are_named(name, settings, message):
    with pytest.raises(PolicyError, match=None) as err:
        make_policy(name, settings)
    assert message in str(err.value)


@pytest.mark.parametrize("items", [["steps"], ["=3"], ["steps=1", "steps=2"]])
def test_malformed_set_items_are_refused(items):
    with pytest.raises(PolicyError):
        parse_settings(items)


@pytest.mark.parametrize("name", list(POLICIES))
def test_describe_and_rebuild_round_trip(name):
    p = make_policy(name)
    d = describe(p)
    assert d["name"] == name and rebuild(d) == p
    assert all(not hasattr(v, "value") for v in d["params"].values())  # JSON-ready: enums as values


def test_the_throttling_policy_is_built_around_an_inner_one():
    p = make_policy("throttle", parse_settings(["inner=nova", "inner.steps=5", "initial=0.3"]))
    assert p.inner == DowntimeRamp(steps=5) and p.initial == 0.3
    d = describe(p)
    assert d["params"]["inner"] == "nova" and d["params"]["inner.steps"] == 5 and rebuild(d) == p
    assert make_policy("throttle", {"inner.max_rounds": "4"}).inner == DowntimePolicy(max_rounds=4)
    with pytest.raises(PolicyError, match="no setting 'bogus'"):
        make_policy("throttle", {"inner.bogus": "1"})
    with pytest.raises(PolicyError, match="no setting 'inner'"):
        make_policy("nova", {"inner.steps": "1"})
