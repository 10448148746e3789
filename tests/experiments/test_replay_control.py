"""A steered run replays with its steering: the recorder writes each ORCH_CONTROL as a
`control` record, and the simulator applies it when its clock reaches that time."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from orchestrator.experiments.recorder import trace_watch
from orchestrator.experiments.replay import predict
from orchestrator.experiments.trace import Control, Trace, read_trace
from orchestrator.migration.driver import run_watched
from orchestrator.migration.events import EventName, MigrationEvent
from tests.fakes.rig import OPTIONS, Rig

#: Never converges by itself, cancels at its cap: a switchover is the caller's doing.
STUBBORN = dataclasses.replace(OPTIONS, max_rounds=12, on_limit="cancel")


async def steered_trace(tmp_path: Path) -> tuple[Trace, int]:
    rig = Rig.build()
    try:
        mig = rig.migration(STUBBORN)

        def relax(ev: MigrationEvent) -> None:
            if ev.name is EventName.MIGRATION_PASS and ev.data["pass"] == 2:
                mig.set_parameters(downtime_limit_ms=60_000)

        mig.listen(relax)
        rep = await run_watched(mig, [trace_watch(tmp_path / "steered.jsonl")])
    finally:
        await rig.close()
    assert rep.ok
    return read_trace(tmp_path / "steered.jsonl"), len(rep.rounds)


async def test_the_steering_is_recorded_and_replayed(tmp_path: Path) -> None:
    trace, rounds = await steered_trace(tmp_path)
    assert [(c.command, c.data) for c in trace.of(Control)] == [("set-parameters", {"downtime-limit": 60_000})]
    for modelled in (False, True):
        replay = predict(trace, modelled=modelled)
        assert replay["status"] == "completed" and len(replay["rounds"]) == rounds, modelled
        assert "<= limit 60000 ms" in replay["decision"]


async def test_without_its_steering_the_same_trace_runs_to_the_cap(tmp_path: Path) -> None:
    """The negative control: the recorded policy alone never converges."""
    trace, _ = await steered_trace(tmp_path)
    unsteered = Trace(trace.header, [r for r in trace.records if not isinstance(r, Control)])
    replay = predict(unsteered, modelled=True)
    assert replay["status"] == "cancelled" and "round cap 12" in replay["decision"]
