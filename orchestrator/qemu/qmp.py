"""One QMP connection to one QEMU process, with typed errors and a timestamped event log.

The migration driver needs three things from QMP beyond plain commands: to know exactly when
an event arrived (downtime is measured from the source's STOP to the destination's RESUME,
both stamped with the same monotonic clock on receipt), to wait for an event without missing
one that arrived before the wait began (hence a log plus positions, not a queue), and to stop
waiting the moment QEMU goes away instead of running into a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError
from qemu.qmp.protocol import ConnectError, Runstate
from qemu.qmp.qmp_client import GreetingError, NegotiationError

from orchestrator.qemu.errors import (
    MigrationError,
    QmpCommandError,
    QmpConnectError,
    QmpDisconnectedError,
    QmpTimeoutError,
)

#: Events the session records; everything else QEMU emits is ignored.
RECORDED_EVENTS = frozenset({"STOP", "RESUME", "MIGRATION", "MIGRATION_PASS", "SHUTDOWN"})

#: Migration statuses after which the status never changes again without a new command.
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True)
class QmpEvent:
    """An event as recorded by the session."""

    name: str
    data: Mapping[str, Any]
    #: `time.monotonic_ns()` when the event was read from the socket; comparable across
    #: sessions of this process, which is what makes cross-VM downtime measurable.
    received_ns: int
    #: QEMU's own wall-clock stamp in microseconds since the epoch (for log correlation).
    qemu_time_us: int


EventPredicate = Callable[[QmpEvent], bool]


class _Recorder(EventListener):
    """Stamps and hands recorded events to the session instead of queueing them."""

    def __init__(self, session: QmpSession) -> None:
        super().__init__(names=RECORDED_EVENTS)
        self._session = session

    async def put(self, event: Any) -> None:
        if self.accept(event):
            received_ns = time.monotonic_ns()
            stamp = event.get("timestamp", {})
            await self._session._record(
                QmpEvent(
                    name=event["event"],
                    data=dict(event.get("data", {})),
                    received_ns=received_ns,
                    qemu_time_us=stamp.get("seconds", 0) * 1_000_000 + stamp.get("microseconds", 0),
                )
            )


class QmpSession:
    """A negotiated QMP connection. Create with `await QmpSession.connect(path)`."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._client = QMPClient(socket_path.name)
        self._events: list[QmpEvent] = []
        self._changed = asyncio.Condition()
        self._lost = False
        # Registered before connecting, so no event can arrive unrecorded.
        self._client.register_listener(_Recorder(self))
        self._watcher: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, socket_path: str | os.PathLike[str], *, timeout: float = 5.0) -> QmpSession:
        """Connect and negotiate capabilities (the library sends `qmp_capabilities`)."""
        path = Path(socket_path)
        _check_socket_path(path)
        session = cls(path)
        try:
            await asyncio.wait_for(session._client.connect(str(path)), timeout)
        except TimeoutError:
            await session._client.disconnect()
            raise QmpConnectError(
                f"QMP socket {path} sent no QMP greeting within {timeout:g}s: is it a QMP socket?"
            ) from None
        except ConnectError as err:
            raise _connect_error(path, err) from err
        session._watcher = asyncio.create_task(session._watch_connection())
        return session

    def peer_pid(self) -> int:
        """The pid of the process serving this QMP socket (SO_PEERCRED): QEMU's own, taken
        from the kernel rather than from anything the caller says."""
        writer = getattr(self._client, "_writer", None)
        sock = writer.get_extra_info("socket") if writer is not None else None
        if sock is None:
            raise QmpConnectError(f"QMP connection {self.socket_path} exposes no socket to ask for its peer")
        pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if pid <= 0:
            raise QmpConnectError(f"the kernel names no process behind QMP socket {self.socket_path}")
        return pid

    async def close(self) -> None:
        """Disconnect; errors of a connection that already broke are not interesting here."""
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self._client.disconnect()
        if self._watcher is not None:
            await self._watcher  # ends once the connection left RUNNING; wakes waiters

    async def execute(self, command: str, /, **arguments: Any) -> Any:
        """Run a command and return its result. QMP's hyphenated argument names go through
        `**{"command-line": ...}`; names are passed to QEMU unchanged."""
        try:
            return await self._client.execute(command, arguments or None)
        except ExecuteError as err:
            raise QmpCommandError(command, err.error_class, str(err)) from None
        except (QMPError, OSError, EOFError) as err:
            raise QmpDisconnectedError(f"QMP connection {self.socket_path} broke during '{command}': {err}") from err

    async def hmp(self, command_line: str) -> str:
        """Run a human-monitor command (for information QMP has no command for)."""
        return await self.execute("human-monitor-command", **{"command-line": command_line})

    @property
    def events(self) -> tuple[QmpEvent, ...]:
        """Every recorded event so far, oldest first."""
        return tuple(self._events)

    def mark(self) -> int:
        """A position in the event log; pass it as `after=` to wait only for later events."""
        return len(self._events)

    def last_event(self, name: str, *, after: int = 0) -> QmpEvent | None:
        return next((e for e in reversed(self._events[after:]) if e.name == name), None)

    async def wait_event(
        self,
        name: str,
        predicate: EventPredicate | None = None,
        timeout: float = 10.0,
        *,
        after: int = 0,
    ) -> QmpEvent:
        """The first event named `name` at log position >= `after` that satisfies `predicate`,
        waiting for it if it has not arrived yet."""
        if name not in RECORDED_EVENTS:
            raise ValueError(f"event {name} is not recorded; recorded: {sorted(RECORDED_EVENTS)}")

        def find() -> QmpEvent | None:
            return next(
                (e for e in self._events[after:] if e.name == name and (predicate is None or predicate(e))),
                None,
            )

        return await self._wait_for(find, f"event {name}", timeout)

    @property
    def lost(self) -> bool:
        """The connection has closed: nothing sent to this QEMU will arrive."""
        return self._lost

    async def wait_gone(self) -> str:
        """Wait until this QEMU stops being a migration peer: its QMP connection closed (the
        process died or closed the socket) or it shut down. Returns what happened."""
        async with self._changed:
            while True:
                if self._lost:
                    return "closed its QMP connection (has the process died?)"
                shutdown = self.last_event("SHUTDOWN")
                if shutdown is not None:
                    return f"shut down ({shutdown.data.get('reason', 'no reason given')})"
                await self._changed.wait()

    async def query_migrate(self) -> dict[str, Any]:
        return await self.execute("query-migrate")

    async def wait_migration_status(
        self, statuses: Collection[str], timeout: float = 30.0, *, poll_interval: float = 0.05
    ) -> dict[str, Any]:
        """Wait until `query-migrate` reports one of `statuses`; return that reply.

        Polls, and also wakes on every MIGRATION event, so it works whether or not the
        `events` capability is on. Reaching a terminal status that was not asked for raises
        `MigrationError` at once, carrying QEMU's `error-desc`.
        """
        wanted = frozenset(statuses)
        deadline = time.monotonic() + timeout
        while True:
            # Marked before querying, so a status change racing the query still wakes us.
            mark = self.mark()
            info = await self.query_migrate()
            status = info.get("status", "none")
            if status in wanted:
                return info
            if status in TERMINAL_STATUSES:
                desc = info.get("error-desc")
                raise MigrationError(
                    f"migration on {self.socket_path} is '{status}' while waiting for "
                    f"{sorted(wanted)}" + (f": {desc}" if desc else "")
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QmpTimeoutError(
                    f"migration on {self.socket_path} still '{status}' after {timeout:g}s; waited for {sorted(wanted)}"
                )
            with contextlib.suppress(QmpTimeoutError):
                await self.wait_event("MIGRATION", None, min(poll_interval, remaining), after=mark)

    async def _wait_for(self, find: Callable[[], QmpEvent | None], what: str, timeout: float) -> QmpEvent:
        async def until_found() -> QmpEvent:
            async with self._changed:
                while True:
                    found = find()
                    if found is not None:
                        return found
                    if self._lost:
                        raise QmpDisconnectedError(f"QMP connection {self.socket_path} closed while waiting for {what}")
                    await self._changed.wait()

        try:
            return await asyncio.wait_for(until_found(), timeout)
        except TimeoutError:
            raise QmpTimeoutError(f"no {what} from {self.socket_path} within {timeout:g}s") from None

    async def _record(self, event: QmpEvent) -> None:
        async with self._changed:
            self._events.append(event)
            self._changed.notify_all()

    async def _watch_connection(self) -> None:
        while self._client.runstate == Runstate.RUNNING:
            await self._client.runstate_changed()
        async with self._changed:
            self._lost = True
            self._changed.notify_all()


def _check_socket_path(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise QmpConnectError(f"QMP socket {path} does not exist") from None
    if not stat.S_ISSOCK(mode):
        raise QmpConnectError(f"QMP socket {path} is not a unix socket")


def _connect_error(path: Path, err: ConnectError) -> QmpConnectError:
    cause = err.exc
    if isinstance(cause, ConnectionRefusedError):
        return QmpConnectError(f"QMP socket {path} refused the connection: nothing is listening (has QEMU exited?)")
    if isinstance(cause, (GreetingError, NegotiationError, EOFError)):
        return QmpConnectError(f"QMP socket {path} does not speak QMP: {err}")
    return QmpConnectError(f"cannot connect to QMP socket {path}: {err}")
