"""From a trace to a prediction: the scenario a recorded run ran against (its dirty sets, its
link, its collect costs, what each of its steps cost) and the policy it was recorded with.

`predict(trace, policy=None, modelled=True)` is the one call a validation needs: modelled, the
fitted models answer every action (what a prediction of another policy relies on); not
modelled, the recording's own numbers answer as long as the replay follows it, so the same
policy must reproduce the recorded rounds exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.experiments.model import (
    CollectModel,
    GuestWorkload,
    LinkModel,
    Pattern,
    StepCosts,
    TraceWorkload,
    Workload,
)
from orchestrator.experiments.simulator import RecordedCollect, Scenario, Script, simulate
from orchestrator.experiments.trace import Control, Trace, TraceKind, read_trace
from orchestrator.migration.engine import DowntimePolicy, Policy
from orchestrator.migration.engine.registry import rebuild


def recorded_policy(trace: Trace) -> Policy:
    """The policy the trace names, with its settings; the default rule when it names none."""
    described = trace.header.policy
    return DowntimePolicy() if described is None else rebuild(described)


def script_of(trace: Trace) -> Script:
    """The recorded run's numbers: each collect's count, costs and time, each round as sent."""
    collects = []
    for d in sorted(trace.decisions, key=lambda d: int(d.data["round"])):
        collects.append(
            RecordedCollect(
                int(d.data["pending-pages"]),
                int(d.data.get("device-bytes") or 0),
                float(d.data.get("collect-ms") or 0.0) / 1e3,
                d.t,
            )
        )
    end = trace.end
    report: dict[str, Any] = end.report if end is not None else {}
    downtime = report.get("downtime_ms") if report.get("status") == "completed" else None
    return Script(tuple(trace.rounds), tuple(collects), downtime, report.get("total_ms"))


def scenario_of(trace: Trace, modelled: bool = True, link: LinkModel | None = None) -> Scenario:
    """The scenario of a trace: a migration's fitted link, collect and step costs (a probe has
    none: `link`, or the defaults), its dirty sets, and with `modelled=False` its own numbers."""
    h = trace.header
    workload: Workload
    if modelled or trace.collects or trace.harvests:
        workload = TraceWorkload.from_trace(trace)
    else:  # a run that ended before its first harvest: only its own numbers answer
        workload = GuestWorkload(Pattern.IDLE, 0, 0.0, h.npages, base_page=0)
    if h.kind is TraceKind.PROBE or not trace.rounds:
        return Scenario(workload, h.ram_bytes, h.page_size, link or LinkModel(cap_bps=h.bandwidth_cap))
    device = [int(d.data.get("device-bytes") or 0) for d in trace.decisions]
    link = link or LinkModel.fit(trace)
    collect = CollectModel.fit(trace)
    return Scenario(
        workload,
        h.ram_bytes,
        h.page_size,
        link,
        collect,
        StepCosts.fit(trace, link, collect),
        device[-1] if device else 0,
        None if modelled else script_of(trace),
        tuple(trace.of(Control)),
    )


def predict(trace: Trace | str | Path, policy: Policy | None = None, modelled: bool = True) -> dict[str, Any]:
    """The report (`MigrationReport.as_dict()`) a replay of `trace` predicts under `policy`
    (default: the one it recorded)."""
    t = trace if isinstance(trace, Trace) else read_trace(trace)
    return simulate(scenario_of(t, modelled), policy or recorded_policy(t)).as_dict()
