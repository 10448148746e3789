"""A double of QEMU 7.2 as the orchestrator sees it over QMP (`QmpPeer`), faithful to what the
real-QEMU tests record (`tests/qemu/recorded.py`, checked by `tests/driver/test_double.py`).

Modelled: run states; outgoing and incoming migration statuses and their MIGRATION events
(only with the `events` capability, like QEMU), STOP before pre-switchover only for a guest
that ran, RESUME on the destination only for a guest that ran; the capabilities and their
refusal during a migration; `migrate-incoming` once; `migrate_cancel` (the source resumes
only if it ran at STOP, the destination exits on the broken stream); a destination that
exits when the source dies mid-stream, a source whose stream fails when the destination
died; `cont`/`stop`/`query-status`; the RAM layout commands attach reads. Every command and
event is a step a `Fault` can name. QEMU's own work (the migration thread, the incoming
load) runs in tasks that yield to the event loop between steps, as the real processes run
beside the orchestrator.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable, Collection, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.qemu.choreography import CAPABILITIES
from orchestrator.qemu.errors import (
    MigrationError,
    QmpCommandError,
    QmpDisconnectedError,
    QmpTimeoutError,
)
from orchestrator.qemu.qmp import TERMINAL_STATUSES, EventPredicate, QmpEvent

from .faults import Act, Fault, Faults

#: Outgoing statuses during which QEMU refuses capabilities and a second `migrate`.
RUNNING_STATUSES = frozenset({"setup", "active", "pre-switchover", "device", "cancelling"})
#: Commands that only read: left out of `changes`, the journal of what altered a QEMU.
QUERIES = frozenset(
    {
        "query-status",
        "query-migrate",
        "query-migrate-capabilities",
        "query-memdev",
        "qom-list",
        "qom-get",
        "human-monitor-command",
    }
)
BACKEND = "ram0"


class RunState(enum.StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    INMIGRATE = "inmigrate"
    FINISH_MIGRATE = "finish-migrate"
    POSTMIGRATE = "postmigrate"
    SHUTDOWN = "shutdown"


class _Ended(Exception):
    """This QEMU's work stopped at a step: the process died there, or its migration failed."""


async def turn() -> None:
    """Let every other task run once: the other QEMU, the orchestrator, its threads' results."""
    await asyncio.sleep(0)


@dataclass
class FakeHost:
    """The machine the fake QEMUs run on: migration sockets by URI, the journal of every step
    done to them (and to the other doubles) in order, and a hook a test can act on at a step."""

    journal: list[str] = field(default_factory=list)
    listeners: dict[str, FakeQemu] = field(default_factory=dict)
    on_step: Callable[[str], None] | None = None

    def step(self, entry: str) -> None:
        self.journal.append(entry)
        if self.on_step is not None:
            self.on_step(entry)


def changes(journal: list[str]) -> list[str]:
    """The journal without read-only QMP commands (their number follows the timing)."""
    return [e for e in journal if e.split(": ", 1)[-1] not in QUERIES]


class FakeQemu:
    def __init__(
        self,
        host: FakeHost,
        name: str,
        runstate: RunState,
        ram: Path | None = None,  # the RAM file behind backend ram0, for attach's layout commands
        *,
        capabilities: Collection[str] = (*CAPABILITIES, "postcopy-ram"),
        faults: Collection[Fault] = (),
        incoming: str | None = None,
    ) -> None:
        self.host, self.name, self.runstate, self.ram = host, name, runstate, ram
        self.socket_path = Path(f"/fake/{name}/qmp.sock")
        self.capabilities = dict.fromkeys(capabilities, False)
        self.faults = Faults(list(faults))
        self.events: list[QmpEvent] = []
        self.outgoing = "none"
        self.incoming = "none"
        self.error_desc: str | None = None
        self.listening: str | None = None
        self.peer: FakeQemu | None = None  # the other end of QEMU's stream, once connected
        self.vm_was_running = False
        self._lost = False
        self._changed = asyncio.Event()
        self._continue = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        if incoming is not None:  # started with -incoming URI: it listened before we connected
            self.listening, self.incoming, host.listeners[incoming] = incoming, "setup", self

    # -- QmpPeer -------------------------------------------------------------------------------
    async def execute(self, command: str, /, **arguments: Any) -> Any:
        self._check_connected(command)
        self.host.step(f"{self.name}: {command}")
        fault = self.faults.take(command)
        if fault is not None and fault.act is not Act.DIE_AFTER:
            if fault.act is Act.FAIL:
                raise QmpCommandError(command, "GenericError", f"injected failure of {command}")
            await self._end(fault.act)
            self._check_connected(command)
        await turn()  # the round trip: the other QEMU and the orchestrator's tasks go on
        self._check_connected(command)
        handler = getattr(self, "_" + command.replace("-", "_"))
        try:
            reply = handler(**{name.replace("-", "_"): value for name, value in arguments.items()})
        except _Ended:  # the command's own event ended this QEMU's work there
            self._check_connected(command)
            raise QmpCommandError(command, "GenericError", f"injected failure during {command}") from None
        if fault is not None:  # DIE_AFTER: the reply arrived, then the process died
            self._die()
        return reply

    async def hmp(self, command_line: str) -> str:
        return await self.execute("human-monitor-command", **{"command-line": command_line})

    async def query_migrate(self) -> dict[str, Any]:
        return await self.execute("query-migrate")

    def mark(self) -> int:
        return len(self.events)

    def last_event(self, name: str, *, after: int = 0) -> QmpEvent | None:
        return next((e for e in reversed(self.events[after:]) if e.name == name), None)

    async def wait_event(
        self, name: str, predicate: EventPredicate | None = None, timeout: float = 10.0, *, after: int = 0
    ) -> QmpEvent:
        async with self._deadline(f"event {name}", timeout):
            while True:
                found = next(
                    (e for e in self.events[after:] if e.name == name and (predicate is None or predicate(e))), None
                )
                if found is not None:
                    return found
                if self._lost:
                    raise QmpDisconnectedError(
                        f"QMP connection {self.socket_path} closed while waiting for event {name}"
                    )
                await self._changed.wait()

    async def wait_migration_status(self, statuses: Collection[str], timeout: float = 30.0) -> dict[str, Any]:
        wanted = frozenset(statuses)
        async with self._deadline(f"migration status {sorted(wanted)}", timeout):
            while True:
                changed = self._changed  # taken before asking: a change racing the reply still wakes us
                info = await self.query_migrate()
                status = info.get("status", "none")
                if status in wanted:
                    return info
                if status in TERMINAL_STATUSES:
                    raise MigrationError(
                        f"migration on {self.socket_path} is '{status}' while waiting for {sorted(wanted)}"
                    )
                await changed.wait()

    @property
    def lost(self) -> bool:
        return self._lost

    async def wait_gone(self) -> str:
        while True:
            if self._lost:
                return "closed its QMP connection (has the process died?)"
            shutdown = self.last_event("SHUTDOWN")
            if shutdown is not None:
                return f"shut down ({shutdown.data['reason']})"
            await self._changed.wait()

    # -- what a test looks at --------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """The guest's vCPUs run here."""
        return not self._lost and self.runstate is RunState.RUNNING

    def names(self) -> list[str]:
        return [e.name for e in self.events]

    def statuses(self) -> list[str]:
        return [e.data["status"] for e in self.events if e.name == "MIGRATION"]

    async def close(self) -> None:
        """End QEMU's own work still waiting (a migration left in pre-switchover)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- commands ------------------------------------------------------------------------------
    def _query_status(self) -> dict[str, Any]:
        return {"status": self.runstate.value, "singlestep": False, "running": self.runstate is RunState.RUNNING}

    def _query_migrate(self) -> dict[str, Any]:
        info: dict[str, Any] = {}
        if self.outgoing != "none":
            info["status"] = self.outgoing
            if self.error_desc is not None:
                info["error-desc"] = self.error_desc
        if self.listening is not None and self.incoming in ("setup", "active"):
            info["socket-address"] = [{"type": "unix", "path": self.listening.removeprefix("unix:")}]
        if self.incoming not in ("none", "setup"):  # QEMU 7.2 shows no status while listening
            info["status"] = self.incoming
        return info

    def _query_migrate_capabilities(self) -> list[dict[str, Any]]:
        return [{"capability": name, "state": state} for name, state in self.capabilities.items()]

    def _migrate_set_capabilities(self, capabilities: list[dict[str, Any]]) -> dict:
        if self.outgoing in RUNNING_STATUSES:
            raise QmpCommandError("migrate-set-capabilities", "GenericError", "There's a migration process in progress")
        for cap in capabilities:
            if cap["capability"] not in self.capabilities:
                raise QmpCommandError(
                    "migrate-set-capabilities",
                    "GenericError",
                    f"Parameter 'capability' does not accept value '{cap['capability']}'",
                )
        self.capabilities.update({cap["capability"]: cap["state"] for cap in capabilities})
        return {}

    def _migrate_incoming(self, uri: str) -> dict:
        if self.runstate is not RunState.INMIGRATE:
            raise QmpCommandError(
                "migrate-incoming", "GenericError", "'-incoming' was not specified on the command line"
            )
        if self.incoming != "none" or self.listening is not None:
            raise QmpCommandError("migrate-incoming", "GenericError", "The incoming migration has already been started")
        self._listen(uri)
        return {}

    def _migrate(self, uri: str) -> dict:
        if self.runstate is RunState.INMIGRATE:
            raise QmpCommandError("migrate", "GenericError", "Guest is waiting for an incoming migration")
        if self.outgoing in RUNNING_STATUSES:
            raise QmpCommandError("migrate", "GenericError", "There's a migration process in progress")
        self.error_desc = None
        self._continue.clear()
        self._spawn(self._outgoing(uri))
        return {}

    def _migrate_continue(self, state: str) -> dict:
        if self.outgoing != state:
            raise QmpCommandError(
                "migrate-continue", "GenericError", f"Migration not in expected state: {self.outgoing}"
            )
        self._continue.set()
        return {}

    def _migrate_cancel(self) -> dict:
        if self.outgoing in ("setup", "active", "pre-switchover", "device"):
            self._cancel_work()
            self._set_outgoing("cancelling")
            self._spawn(self._cancelled())
        return {}

    def _cont(self) -> dict:
        if self.runstate is RunState.INMIGRATE:
            return {}  # QEMU only notes that the incoming guest is to run
        if self.runstate is RunState.SHUTDOWN:
            raise QmpCommandError("cont", "GenericError", "Resetting the Virtual Machine is required")
        if self.outgoing in RUNNING_STATUSES:
            raise QmpCommandError("cont", "GenericError", "Migration is not finalized yet")
        if self.runstate is not RunState.RUNNING:
            self.runstate = RunState.RUNNING
            self._emit("RESUME")
        return {}

    def _stop(self) -> dict:
        if self.runstate is RunState.RUNNING:
            self.runstate = RunState.PAUSED
            self._emit("STOP")
        return {}

    def _qom_list(self, path: str) -> list[dict[str, str]]:
        return [{"name": BACKEND, "type": "child<memory-backend-file>"}] if path == "/objects" else []

    def _ram(self) -> Path:
        if self.ram is None:
            raise QmpCommandError("query-memdev", "GenericError", "this double was given no RAM file")
        return self.ram

    def _query_memdev(self) -> list[dict[str, Any]]:
        return [
            {
                "id": BACKEND,
                "size": self._ram().stat().st_size,
                "share": True,
                "merge": True,
                "dump": True,
                "prealloc": False,
            }
        ]

    def _qom_get(self, path: str, property: str) -> str:
        if (path, property) != (f"/objects/{BACKEND}", "mem-path"):
            raise QmpCommandError("qom-get", "DeviceNotFound", f"Device '{path}' not found")
        return str(self._ram())

    def _human_monitor_command(self, command_line: str) -> str:
        if command_line != "info mtree -f":
            raise QmpCommandError("human-monitor-command", "GenericError", f"unknown command: '{command_line}'")
        last = self._ram().stat().st_size - 1
        return (
            'FlatView #0\n AS "memory", root: system\n AS "cpu-memory-0", root: system\n'
            f" Root memory region: system\n  0000000000000000-{last:016x} (prio 0, ram): {BACKEND}\n"
        )

    # -- QEMU's own work -------------------------------------------------------------------------
    async def _outgoing(self, uri: str) -> None:
        """The migration thread: connect, send (nothing: x-ignore-shared), stop the guest, wait
        in pre-switchover, send device state, complete; the destination loads and runs."""
        self._set_outgoing("setup")
        await turn()
        dst = self.host.listeners.get(uri)
        if dst is None or dst.lost:
            self._fail(f"Failed to connect to '{uri}': No such file or directory")
            return
        self.peer, dst.peer = dst, self
        dst._set_incoming("active")
        self._set_outgoing("active")
        await turn()
        self.vm_was_running = self.runstate is RunState.RUNNING
        self.runstate = RunState.FINISH_MIGRATE
        if self.vm_was_running:
            self._emit("STOP")
        if self.capabilities["pause-before-switchover"]:
            self._set_outgoing("pre-switchover")
            await self._continue.wait()
        if dst.lost:  # the device state has nowhere to go
            self._fail("Unable to write to socket: Broken pipe")
            return
        self._set_outgoing("device")
        await turn()
        self._set_outgoing("completed")
        self.runstate = RunState.POSTMIGRATE
        dst._spawn(dst._load(self.vm_was_running))

    async def _load(self, guest_ran: bool) -> None:
        """The destination's end of the stream: the guest runs here only if it ran there."""
        await turn()
        if guest_ran:
            self.runstate = RunState.RUNNING
            self._emit("RESUME")
        else:
            self.runstate = RunState.PAUSED
        self._set_incoming("completed")

    async def _cancelled(self) -> None:
        await turn()
        if self.peer is not None:
            self.peer._spawn(self.peer._peer_gone())
        self._back_from_finish_migrate()
        self._set_outgoing("cancelled")

    def _fail(self, desc: str) -> None:
        self.error_desc = desc
        if self.peer is not None:  # the stream closes
            self.peer._spawn(self.peer._peer_gone())
        self._back_from_finish_migrate()
        self._set_outgoing("failed")

    def _back_from_finish_migrate(self) -> None:
        """QEMU after a failed or cancelled migration: the guest runs again only if it ran."""
        if self.runstate is RunState.FINISH_MIGRATE:
            self.runstate = RunState.RUNNING if self.vm_was_running else RunState.POSTMIGRATE
            if self.vm_was_running:
                self._emit("RESUME")

    async def _peer_gone(self) -> None:
        """The other end of the stream went away: QEMU 7.2's destination gives up by exiting,
        a source still sending fails (one waiting in pre-switchover notices at continue)."""
        if self._lost:
            return
        if self.incoming == "active":
            await self._exit_failed()
        elif self.outgoing in ("setup", "active"):
            self._cancel_work()
            self._fail("Unable to write to socket: Connection reset by peer")

    async def _exit_failed(self) -> None:
        self._set_incoming("failed")
        await turn()
        self._die()

    # -- steps, events, ends ---------------------------------------------------------------------
    def _listen(self, uri: str) -> None:
        self.listening = uri
        self.host.listeners[uri] = self
        self._set_incoming("setup")

    def _set_outgoing(self, status: str) -> None:
        self.outgoing = status
        self._migration_event(status)

    def _set_incoming(self, status: str) -> None:
        self.incoming = status
        self._migration_event(status)

    def _migration_event(self, status: str) -> None:
        self._emit("MIGRATION", sent=bool(self.capabilities.get("events")), status=status)

    def _emit(self, name: str, *, sent: bool = True, **data: Any) -> None:
        """Take the step and send its event (MIGRATION only with the `events` capability),
        unless a fault ends this QEMU's work there: FAIL fails its migration at the step (a
        destination's load failing makes it exit), the others end the process."""
        step = f"{name}:{data['status']}" if name == "MIGRATION" else name
        self.host.step(f"{self.name} {step}")
        fault = self.faults.take(step)
        if fault is not None and fault.act is not Act.DIE_AFTER:
            if fault.act is not Act.FAIL:
                self._end_now(fault.act)
            elif self.incoming != "none":
                self._spawn(self._exit_failed())
            else:
                self._fail(f"injected failure at {step}")
            raise _Ended
        if sent:
            self._record(name, data)
        self._notify()
        if fault is not None:
            self._die()
            raise _Ended

    def _record(self, name: str, data: dict[str, Any]) -> None:
        self.events.append(QmpEvent(name, data, time.monotonic_ns(), time.time_ns() // 1000))

    async def _end(self, act: Act) -> None:
        if act is Act.SHUTDOWN:
            self._shut_down()
            await turn()  # SHUTDOWN reaches the orchestrator before the socket closes
        self._die()

    def _end_now(self, act: Act) -> None:
        if act is Act.SHUTDOWN:
            self._shut_down()
            self._spawn(self._end(Act.DIE))
        else:
            self._die()

    def _shut_down(self) -> None:
        self.runstate = RunState.SHUTDOWN
        self._record("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        self._notify()

    def _die(self) -> None:
        if self._lost:
            return
        self._lost = True
        self.host.step(f"{self.name} died")
        self._cancel_work()
        if self.listening is not None and self.host.listeners.get(self.listening) is self:
            del self.host.listeners[self.listening]
        if self.peer is not None and not self.peer.lost:
            self.peer._spawn(self.peer._peer_gone())
        self._notify()

    def _cancel_work(self) -> None:
        """Stop QEMU's own work (not the task calling this: it finishes its step)."""
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None and not isinstance(exc, _Ended):
            raise exc  # a bug of the double: the loop's handler reports it

    def _check_connected(self, command: str) -> None:
        if self._lost:
            raise QmpDisconnectedError(f"QMP connection {self.socket_path} broke during '{command}': EOF")

    @asynccontextmanager
    async def _deadline(self, what: str, timeout: float):
        try:
            async with asyncio.timeout(timeout):
                yield
        except TimeoutError:
            raise QmpTimeoutError(f"no {what} from {self.socket_path} within {timeout:g}s") from None
