"""`migrate --trace` / `demo --trace`: a Watch that writes a running migration as a trace.

It listens to the migration's events (called on the loop's thread, in order) and turns each
into a record offered to a `TraceWriter`, which never waits: a round is never held up by the
disk. A round's harvest (ORCH_HARVEST, its page numbers) becomes a `collect` record joined
with the decision just before it, which measured that collect; the final collect's time is
the gap between its step and the final send's, since no decision follows it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.experiments.trace import (
    Collect,
    Control,
    Decision,
    End,
    Record,
    Round,
    Status,
    Step,
    Throttle,
    TraceHeader,
    TraceKind,
    TraceWriter,
    TrackerNote,
)
from orchestrator.migration.driver import Migration, Watch
from orchestrator.migration.engine import Policy, PolicyError, RoundRecord
from orchestrator.migration.engine.registry import describe, policy_name
from orchestrator.migration.events import EventName, MigrationEvent


def policy_description(policy: Policy) -> dict[str, Any] | None:
    """The registry's `{"name", "params"}` (what a simulator rebuilds the policy from); None
    for a policy the registry does not know (a caller's own `custom_policy`)."""
    try:
        policy_name(policy)
    except PolicyError:
        return None
    return describe(policy)


class EventRecorder:
    """Turns one migration's events into trace records, in the order they came."""

    def __init__(self, writer: TraceWriter) -> None:
        self.writer = writer
        self._decision: dict[str, Any] | None = None
        self._final_collect_at: float | None = None

    def __call__(self, ev: MigrationEvent) -> None:
        rec = self._record(ev)
        if rec is not None:
            self.writer.offer(rec)

    def _record(self, ev: MigrationEvent) -> Record | None:
        t = ev.elapsed_s
        match ev.name:
            case EventName.MIGRATION_PASS:
                assert isinstance(ev.record, RoundRecord)
                return Round(t, ev.record)
            case EventName.DECISION:
                self._decision = ev.data
                return Decision(t, dict(ev.data))
            case EventName.HARVEST:
                return self._collect(ev)
            case EventName.MIGRATION:
                return Status(t, str(ev.data["status"]))
            case EventName.TRACKER:
                return TrackerNote(t, dict(ev.data))
            case EventName.CONTROL:
                return Control(t, str(ev.data["command"]), {k: v for k, v in ev.data.items() if k != "command"})
            case EventName.STEP:
                action = str(ev.data["action"])
                if action == "Collect" and ev.data.get("final"):
                    self._final_collect_at = t
                if action == "Throttle":
                    return Throttle(t, float(ev.data["level"]))
                return Step(t, action, {k: v for k, v in ev.data.items() if k != "action"})
        return None

    def _collect(self, ev: MigrationEvent) -> Collect:
        pages = np.asarray(ev.record, dtype=np.int64)
        round_, final = int(ev.data["round"]), bool(ev.data["final"])
        decision = self._decision if self._decision and self._decision.get("round") == round_ else None
        if final:
            at = self._final_collect_at
            collect_ms = None if at is None else (ev.elapsed_s - at) * 1e3
            device_bytes = None
        else:
            collect_ms = None if decision is None else decision["collect-ms"]
            device_bytes = None if decision is None else decision["device-bytes"]
        # The harvest's own array: fresh per round and only ever read by the sink, so the
        # bitmap is made from it in the writer's thread, not here on the loop.
        return Collect(ev.elapsed_s, round_, device_bytes, collect_ms, final, pages)


def migration_header(mig: Migration, workload: str | None = None) -> TraceHeader:
    layout = mig.layout
    return TraceHeader(
        kind=TraceKind.MIGRATION,
        page_size=layout.page_size,
        ram_bytes=sum(r.length for r in layout.regions),
        npages=layout.npages,
        workload=workload,
        policy=policy_description(mig.engine.policy),
        bandwidth_cap=mig.sink.max_bandwidth,
    )


def trace_watch(path: Path, workload: str | None = None, maxsize: int = 4096) -> Watch:
    """A Watch writing the migration to `path` (JSON Lines, docs/TRACE.md). The file is
    flushed and closed on every exit path; its last record is the report."""

    @asynccontextmanager
    async def watch(mig: Migration) -> AsyncIterator[TraceWriter]:
        writer = await TraceWriter(path, migration_header(mig, workload), maxsize).open()

        def end() -> Record:
            return End(mig.report.total_ms / 1e3, mig.report.as_dict())

        try:
            mig.listen(EventRecorder(writer))
            yield writer
        finally:
            await writer.close(end)

    return watch
