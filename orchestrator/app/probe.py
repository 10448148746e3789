"""`orchestrator probe`: watch a running VM's writes without migrating it, as a trace.

The same write-watch tracker a migration uses is armed on the QEMU and harvested every
period into a `DirtyBitmap`; each harvest is one trace record (the pages written in that
period), from which `experiments.workingset` computes W(t). Nothing in the VM changes: no
capability, no migration, the guest never paused; the registration ends (and QEMU is as it
was) on every way out, a signal included, and the trace is closed with what it holds. A
signal ends the probe early: its summary and where its trace is kept are printed, exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from orchestrator.app.checks import InputError, positive, writable_target
from orchestrator.dirty.bitmap import DirtyBitmap
from orchestrator.dirty.memory import MemoryLayout
from orchestrator.experiments.trace import End, Harvest, Record, TraceHeader, TraceKind, TraceWriter
from orchestrator.experiments.workingset import working_set
from orchestrator.migration.attach import to_memory_layout
from orchestrator.qemu.errors import LayoutError
from orchestrator.qemu.layout import check_migratable, discover_layout
from orchestrator.qemu.qmp import QmpSession
from orchestrator.trackers.writewatch import WriteWatchTracker
from orchestrator.writewatch import WriteWatch

_T = TypeVar("_T")
MIB = 1 << 20
#: The exit status of a probe stopped before its duration, as of any command a signal stops.
EXIT_STOPPED = 1


def add_probe_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("probe", help="record a running VM's dirty pages over time (nothing migrated)")
    p.add_argument("--qmp", required=True, type=Path, metavar="SOCK", help="the QEMU's QMP socket")
    p.add_argument("--ram", required=True, type=Path, metavar="FILE", help="its share=on RAM file")
    p.add_argument("--duration", required=True, type=float, metavar="S", help="how long to watch, in seconds")
    p.add_argument("--period", type=float, default=0.5, metavar="S", help="seconds between harvests (default 0.5)")
    p.add_argument("--trace", required=True, type=Path, metavar="FILE", help="the trace to write (docs/TRACE.md)")
    p.add_argument(
        "--trust-seccomp",
        action="store_true",
        help="let write-watch inject into a QEMU whose seccomp filter cannot be checked here",
    )


def check_probe_args(args: argparse.Namespace) -> None:
    positive("--duration", args.duration, "seconds")
    positive("--period", args.period, "seconds")
    if args.period > args.duration:
        raise InputError(f"--period {args.period:g} is longer than --duration {args.duration:g}: no harvest")
    writable_target("--trace", str(args.trace))


async def probed_layout(session: QmpSession, ram: Path) -> MemoryLayout:
    """The guest's RAM as `migrate` sees it: one share=on file, the one the user named."""
    guest = await discover_layout(session)
    check_migratable(guest)
    paths = {r.path for r in guest.regions}
    if len(paths) != 1:
        raise LayoutError(f"guest RAM comes from {len(paths)} files; the probe watches one RAM file")
    qemu_path = paths.pop()
    assert qemu_path is not None  # check_migratable refused backends without a file
    if not os.path.samefile(ram, qemu_path):
        raise LayoutError(f"RAM file {ram} is not the file QEMU maps ({qemu_path})")
    return to_memory_layout(guest)


async def _to_the_end(call: Callable[[], _T]) -> _T:
    """Run a blocking tracker call in a thread; a cancellation waits for it to return first, so
    the watch is never stopped or closed under a scan still running."""
    work = asyncio.ensure_future(asyncio.to_thread(call))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.gather(work, return_exceptions=True)
        raise


async def probe_command(args: argparse.Namespace) -> int:
    check_probe_args(args)
    session = await QmpSession.connect(args.qmp)
    try:
        layout = await probed_layout(session, args.ram)
        status = (await session.execute("query-status"))["status"]
        if status not in ("running", "paused"):
            raise InputError(f"QEMU {args.qmp} is '{status}': the probe watches a guest that runs")
        watch = WriteWatch.open(session.peer_pid(), layout, args.trust_seccomp)
        try:
            return await _probe(args, layout, WriteWatchTracker(watch))
        finally:
            watch.close()
    finally:
        await session.close()


async def _probe(args: argparse.Namespace, layout: MemoryLayout, tracker: WriteWatchTracker) -> int:
    ram_bytes = sum(r.length for r in layout.regions)
    header = TraceHeader(TraceKind.PROBE, layout.page_size, ram_bytes, layout.npages, period_s=args.period)
    writer = await TraceWriter(args.trace, header).open()
    bitmap = DirtyBitmap(layout.npages, layout.page_size)
    harvests: list[Harvest] = []
    interrupted = True
    t0 = time.monotonic()

    def end() -> Record:
        pages = sum(h.dirty_pages for h in harvests)
        return End(time.monotonic() - t0, {"harvests": len(harvests), "dirty_pages": pages, "interrupted": interrupted})

    try:
        try:
            await _to_the_end(lambda: tracker.start(layout))
            t0 = last = time.monotonic()  # armed: every write from here on is seen
            try:
                for k in range(1, int(args.duration / args.period + 1e-9) + 1):
                    await asyncio.sleep(max(0.0, t0 + k * args.period - time.monotonic()))
                    await _to_the_end(lambda: tracker.collect(bitmap))
                    now = time.monotonic()
                    harvest = Harvest(now - t0, now - last, bitmap.harvest())
                    last = now
                    harvests.append(harvest)
                    writer.offer(harvest)
                    mb = harvest.dirty_pages * layout.page_size / MIB
                    print(
                        f"t={harvest.t:7.2f} s  {harvest.dirty_pages:8d} pages ({mb / harvest.interval_s:8.1f} MiB/s)"
                    )
                interrupted = False
            finally:
                await _to_the_end(tracker.stop)
        finally:
            await writer.close(end)
    except asyncio.CancelledError:
        if not _stopped_once():
            raise
    summarize(harvests, layout, args.period, writer)
    if interrupted:
        # Said here rather than by the CLI's generic line for a signal (everything removed):
        # what a stopped probe made, its trace so far, is what its user asked for.
        print(
            f"probe: stopped after {len(harvests)} harvests; the trace so far is kept in {writer.path} "
            "(its end record says interrupted)",
            file=sys.stderr,
        )
        return EXIT_STOPPED
    return 0


def _stopped_once() -> bool:
    """A cancellation (a signal's, through the signal policy) is the probe's early end: taken
    back when it is the only one pending, so the probe can say what it kept."""
    task = asyncio.current_task()
    return task is not None and task.uncancel() == 0


def summarize(harvests: list[Harvest], layout: MemoryLayout, period_s: float, writer: TraceWriter) -> None:
    """The working set at a few window lengths, like calc-dirty-rate at those calc-times."""
    n = len(harvests)
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64, n) if 1 <= k <= n})
    print(f"probe: {n} harvests every {period_s:g} s into {writer.path} ({writer.dropped} records lost)")
    for point in working_set(harvests, layout.npages, period_s, ks):
        rate = point.rate_bytes_per_s(layout.page_size) / MIB
        print(f"  W({point.window_s:g} s) = {point.mean_pages:.0f} pages (max {point.max_pages}), {rate:.1f} MiB/s")
