"""PNG plots of a report (per-round dirty and sent pages, expected and actual downtime), of a
trace (its working-set curve W(t)) and of a sweep (total time against downtime, the Pareto
front, the convergence boundary). matplotlib's Agg backend: files only, no display needed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from orchestrator.experiments.errors import ExperimentError
from orchestrator.experiments.model import TraceWorkload, working_set
from orchestrator.experiments.pareto import convergence_boundary, pareto_front
from orchestrator.experiments.sweep import read_table
from orchestrator.experiments.trace import FORMAT, Trace, read_trace

LIMIT_KEY = "downtime_limit_s"


def _save(fig: Any, out: str | Path) -> Path:
    out = Path(out)
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=110)
    plt.close(fig)
    return out


def plot_report(report: Mapping[str, Any], out: str | Path) -> Path:
    """Per round: dirty and sent pages (bars), expected downtime against the measured one."""
    rounds = report.get("rounds") or []
    if not rounds:
        raise ExperimentError("a report without rounds has nothing to plot")
    n = np.arange(len(rounds))
    fig, (pages, down) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    pages.bar(n - 0.2, [r["dirty_pages"] for r in rounds], 0.4, label="dirty")
    pages.bar(n + 0.2, [r["sent_pages"] for r in rounds], 0.4, label="sent")
    pages.set_yscale("symlog")
    pages.set_ylabel("pages")
    pages.legend()
    pages.set_title(f"{report.get('status', '?')}: {report.get('decision', '')}"[:90], fontsize=9)
    down.plot(n, [r["expected_downtime_ms"] for r in rounds], marker="o", label="expected after the round")
    if report.get("downtime_ms") is not None:
        down.axhline(report["downtime_ms"], color="tab:red", linestyle="--", label="measured downtime")
    down.set_yscale("log")
    down.set_xlabel("round")
    down.set_ylabel("downtime (ms)")
    down.legend()
    return _save(fig, out)


def plot_working_set(trace: Trace, out: str | Path, points: int = 24) -> Path:
    """W(t): distinct pages written in a window of length t, from the shortest recorded
    interval to the whole trace."""
    workload = TraceWorkload.from_trace(trace)
    shortest = min(iv.end_s - iv.start_s for iv in workload.intervals)
    windows = np.geomspace(shortest, max(workload.span_s, shortest * 1.01), points)
    curve = working_set(workload, list(windows))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(windows, curve, marker=".")
    ax.axhline(workload.npages, color="grey", linestyle=":", label="all pages")
    ax.set_xscale("log")
    ax.set_xlabel("window t (s)")
    ax.set_ylabel("W(t): distinct pages written")
    ax.set_title(f"working set of {trace.header.workload or trace.header.kind.value} trace", fontsize=9)
    ax.legend()
    return _save(fig, out)


def plot_sweep(rows: Sequence[Mapping[str, Any]], out: str | Path) -> Path:
    """Total time against downtime of every completed run: converged ones as dots, forced ones
    as crosses; the Pareto front; and per scenario the smallest downtime limit that converged."""
    done = [r for r in rows if r.get("downtime_ms") not in (None, "")]
    if not done:
        raise ExperimentError("no run of the sweep completed: no downtime to plot")
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for converged, marker, label in ((True, "o", "converged"), (False, "x", "forced")):
        pts = [r for r in done if bool(r.get("converged")) is converged]
        if pts:
            ax.scatter([r["total_ms"] for r in pts], [r["downtime_ms"] for r in pts], marker=marker, s=14, label=label)
    points = [(float(r["total_ms"]), float(r["downtime_ms"])) for r in done]
    front = [points[i] for i in pareto_front(points)]
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", label="Pareto front")
    if any(LIMIT_KEY in r for r in rows):
        for scenario, limit in convergence_boundary(rows, LIMIT_KEY).items():
            if limit is not None:
                ax.axhline(
                    limit * 1e3, linestyle="--", linewidth=0.8, label=f"{scenario}: converges from {limit * 1e3:.0f} ms"
                )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("total time (ms)")
    ax.set_ylabel("downtime (ms)")
    cancelled = len(rows) - len(done)
    ax.set_title(f"{len(rows)} runs ({cancelled} cancelled, not shown)", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, out)


def plot_file(path: str | Path, out: str | Path) -> Path:
    """A plot of whatever `path` holds: a JSON report, a trace, or a sweep table (CSV)."""
    path = Path(path)
    if path.suffix == ".csv":
        return plot_sweep(read_table(path), out)
    with path.open(encoding="utf-8") as f:
        first = f.readline()
    try:
        head = json.loads(first)
    except json.JSONDecodeError:
        head = None
    if isinstance(head, dict) and head.get("format") == FORMAT:
        return plot_working_set(read_trace(path), out)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise ExperimentError(f"{path} is neither a JSON report, a trace nor a sweep table (.csv)") from None
    if not isinstance(report, dict) or "rounds" not in report:
        raise ExperimentError(f"{path} is JSON but not a migration report (no rounds)")
    return plot_report(report, out)
