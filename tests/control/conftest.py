"""A control socket over the doubles rig, driven by qemu.qmp's own client, one round at a time."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from orchestrator.control.commands import Context, Launcher
from orchestrator.control.registry import Migrations
from orchestrator.control.server import ControlServer
from orchestrator.migration.driver import Migration, MigrationOptions, MigrationReport
from tests.driver.conftest import make_rig
from tests.fakes.rig import OPTIONS, Rig

__all__ = ["make_rig"]  # the doubles' rig, closed after each test

ENDED = ("completed", "cancelled", "failed")


class Pace:
    """`obj.method` waits for a go before each call: the migration moves one step per go,
    so what a client does between two rounds lands between them, whatever the timing."""

    def __init__(self, obj: object, method: str) -> None:
        self.calls = 0
        self._go = asyncio.Semaphore(0)
        inner = getattr(obj, method)

        async def paced(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            await self._go.acquire()
            return await inner(*args, **kwargs)

        setattr(obj, method, paced)

    def go(self) -> None:
        self._go.release()


@pytest.fixture
def short_dir() -> Any:
    """A directory with a short path: a socket's must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ctl-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def client_of(path: Path, name: str = "test") -> QMPClient:
    client = QMPClient(name)
    await client.connect(str(path))
    return client


@dataclass
class Served:
    rig: Rig
    migration: Migration
    server: ControlServer
    client: QMPClient
    collects: Pace  # each Collect waits for a go: the policy decides after the client's steering

    def run(self) -> asyncio.Task[MigrationReport]:
        return asyncio.ensure_future(self.migration.run())

    async def drive(self, on_pass: Callable[[int], Awaitable[None]] | None = None) -> list[dict[str, Any]]:
        """Read events until the migration's end: at each round (`MIGRATION_PASS`) call
        `on_pass(n)`; let each collect (and the decision after it) go when its step begins,
        which is after `on_pass` of the round before has returned. Returns every event read."""
        seen: list[dict[str, Any]] = []
        async for ev in self.client.events:
            seen.append(dict(ev))
            if ev["event"] == "MIGRATION_PASS" and on_pass is not None:
                await on_pass(ev["data"]["pass"])
            if ev["event"] == "ORCH_STEP" and ev["data"]["action"] == "Collect":
                self.collects.go()
            if ev["event"] == "MIGRATION" and ev["data"]["status"] in ENDED:
                return seen
        raise AssertionError("the event stream ended before the migration did")


@contextlib.asynccontextmanager
async def served(
    rig: Rig, where: Path, options: MigrationOptions = OPTIONS, launcher: Launcher | None = None
) -> AsyncIterator[Served]:
    mig = rig.migration(options)
    collects = Pace(mig.trackers, "collect")
    migrations = Migrations()
    migrations.add(mig)
    path = where / "c" / "q.sock"
    async with ControlServer(path, Context(migrations, launcher)) as server:
        client = await client_of(path)
        try:
            yield Served(rig, mig, server, client, collects)
        finally:
            await client.disconnect()
