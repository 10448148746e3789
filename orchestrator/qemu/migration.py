"""The QMP steps of the switchover choreography, one small function per step.

QEMU moves only vCPU and device-model state: `x-ignore-shared` makes it skip the shared-file
RAM the orchestrator copies itself, and `pause-before-switchover` makes the source stop its
vCPUs and wait in status `pre-switchover` until told to continue, which is the window for the
final RAM copy. The engine calls these in order; any failure before `continue_` is answered
with `cancel`, which leaves the source running.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import MigrationError
from .qmp import QmpEvent, QmpSession

#: Capabilities set on both sides. x-ignore-shared must match on source and destination;
#: events gives MIGRATION / MIGRATION_PASS; pause-before-switchover only matters on the source.
CAPABILITIES = ("x-ignore-shared", "pause-before-switchover", "events")


@dataclass(frozen=True)
class Switchover:
    """What a completed migration looked like from the outside."""

    source_stop: QmpEvent
    destination_resume: QmpEvent
    #: The source's final `query-migrate` reply (status "completed", ram counters, ...).
    source_info: dict[str, Any]
    #: The source's run state afterwards; "postmigrate" on QEMU 7.2.
    source_runstate: str

    @property
    def downtime_ns(self) -> int:
        return downtime_ns(self.source_stop, self.destination_resume)


def downtime_ns(source_stop: QmpEvent, destination_resume: QmpEvent) -> int:
    """Guest downtime: source STOP to destination RESUME, both stamped on receipt."""
    if destination_resume.received_ns < source_stop.received_ns:
        raise MigrationError("destination RESUME was received before source STOP: not one migration")
    return destination_resume.received_ns - source_stop.received_ns


async def prepare(src: QmpSession, dst: QmpSession, dst_uri: str) -> None:
    """Set the capabilities on both sides, then make the destination listen on `dst_uri`."""
    for session in (src, dst):
        await _enable_capabilities(session)
    await dst.execute("migrate-incoming", uri=dst_uri)


async def start(src: QmpSession, uri: str) -> int:
    """Start QEMU's migration; returns the event-log position from before it, for
    `wait_pre_switchover(after=...)`."""
    mark = src.mark()
    await src.execute("migrate", uri=uri)
    return mark


async def wait_pre_switchover(src: QmpSession, timeout: float = 60.0, *, after: int = 0) -> QmpEvent:
    """Wait until the source pauses before switchover, with its vCPUs stopped.

    Both facts come from the event stream, which QEMU writes in order (STOP, then MIGRATION
    pre-switchover): no QMP round trip inside the downtime. Only when no STOP was recorded is
    the run state asked for, since the final RAM copy is only correct if nothing in the
    guest can write memory any more."""
    ended = {"pre-switchover", "failed", "cancelled"}
    event = await src.wait_event("MIGRATION", lambda e: e.data.get("status") in ended, timeout, after=after)
    if event.data["status"] != "pre-switchover":
        info = await src.query_migrate()
        raise MigrationError(
            f"source {src.socket_path} migration {event.data['status']} before switchover: "
            f"{info.get('error-desc', 'no reason given')}"
        )
    if src.last_event("STOP", after=after) is None:
        status = await src.execute("query-status")
        if status["running"]:
            raise MigrationError(
                f"source {src.socket_path} is in pre-switchover but its vCPUs are running "
                f"(run state '{status['status']}')"
            )
    return event


async def continue_(src: QmpSession) -> None:
    """Let the source send device state and hand the guest to the destination."""
    await src.execute("migrate-continue", state="pre-switchover")


async def wait_completed(src: QmpSession, dst: QmpSession, timeout: float = 60.0) -> Switchover:
    """Wait until the source reports completed and the destination runs (RESUME received)."""
    info = await src.wait_migration_status({"completed"}, timeout)
    resume = await dst.wait_event("RESUME", timeout=timeout)
    dst_status = await dst.execute("query-status")
    if not dst_status["running"]:
        raise MigrationError(
            f"destination {dst.socket_path} sent RESUME but is '{dst_status['status']}'"
        )
    stop = src.last_event("STOP")
    if stop is None:
        raise MigrationError(f"source {src.socket_path} completed without a STOP event")
    src_status = await src.execute("query-status")
    return Switchover(stop, resume, info, src_status["status"])


async def cancel(src: QmpSession, timeout: float = 30.0) -> str:
    """Abandon the migration and make sure the source guest runs; return the final status.

    Safe in every phase before `continue_`, including pre-switchover (vCPUs stopped) and when
    no migration is running. Raises `MigrationError` if the migration already completed: the
    destination owns the guest then and resuming the source would run it twice.
    """
    status = (await src.query_migrate()).get("status", "none")
    if status == "completed":
        raise MigrationError(
            f"cannot cancel on {src.socket_path}: the migration completed and the destination "
            "owns the guest"
        )
    if status not in ("none", "failed", "cancelled"):
        await src.execute("migrate_cancel")
        status = (await src.wait_migration_status({"cancelled", "failed"}, timeout))["status"]
    if not (await src.execute("query-status"))["running"]:
        await src.execute("cont")
    return status


async def check_capabilities(session: QmpSession) -> None:
    """Raise `MigrationError` naming what is missing unless this QEMU offers every
    capability the choreography needs; changes nothing."""
    available = {c["capability"] for c in await session.execute("query-migrate-capabilities")}
    missing = [name for name in CAPABILITIES if name not in available]
    if missing:
        raise MigrationError(
            f"QEMU at {session.socket_path} lacks migration capabilities {missing}; "
            f"the orchestrator needs {list(CAPABILITIES)}"
        )


async def _enable_capabilities(session: QmpSession) -> None:
    await check_capabilities(session)
    await session.execute(
        "migrate-set-capabilities",
        capabilities=[{"capability": name, "state": True} for name in CAPABILITIES],
    )
