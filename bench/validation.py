"""Validation: how well the simulator predicts real migrations.

Every case is one fixture workload under one policy. It migrates the running guest twice,
each time on a fresh pair, recording a trace (`orchestrator.experiments.recorder`). The first
run's trace is the training run: the simulator fits its models to it (link, collect costs,
the dirty sets over time, the switchover's own times) and predicts the second run under the
same policy; the errors compare that prediction with what the second run measured. So a
prediction never sees the run it predicts. Each trace also replays with its own recorded
numbers (`modelled=False`), which must give its round count exactly.

The two runs of a case differ by themselves (the machine's scheduling, QEMU's own timing), and
a model fitted to one run carries that run's share of it. `run_to_run` is the first run's
measured figures taken as the prediction of the second's: the error no predictor fitted to
one run can be expected to beat.

Policies: the default downtime rule (300 ms); a tight one (20 ms, at most 8 rounds, then
cancel), under which the busy workloads take several rounds (write-watch's faults slow their
writers, so a round's dirty set shrinks to 7 000 to 14 000 pages, near what fits 20 ms: most
runs converge, some hit the cap); and a capped one (20 ms, cancelled at the first decision that does not
fit), under which the busy workloads' first decision, a whole working set of 22 000 to 33 000
pages expected at about 100 ms, never converges while the idle and light ones do: the verdict
must be right both ways.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import Options, suite
from bench.migrate import SETTLE_LINES, fresh_destination
from orchestrator.experiments.recorder import trace_watch
from orchestrator.experiments.replay import predict
from orchestrator.experiments.trace import read_trace
from orchestrator.lab.demo import guest_pair, wait_progress
from orchestrator.migration.attach import attach
from orchestrator.migration.driver import MigrationOptions, run_watched
from orchestrator.migration.engine import OnLimit
from orchestrator.trackers import QemuWrites

#: What is compared, as the report names it.
FIGURES = ("total_ms", "downtime_ms", "rounds", "bytes_sent")


@dataclass(frozen=True)
class Case:
    workload: str
    policy: str
    options: MigrationOptions
    mem_mib: int = 256


DEFAULT = MigrationOptions(downtime_limit_ms=300, max_time_s=60)
TIGHT = MigrationOptions(downtime_limit_ms=20, max_rounds=8, max_time_s=60, on_limit=OnLimit.CANCEL)
CAPPED = MigrationOptions(downtime_limit_ms=20, max_rounds=1, max_time_s=60, on_limit=OnLimit.CANCEL)
POLICIES = (("default", DEFAULT), ("tight", TIGHT), ("capped", CAPPED))
WORKLOADS = ("idle", "light", "sweep", "heavy", "hotcold", "fwcfg")
CASES = [
    *(Case(w, name, opts) for w in WORKLOADS for name, opts in POLICIES),
    *(Case("linux", name, opts, mem_mib=512) for name, opts in POLICIES),
]


async def _recorded_run(case: Case, trace: Path) -> dict[str, Any]:
    """One real migration of a fresh pair, traced; its report as the trace's end holds it."""
    async with guest_pair(case.workload, case.mem_mib << 20, tracker=QemuWrites.WRITEWATCH) as pair:
        await wait_progress(pair.src, SETTLE_LINES, 60)
        fresh_destination(pair.dst)
        ep = await attach(pair.src.qmp, pair.dst.qmp, pair.src.ram_path, pair.dst.ram_path)
        try:
            mig = replace(pair, endpoints=ep).migration(case.options)
            await run_watched(mig, [trace_watch(trace, case.workload)])
        finally:
            ep.sink.close()
    end = read_trace(trace).end
    if end is None:
        raise RuntimeError(f"the trace of {case.workload}/{case.policy} has no end record")
    return dict(end.report)


def _figures(report: Mapping[str, Any]) -> dict[str, Any]:
    out = {f: report.get(f) for f in FIGURES}
    out["rounds"] = len(report.get("rounds") or [])
    out["converged"] = report.get("status") == "completed"
    return out


def _error(predicted: float | None, measured: float | None) -> float | None:
    if predicted is None or measured is None or measured == 0:
        return None
    return round(abs(predicted - measured) / measured, 3)


def _case(case: Case, work: Path) -> dict[str, Any]:
    train, test = (
        work / f"{case.workload}-{case.policy}-train.jsonl",
        work / f"{case.workload}-{case.policy}-test.jsonl",
    )
    measured_train = _figures(asyncio.run(_recorded_run(case, train)))
    measured = _figures(asyncio.run(_recorded_run(case, test)))
    predicted = _figures(predict(read_trace(train), modelled=True))
    replays = [
        _figures(predict(read_trace(t), modelled=False))["rounds"] == m["rounds"]
        for t, m in ((train, measured_train), (test, measured))
    ]
    return {
        "workload": case.workload,
        "policy": case.policy,
        "mem_mib": case.mem_mib,
        "measured": measured,
        "predicted": predicted,
        "training": measured_train,
        "errors": {f: _error(predicted[f], measured[f]) for f in FIGURES},
        "run_to_run": {f: _error(measured_train[f], measured[f]) for f in FIGURES},
        "verdict_right": predicted["converged"] == measured["converged"],
        "replay_rounds_exact": all(replays),
    }


def _median(rows: list[dict[str, Any]], key: str, figure: str) -> float | None:
    errs = [r[key][figure] for r in rows if r[key][figure] is not None]
    return round(statistics.median(errs), 3) if errs else None


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median relative errors per figure, the same medians between the two measured runs, and
    whether every verdict and replay was right."""
    out: dict[str, Any] = {}
    for f in FIGURES:
        out[f"median_error_{f}"] = _median(rows, "errors", f)
        out[f"median_run_to_run_{f}"] = _median(rows, "run_to_run", f)
    out["verdicts_right"] = sum(r["verdict_right"] for r in rows)
    out["cases"] = len(rows)
    out["replays_exact"] = all(r["replay_rounds_exact"] for r in rows)
    return out


@suite("validation")
def simulator(options: Options) -> dict[str, Any]:
    cases = CASES[:2] if options.quick else CASES
    with tempfile.TemporaryDirectory(prefix="orchestrator-validation-") as tmp:
        rows = [_case(c, Path(tmp)) for c in cases if not options.rows or c.workload in options.rows]
    return {"cases": rows, "summary": summary(rows)}
