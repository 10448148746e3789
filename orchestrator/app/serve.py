"""`python -m orchestrator serve --control SOCK`: a long-running control socket that starts
migrations (`x-orch-migrate`) and steers them all, until SIGTERM or SIGINT.

Each migration goes the `migrate` command's own way: its arguments become that command's
options (parsed by its parser, checked by its checks), and `cli.attached` connects, attaches
and opens the trackers. The command answers once attach has checked everything (bad input is
its error, nothing changed); the migration then runs on its own. A signal cancels every
running migration as `migrate` would take it (before `migrate-continue` the source keeps the
guest; after it the switchover is finished), waits for each to end, and removes the socket.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from orchestrator.app import cli
from orchestrator.app.checks import InputError
from orchestrator.app.metrics import Metrics, serving
from orchestrator.app.signals import settle
from orchestrator.control.commands import Context
from orchestrator.control.errors import CommandError
from orchestrator.control.registry import Migrations
from orchestrator.control.server import ControlServer
from orchestrator.migration.driver import Migration, MigrationOptions, run_watched
from orchestrator.transport.endpoint import Endpoint


class _Refusing(argparse.ArgumentParser):
    """A parser whose errors are a command's answer, not the process's exit."""

    def error(self, message: str) -> NoReturn:
        raise InputError(message)


#: `migrate` options that belong to the whole of `serve`, not to one of its migrations.
SERVER_WIDE = ("control", "metrics", "progress", "quiet", "plot")


def migrate_args(arguments: dict[str, Any]) -> argparse.Namespace:
    """`x-orch-migrate`'s arguments as the `migrate` command's options: each parameter is
    the option of its name, so defaults and conversions are the command line's own."""
    if taken := [name for name in SERVER_WIDE if name in arguments]:
        raise InputError(f"{', '.join(taken)}: serve's own (its command line), not a migration's")
    argv = ["migrate"]
    for name, value in arguments.items():
        flag = f"--{name}"
        if isinstance(value, bool):
            argv += [flag] if value else []
        elif isinstance(value, list):
            argv += [f"{flag}={v}" for v in value]
        else:
            argv.append(f"{flag}={value}")
    return cli.parser(_Refusing).parse_args(argv)


def _say(text: str) -> None:
    print(text, flush=True)


@dataclass
class Service:
    """The migrations `serve` started: each in its own task, which owns what it opened."""

    say: Callable[[str], None] = _say
    #: One set of metrics for every migration served (`serve --metrics`), so counters add up.
    metrics: Metrics | None = None
    running: dict[asyncio.Task[None], Migration | None] = field(default_factory=dict)
    stopping: bool = False  # once set, nothing new starts: stop() waits for what runs

    async def launch(self, arguments: dict[str, Any]) -> Migration:
        """Attach as `migrate` does and start the migration; `CommandError` for bad input."""
        if self.stopping:
            raise CommandError("x-orch-migrate: the server is stopping; nothing was started")
        try:
            args = migrate_args(arguments)
            options = cli.check_migrate_args(args)
            watches = cli.job_watches(args)
        except cli.BAD_INPUT as exc:
            raise CommandError(f"x-orch-migrate: {exc}") from None
        ready: asyncio.Future[Migration] = asyncio.get_running_loop().create_future()
        if self.metrics is not None:
            watches.append(self.metrics.watch)
        task = asyncio.ensure_future(self._lifetime(args, options, watches, ready))
        self.running[task] = None
        task.add_done_callback(lambda t: self.running.pop(t, None))
        try:
            return await asyncio.shield(ready)  # a client gone meanwhile does not stop the start
        except asyncio.CancelledError:
            if ready.cancelled():
                raise CommandError("x-orch-migrate: the server is stopping; nothing was started") from None
            raise

    async def _lifetime(
        self,
        args: argparse.Namespace,
        options: MigrationOptions,
        watches: list[cli.Watch],
        ready: asyncio.Future[Migration],
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        name = f"migration {args.src_qmp} -> {args.dst_qmp}"
        workdir = Path(tempfile.mkdtemp(prefix="orchestrator-"))
        try:
            async with cli.attached(args, workdir, self.say) as (ep, trackers, uri):
                migration = Migration(ep, trackers, uri, options)
                self.running[task] = migration
                ready.set_result(migration)
                report = await run_watched(migration, watches)
            where = f"the guest runs on {report.guest.value}"
            self.say(f"{name}: {report.status.value}, {where}" + (f" ({report.error})" if report.error else ""))
        except asyncio.CancelledError:
            if not ready.done():
                ready.cancel()
            raise
        except Exception as exc:
            if ready.done():  # the migration ran: its report said how; this came closing up
                self.say(f"{name}: closing failed: {type(exc).__name__}: {exc}")
            else:
                ready.set_exception(CommandError(f"x-orch-migrate: {exc}") if isinstance(exc, cli.BAD_INPUT) else exc)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    async def stop(self) -> None:
        """Cancel every migration safely (attaching ones stop there, running ones abort or
        finish their handover) and wait until each has ended and closed what it opened; a
        start that came in meanwhile is refused, one already under way is waited for too."""
        self.stopping = True
        while self.running:
            for task, migration in list(self.running.items()):
                if migration is None:
                    task.cancel()
                else:
                    migration.cancel()
            await asyncio.gather(*self.running, return_exceptions=True)


async def serve_control(path: Path, metrics_at: Endpoint | None = None) -> int:
    """Serve until a signal cancels this task; then every migration ends safely first.
    `metrics_at`: serve every migration's metrics there too, for as long as this runs."""
    service = Service(metrics=None if metrics_at is None else Metrics())
    this = asyncio.current_task()
    assert this is not None
    with contextlib.ExitStack() as stack:
        if service.metrics is not None and metrics_at is not None:
            bound = stack.enter_context(serving(service.metrics, metrics_at))
            service.say(f"metrics: http://{bound}/metrics")
        return await _serve(path, service, this)


async def _serve(path: Path, service: Service, this: asyncio.Task[Any]) -> int:
    async with ControlServer(path, Context(Migrations(), service.launch), tag_ids=True):
        service.say(f"serving QMP on {path}")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            this.uncancel()  # the signal's: stopping is this command's normal end
        finally:
            await service.stop()
            settle()
    return cli.EXIT_OK
