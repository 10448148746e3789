"""`migrate --control SOCK`: the control socket as a `Watch` of the one migration a command
runs, served from before `run()` until it has ended (its last events sent), then removed."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from orchestrator.control.commands import Context
from orchestrator.control.registry import Migrations
from orchestrator.control.server import ControlServer
from orchestrator.migration.driver import Migration, Watch


def control_watch(path: Path) -> Watch:
    @contextlib.asynccontextmanager
    async def watch(migration: Migration) -> AsyncIterator[ControlServer]:
        migrations = Migrations()
        migrations.add(migration)
        async with ControlServer(path, Context(migrations)) as server:
            yield server

    return watch
