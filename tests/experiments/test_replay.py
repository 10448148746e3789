"""Replays of recorded traces: with the recording's own numbers the recorded policy makes the
recorded run again, round for round; fitted, the models come from what the trace measured."""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.experiments.model import CollectModel, GuestWorkload, LinkModel, StepCosts, step_spans
from orchestrator.experiments.replay import predict, recorded_policy, scenario_of
from orchestrator.experiments.simulator import Scenario, Simulation, simulate
from orchestrator.experiments.trace import read_trace
from orchestrator.migration.engine import DowntimePolicy, OnLimit
from orchestrator.migration.engine.policies import ProgressTimeouts, StallDetection
from tests.experiments.recording import record

MIB = 1 << 20
RAM = 64 * MIB
#: Fixed costs of the steps around the modelled ones, a few milliseconds each as on real QEMU.
STEPS = {
    "Prepare": 0.012,
    "StartTrackers": 0.004,
    "SendRound0": 0.0004,
    "Collect": 0.0003,
    "SendPages": 0.0006,
    "Listen": 0.0025,
    "Migrate": 0.005,
    "Collect:final": 0.0015,
    "SendPages:final": 0.0008,
    "Continue": 0.0035,
    "AwaitCompletion": 0.016,
    "StopTrackers": 0.018,
}

policies = st.one_of(
    st.builds(
        DowntimePolicy,
        downtime_limit_s=st.floats(0.005, 0.5),
        max_rounds=st.integers(2, 12),
        max_time_s=st.floats(1.0, 60.0),
        on_limit=st.sampled_from(OnLimit),
    ),
    st.builds(StallDetection, downtime_limit_s=st.floats(0.005, 0.5), window=st.integers(1, 4)),
    st.builds(ProgressTimeouts, downtime_limit_s=st.floats(0.005, 0.5), progress_timeout_s=st.floats(0.5, 20.0)),
)
scenarios = st.builds(
    lambda pattern, wss, rate, bw, overhead, per_page: Scenario(
        GuestWorkload.from_command_line(f"pattern={pattern} wss={wss}M rate={rate}M", RAM),
        RAM,
        link=LinkModel(bw * MIB, overhead),
        collect=CollectModel(0.002, per_page),
        steps=StepCosts(STEPS, resume_s=0.015),
        device_bytes=0,
    ),
    st.sampled_from(["sweep", "random", "hotcold"]),
    st.integers(1, 48),
    st.integers(1, 256),
    st.integers(4, 400),
    st.floats(0.0, 0.01),
    st.floats(0.0, 1e-6),
)


def recorded(scenario: Scenario, policy, path: Path):
    return asyncio.run(record(Simulation(scenario, policy), path))


@settings(max_examples=40, deadline=None)
@given(scenarios, policies)
def test_replay_with_recorded_timings_reproduces_the_rounds(scenario, policy):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.jsonl"
        original = recorded(scenario, policy, path).as_dict()
        trace = read_trace(path)
        assert recorded_policy(trace) == policy
        replay = predict(trace, modelled=False)
    assert len(replay["rounds"]) == len(original["rounds"])
    for got, want in zip(replay["rounds"], original["rounds"], strict=True):
        # Counts exactly; times and rates to the last bits a trip through milliseconds keeps.
        assert got == pytest.approx(want, rel=1e-12)
    for key in ("status", "decision", "downtime_ms", "bytes_sent"):
        assert replay[key] == original[key]
    assert replay["total_ms"] == pytest.approx(original["total_ms"])


def test_another_policy_departs_from_the_recording(tmp_path):
    """The script answers only while the replay follows it; after that the models do."""
    sc = Scenario(GuestWorkload.from_command_line("pattern=random wss=32M rate=0", RAM), RAM, link=LinkModel(40 * MIB))
    path = tmp_path / "run.jsonl"
    original = recorded(sc, DowntimePolicy(downtime_limit_s=0.001, max_rounds=4), path).as_dict()
    assert original["status"] == "cancelled" and len(original["rounds"]) == 4
    longer = predict(path, DowntimePolicy(downtime_limit_s=0.001, max_rounds=8), modelled=False)
    assert len(longer["rounds"]) == 8 and longer["rounds"][:4] == original["rounds"]


def test_modelled_replay_of_a_trace_fits_its_link_and_sets(tmp_path):
    sc = Scenario(
        GuestWorkload.from_command_line("pattern=sweep wss=16M rate=8M", RAM),
        RAM,
        link=LinkModel(64 * MIB, 0.001),
        collect=CollectModel(0.004, 0.0),
    )
    path = tmp_path / "run.jsonl"
    original = recorded(sc, DowntimePolicy(downtime_limit_s=0.02), path).as_dict()
    trace = read_trace(path)
    fitted = scenario_of(trace)
    assert fitted.script is None
    assert fitted.collect.per_gib_s == pytest.approx(0.004, rel=1e-6)
    modelled = predict(trace)
    assert len(modelled["rounds"]) == len(original["rounds"])
    assert modelled["status"] == original["status"] == "completed"


def busy(steps: dict[str, float]) -> Scenario:
    """A sweep that needs a few rounds at a 20 ms limit, with the given step costs."""
    return Scenario(
        GuestWorkload.from_command_line("pattern=sweep wss=16M rate=32M", RAM),
        RAM,
        link=LinkModel(64 * MIB, 0.001),
        collect=CollectModel(0.004, 2e-7),
        steps=StepCosts(steps, resume_s=0.006),
    )


TIGHT = DowntimePolicy(downtime_limit_s=0.02)


def test_step_costs_fitted_from_a_trace_are_the_recorded_ones(tmp_path):
    recorded(busy(STEPS), TIGHT, tmp_path / "run.jsonl")
    trace = read_trace(tmp_path / "run.jsonl")
    spans = step_spans(trace)
    assert spans[0].start_s == 0.0 and spans[-1].end_s == trace.end.t  # the spans are the whole run
    assert sum(s.seconds for s in spans) == pytest.approx(trace.end.report["total_ms"] / 1e3)
    fitted = scenario_of(trace).steps
    assert fitted.resume_s == pytest.approx(0.006, abs=1e-9)
    for key, seconds in STEPS.items():
        assert fitted.seconds[key] == pytest.approx(seconds, abs=1e-9), key
    assert fitted.seconds["DevicesStopCopy"] == pytest.approx(0.0, abs=1e-9)  # not given: nothing


def test_a_modelled_replay_of_its_own_trace_takes_the_recorded_time(tmp_path):
    path = tmp_path / "run.jsonl"
    original = recorded(busy(STEPS), TIGHT, path).as_dict()
    assert original["status"] == "completed" and len(original["rounds"]) >= 4
    replay = predict(path)
    assert [r["dirty_pages"] for r in replay["rounds"]] == [r["dirty_pages"] for r in original["rounds"]]
    assert replay["total_ms"] == pytest.approx(original["total_ms"], rel=1e-6)
    assert replay["downtime_ms"] == pytest.approx(original["downtime_ms"], rel=1e-6)
    # Negative control: without the fitted step costs the replay misses at least the ones
    # every run pays once.
    bare = simulate(replace(scenario_of(read_trace(path)), steps=StepCosts({}, resume_s=0.0)), TIGHT)
    assert bare.total_ms < original["total_ms"] - 1e3 * (STEPS["Prepare"] + STEPS["StopTrackers"])


def test_a_trace_whose_steps_are_slower_predicts_a_longer_run(tmp_path):
    slow_steps = {k: 2 * v for k, v in STEPS.items()}
    fast, slow = tmp_path / "fast.jsonl", tmp_path / "slow.jsonl"
    recorded(busy(STEPS), TIGHT, fast)
    recorded(busy(slow_steps), TIGHT, slow)
    quick, slower = predict(fast), predict(slow)
    assert slower["total_ms"] > quick["total_ms"] + sum(STEPS.values()) * 1e3 * 0.8
    assert slower["downtime_ms"] > quick["downtime_ms"]  # the final collect and copy, Continue
