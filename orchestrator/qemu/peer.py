"""What the migration driver, the switchover steps and attach's validation need from one QEMU.

`QmpSession` is the real implementation. The protocol is kept to exactly the members those
callers use, so a double that models QEMU's side (tests) can stand in for it and the whole
choreography, every abort path included, can be exercised without starting a QEMU.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any, Protocol

from orchestrator.qemu.qmp import EventPredicate, QmpEvent


class QmpPeer(Protocol):
    #: Named in every error message, so a log line says which QEMU it was about.
    socket_path: Path

    async def execute(self, command: str, /, **arguments: Any) -> Any:
        """Run a QMP command; raises `QmpCommandError` (QEMU refused) or
        `QmpDisconnectedError` (the connection broke)."""

    async def hmp(self, command_line: str) -> str:
        """A human-monitor command (`info mtree -f`: the RAM layout has no QMP command)."""

    async def query_migrate(self) -> dict[str, Any]: ...

    def mark(self) -> int:
        """A position in the event log, for `after=`."""

    def last_event(self, name: str, *, after: int = 0) -> QmpEvent | None: ...

    async def wait_event(
        self, name: str, predicate: EventPredicate | None = None, timeout: float = 10.0, *, after: int = 0
    ) -> QmpEvent:
        """The first matching event at log position >= `after`, also one that came before
        the call; raises `QmpTimeoutError`, or `QmpDisconnectedError` once the QEMU is gone."""

    async def wait_migration_status(self, statuses: Collection[str], timeout: float = 30.0) -> dict[str, Any]:
        """The `query-migrate` reply once its status is one of `statuses`; raises
        `MigrationError` at a terminal status not asked for."""

    @property
    def lost(self) -> bool:
        """The connection has closed: nothing sent to this QEMU will arrive."""

    async def wait_gone(self) -> str:
        """Returns, saying how, once this QEMU closed its connection or shut down."""
