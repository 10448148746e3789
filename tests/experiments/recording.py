"""Traces of simulated runs, written by the same recorder and writer as a real migration's."""

from __future__ import annotations

from pathlib import Path

from orchestrator.experiments.recorder import EventRecorder
from orchestrator.experiments.simulator import Simulation
from orchestrator.experiments.trace import End, TraceHeader, TraceKind, TraceWriter
from orchestrator.migration.driver import MigrationReport
from orchestrator.migration.engine.registry import describe


async def record(sim: Simulation, path: Path) -> MigrationReport:
    """Run `sim` with its events going to a trace at `path`, as `migrate --trace` would."""
    sc = sim.scenario
    header = TraceHeader(
        kind=TraceKind.MIGRATION,
        page_size=sc.page_size,
        ram_bytes=sc.ram_bytes,
        npages=sc.ram_bytes // sc.page_size,
        workload="simulated",
        policy=describe(sim.policy),
        bandwidth_cap=sc.link.cap_bps,
    )
    writer = await TraceWriter(path, header, maxsize=1 << 16).open()
    sim.listen(EventRecorder(writer))
    report = sim.run()
    await writer.close(lambda: End(report.total_ms / 1e3, report.as_dict()))
    assert writer.dropped == 0
    return report
