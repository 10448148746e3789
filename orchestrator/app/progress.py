"""How `migrate` and `demo` show a migration to whoever runs them.

Four ways, one chosen per command (`--progress`, `-q`): a live panel redrawn in place on a
terminal (`rich`), the classic lines (one per round, one per tracker event), one JSON object
per event for programs reading stdout, or nothing. Each is a `Watch`, fed by the
migration's own events, so what it shows is what a trace or a management stack sees, and it
is left on every exit path (the live panel gives the terminal back). The summary at the end
follows the same choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import io
import json
import math
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from rich.console import Console, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from orchestrator.app.output import event_line, round_line, summary
from orchestrator.encoding.plainjson import jsonable
from orchestrator.migration.driver import Migration, MigrationReport
from orchestrator.migration.engine import RoundRecord
from orchestrator.migration.engine.sequence import JobStatus
from orchestrator.migration.events import EventName, MigrationEvent
from orchestrator.migration.info import MigrationInfo
from orchestrator.trackers.events import TrackerEvent, TrackerState

MIB = 1 << 20
#: How often the live panel is redrawn between events: a round 0 of many GiB sends none for seconds.
LIVE_REFRESH_S = 0.5
#: While QEMU holds the guest stopped for the switchover: nothing slow on the loop then.
IN_DOWNTIME = (JobStatus.PRE_SWITCHOVER, JobStatus.DEVICE)
#: The `name` of the JSON stream's last line, and of a line carrying a notice.
SUMMARY, NOTE = "SUMMARY", "NOTE"


class ProgressMode(enum.StrEnum):
    AUTO = "auto"  # live on a terminal, text otherwise
    LIVE = "live"
    TEXT = "text"
    JSON = "json"
    QUIET = "quiet"  # -q: neither progress nor summary; errors still go to stderr


def timestamp(wall_s: float) -> dict[str, int]:
    """QMP's event timestamp, so an event reads like one of QEMU's."""
    seconds = math.floor(wall_s)
    return {"seconds": seconds, "microseconds": int((wall_s - seconds) * 1e6)}


def event_json(ev: MigrationEvent) -> str:
    """One event as one line of JSON."""
    line = {"name": ev.name.value, "data": ev.data, "elapsed_s": ev.elapsed_s, "timestamp": timestamp(ev.wall_s)}
    return json.dumps(jsonable(line), allow_nan=False)


def summary_data(rep: MigrationReport) -> dict[str, Any]:
    """The text summary's facts as data: what ended, where the guest is, what it cost."""
    return {
        "status": rep.status.value,
        "guest": rep.guest.value,
        "decision": rep.decision,
        "verified": rep.verified,
        "total_ms": rep.total_ms,
        "downtime_ms": rep.downtime_ms,
        "rounds": len(rep.rounds),
        "pages_sent": rep.pages_sent,
        "bytes_sent": rep.bytes_sent,
        "trackers": [t.counts() for t in rep.trackers],
        "mismatched_pages": None if rep.mismatched_pages is None else len(rep.mismatched_pages),
        "error": rep.error,
        "interrupted": rep.interrupted,
        "watch_errors": rep.watch_errors,
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def live_panel(info: MigrationInfo) -> RenderableType:
    """The live display of one moment of a migration, from `info()` alone."""
    ram = info.ram
    sent = ram.transferred / ram.total if ram.total else 0.0
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("status", f"{info.status.value} ({info.phase}), {info.total_time_ms / 1e3:.1f} s")
    grid.add_row("rounds", str(ram.dirty_sync_count))
    bar = Table.grid(padding=(0, 1))
    bar.add_row(ProgressBar(total=1.0, completed=min(sent, 1.0), width=30), f"{sent:.0%} of RAM sent")
    grid.add_row("RAM", bar)
    grid.add_row(
        "sent",
        f"{ram.transferred / MIB:.1f} MiB of {ram.total / MIB:.1f} MiB, {ram.remaining / MIB:.1f} MiB dirty to send",
    )
    grid.add_row(
        "dirty rate", f"{ram.dirty_pages_rate:.0f} pages/s ({ram.dirty_pages_rate * ram.page_size / MIB:.1f} MiB/s)"
    )
    grid.add_row("bandwidth", f"{ram.mbps / 8:.0f} MB/s")
    fits = (
        info.expected_downtime_ms is not None
        and info.downtime_limit_ms is not None
        and info.expected_downtime_ms <= info.downtime_limit_ms
    )
    grid.add_row(
        "downtime",
        Text(
            f"expected {_ms(info.expected_downtime_ms)} / limit {_ms(info.downtime_limit_ms)}"
            + (f", measured {_ms(info.downtime_ms)}" if info.downtime_ms is not None else ""),
            style="green" if fits else "yellow",
        ),
    )
    if info.throttle:
        grid.add_row("throttle", f"{info.throttle:.0%} of the vCPUs' time taken")
    for t in info.trackers:
        ok = t.state in (TrackerState.RUNNING, TrackerState.STOPPED)
        grid.add_row(
            "tracker",
            Text(
                f"{t.name}: {t.state.value}, errors {t.errors}, fallbacks {t.fallbacks}, restarts {t.restarts}",
                style="" if ok else "red",
            ),
        )
    if info.decision:
        grid.add_row("decision", info.decision)
    if info.error:
        grid.add_row("error", Text(info.error, style="red"))
    return Panel(grid, title="migration", expand=False)


@contextlib.asynccontextmanager
async def _live(mig: Migration, console: Console) -> AsyncIterator[None]:
    """The panel, redrawn on each round and status change and every `LIVE_REFRESH_S`; tracker
    events are also printed above it, so failures stay on screen once the panel has moved on.
    Never while the guest is stopped for the switchover: a redraw takes milliseconds of the
    loop's thread, and the downtime would pay for them (the panel catches up after RESUME)."""
    with Live(live_panel(mig.info()), console=console, auto_refresh=False, transient=False) as live:

        def redraw() -> None:
            if mig.sequence.job_status not in IN_DOWNTIME:
                live.update(live_panel(mig.info()), refresh=True)

        def on_event(ev: MigrationEvent) -> None:
            if isinstance(ev.record, TrackerEvent):
                line = io.StringIO()
                event_line(ev.record, line)
                live.console.print(line.getvalue().rstrip("\n"), markup=False, highlight=False)
            if ev.name in (EventName.MIGRATION, EventName.MIGRATION_PASS):
                redraw()

        async def tick() -> None:
            while True:
                await asyncio.sleep(LIVE_REFRESH_S)
                redraw()

        mig.listen(on_event)
        ticker = asyncio.ensure_future(tick())
        try:
            yield
        finally:
            ticker.cancel()
            redraw()


@dataclass(frozen=True)
class Display:
    """One command's way of showing its migration: `watch` while it runs, `summary` after,
    `note` for what the command itself says meanwhile. `mode` is never AUTO here."""

    mode: ProgressMode
    out: TextIO
    console: Console | None = None  # the live panel's (default: a console on `out`)

    @contextlib.asynccontextmanager
    async def watch(self, mig: Migration) -> AsyncIterator[None]:
        if self.mode is ProgressMode.LIVE:
            async with _live(mig, self.console or Console(file=self.out)):
                yield
            return
        if self.mode is ProgressMode.TEXT:
            mig.listen(self._line)
        elif self.mode is ProgressMode.JSON:
            mig.listen(lambda ev: print(event_json(ev), file=self.out, flush=True))
        yield

    def _line(self, ev: MigrationEvent) -> None:
        if isinstance(ev.record, RoundRecord):  # MIGRATION_PASS
            round_line(ev.record, self.out)
        elif isinstance(ev.record, TrackerEvent):
            event_line(ev.record, self.out)

    def note(self, text: str) -> None:
        if self.mode is ProgressMode.JSON:
            print(json.dumps({"name": NOTE, "data": {"text": text}}), file=self.out, flush=True)
        elif self.mode is not ProgressMode.QUIET:
            print(text, file=self.out, flush=True)

    def summary(self, rep: MigrationReport, lines: Sequence[str] = (), extra: Mapping[str, Any] | None = None) -> None:
        """The end: the text summary and `lines` (what the command adds), or one JSON object
        with the same facts and `extra` as the stream's last line, or nothing when quiet."""
        if self.mode is ProgressMode.JSON:
            line = {"name": SUMMARY, "data": summary_data(rep) | dict(extra or {}), "elapsed_s": rep.total_ms / 1e3}
            print(json.dumps(jsonable(line), allow_nan=False), file=self.out, flush=True)
        elif self.mode is not ProgressMode.QUIET:
            summary(rep, self.out)
            for text in lines:
                print(text, file=self.out)
            self.out.flush()


def choose(
    mode: ProgressMode,
    quiet: bool,
    report_on_stdout: bool,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> Display:
    """The display for these options. A JSON report on stdout (`--json -`) keeps stdout to
    itself: progress and summary then go to stderr, in whichever mode."""
    out = (stderr or sys.stderr) if report_on_stdout else (stdout or sys.stdout)
    if quiet:
        return Display(ProgressMode.QUIET, out)
    if mode is ProgressMode.AUTO:
        return Display(ProgressMode.LIVE if out.isatty() else ProgressMode.TEXT, out)
    return Display(mode, out)
