"""The QMP steps of the switchover choreography, one small function per step.

QEMU moves only vCPU and device-model state: `x-ignore-shared` makes it skip the shared-file
RAM the orchestrator copies itself, and `pause-before-switchover` makes the source stop its
vCPUs and wait in status `pre-switchover` until told to continue, which is the window for the
final RAM copy. The driver (`driver.Migration`) calls these in order; any failure before
`continue_` is answered with `cancel`, which leaves the guest on the source, running again if
it ran before.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.qemu.errors import MigrationError, QemuError
from orchestrator.qemu.peer import QmpPeer
from orchestrator.qemu.qmp import QmpEvent

#: Capabilities set on both sides. x-ignore-shared must match on source and destination;
#: events gives MIGRATION / MIGRATION_PASS; pause-before-switchover only matters on the source.
CAPABILITIES = ("x-ignore-shared", "pause-before-switchover", "events")


@dataclass(frozen=True)
class Switchover:
    """What a completed migration looked like from the outside."""

    source_stop: QmpEvent | None
    #: None when the guest was paused before the migration: the destination keeps it paused.
    destination_resume: QmpEvent | None
    #: The source's final `query-migrate` reply (status "completed", ram counters, ...).
    source_info: dict[str, Any]
    #: The source's run state afterwards; "postmigrate" on QEMU 7.2.
    source_runstate: str

    @property
    def downtime_ns(self) -> int | None:
        """None for a paused guest: it had no running time to lose."""
        if self.destination_resume is None or self.source_stop is None:
            return None
        return downtime_ns(self.source_stop, self.destination_resume)


def downtime_ns(source_stop: QmpEvent, destination_resume: QmpEvent) -> int:
    """Guest downtime: source STOP to destination RESUME, both stamped on receipt."""
    if destination_resume.received_ns < source_stop.received_ns:
        raise MigrationError("destination RESUME was received before source STOP: not one migration")
    return destination_resume.received_ns - source_stop.received_ns


@dataclass(frozen=True)
class SavedCapabilities:
    """The states the choreography's capabilities had on one QEMU before `prepare` set them,
    so an abandoned migration leaves that QEMU configured as it found it."""

    session: QmpPeer
    states: Mapping[str, bool]

    async def restore(self) -> None:
        await _set_capabilities(self.session, self.states)


async def prepare(src: QmpPeer, dst: QmpPeer) -> tuple[SavedCapabilities, SavedCapabilities]:
    """Set the capabilities on both sides; returns what they were, source first. The
    destination is not made to listen yet (`listen`, at switchover): a destination that
    never received a stream stays usable for another attempt. All or nothing: when the
    destination cannot be set up, the source is set back before the error is raised."""
    saved = await _enable_capabilities(src)
    try:
        return saved, await _enable_capabilities(dst)
    except BaseException:
        with contextlib.suppress(QemuError):
            await asyncio.shield(saved.restore())
        raise


async def listen(dst: QmpPeer, dst_uri: str) -> None:
    """Make the destination accept QEMU's state stream on `dst_uri`."""
    await dst.execute("migrate-incoming", uri=dst_uri)


async def start(src: QmpPeer, uri: str) -> int:
    """Start QEMU's migration; returns the event-log position from before it, for
    `wait_pre_switchover(after=...)`."""
    mark = src.mark()
    await src.execute("migrate", uri=uri)
    return mark


async def wait_pre_switchover(src: QmpPeer, timeout: float = 60.0, *, after: int = 0) -> QmpEvent:
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


async def continue_(src: QmpPeer) -> None:
    """Let the source send device state and hand the guest to the destination."""
    await src.execute("migrate-continue", state="pre-switchover")


async def wait_completed(
    src: QmpPeer, dst: QmpPeer, timeout: float = 60.0, *, resumes: bool = True, after: int = 0
) -> Switchover:
    """Wait until the source reports completed and the destination runs (RESUME received at
    log position >= `after`). A guest its user had paused (`resumes=False`) stays paused on
    the destination: then the destination's own status `completed` is waited for."""
    info = await src.wait_migration_status({"completed"}, timeout)
    resume: QmpEvent | None
    stop: QmpEvent | None
    if resumes:
        resume = await dst.wait_event("RESUME", timeout=timeout, after=after)
        stop = src.last_event("STOP")
        if stop is None:
            raise MigrationError(f"source {src.socket_path} completed without a STOP event")
    else:
        await dst.wait_event("MIGRATION", lambda e: e.data.get("status") == "completed", timeout, after=after)
        resume = stop = None
    dst_status = await dst.execute("query-status")
    if dst_status["running"] is not resumes:
        raise MigrationError(
            f"destination {dst.socket_path} is '{dst_status['status']}' after the migration of a "
            f"{'running' if resumes else 'paused'} guest"
        )
    return Switchover(stop, resume, info, await _settled_runstate(src, timeout))


async def _settled_runstate(src: QmpPeer, timeout: float) -> str:
    """The source's run state once its migration has finished: QEMU reports `completed` a
    moment before it leaves finish-migrate (for postmigrate, or paused on QEMU >= 10)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        status = str((await src.execute("query-status"))["status"])
        if status != "finish-migrate" or asyncio.get_running_loop().time() > deadline:
            return status
        await asyncio.sleep(0.005)


async def cancel(src: QmpPeer, timeout: float = 30.0, *, resume: bool = True) -> str:
    """Abandon the migration; with `resume` make sure the source guest runs (pass False for
    a source its user had paused: it stays paused). Returns the final status.

    Safe in every phase before `continue_`, including pre-switchover (vCPUs stopped) and when
    no migration is running. Raises `MigrationError` if the migration already completed: the
    destination owns the guest then and resuming the source would run it twice.
    """
    status = (await src.query_migrate()).get("status", "none")
    if status == "completed":
        raise MigrationError(
            f"cannot cancel on {src.socket_path}: the migration completed and the destination owns the guest"
        )
    if status not in ("none", "failed", "cancelled"):
        await src.execute("migrate_cancel")
        status = (await src.wait_migration_status({"cancelled", "failed"}, timeout))["status"]
    if resume and not (await src.execute("query-status"))["running"]:
        await src.execute("cont")
    return status


async def check_waiting(dst: QmpPeer) -> None:
    """Raise `MigrationError` unless the destination waits for a migration with no listener
    yet: one started with `-incoming URI` (or given `migrate-incoming` already) listens on
    its own terms, and its stream cannot be redirected."""
    info = await dst.query_migrate()
    if info.get("socket-address") or info.get("status", "none") != "none":
        where = ", ".join(_address(a) for a in info.get("socket-address", [])) or info.get("status")
        raise MigrationError(
            f"destination {dst.socket_path} already listens for a migration ({where}): start it with "
            "'-incoming defer' and let the orchestrator choose the stream"
        )


def _address(addr: Mapping[str, Any]) -> str:
    if addr.get("type") == "unix":
        return f"unix:{addr.get('path')}"
    return f"{addr.get('type')}:{addr.get('host')}:{addr.get('port')}"


async def check_capabilities(session: QmpPeer) -> dict[str, bool]:
    """Raise `MigrationError` naming what is missing unless this QEMU offers every
    capability the choreography needs; changes nothing. Returns their current states."""
    states = {c["capability"]: c["state"] for c in await session.execute("query-migrate-capabilities")}
    missing = [name for name in CAPABILITIES if name not in states]
    if missing:
        raise MigrationError(
            f"QEMU at {session.socket_path} lacks migration capabilities {missing}; "
            f"the orchestrator needs {list(CAPABILITIES)}"
        )
    return {name: states[name] for name in CAPABILITIES}


async def _enable_capabilities(session: QmpPeer) -> SavedCapabilities:
    saved = SavedCapabilities(session, await check_capabilities(session))
    await _set_capabilities(session, dict.fromkeys(CAPABILITIES, True))
    return saved


async def _set_capabilities(session: QmpPeer, states: Mapping[str, bool]) -> None:
    await session.execute(
        "migrate-set-capabilities",
        capabilities=[{"capability": name, "state": state} for name, state in states.items()],
    )
