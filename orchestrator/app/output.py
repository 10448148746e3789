"""What the CLI prints: one progress line per round, tracker events, a summary, and JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

from orchestrator.encoding.plainjson import jsonable
from orchestrator.lab.demo import DemoResult
from orchestrator.lab.workload import guest_rate
from orchestrator.migration.driver import MigrationReport
from orchestrator.migration.engine import RoundRecord
from orchestrator.trackers import TrackerEvent


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def round_line(rec: RoundRecord, out: TextIO = sys.stdout) -> None:
    print(
        f"round {rec.round:>3}: dirty {rec.dirty_pages:>8} pages, sent {rec.sent_pages:>8} "
        f"({_mib(rec.sent_bytes)}) in {rec.duration_ms:7.1f} ms, "
        f"{rec.bandwidth_bps / 1e6:8.0f} MB/s, expected downtime {rec.expected_downtime_ms:8.1f} ms",
        file=out,
        flush=True,
    )


def event_line(ev: TrackerEvent, out: TextIO = sys.stdout) -> None:
    err = f" errno {ev.errno}" if ev.errno is not None else ""
    when = "at exit" if ev.round < 0 else f"round {ev.round}"
    print(f"  [{ev.tracker}] {when}: {ev.kind}{err}: {ev.action}", file=out, flush=True)


def summary(rep: MigrationReport, out: TextIO = sys.stdout) -> None:
    downtime = "-" if rep.downtime_ms is None else f"{rep.downtime_ms:.1f} ms"
    verified = {True: "yes", False: "NO", None: "not asked"}[rep.verified]
    print(f"status:     {rep.status} (the guest runs on: {rep.guest.value})", file=out)
    if rep.interrupted:
        print(f"signal:     received {rep.interrupted}", file=out)
    print(f"decision:   {rep.decision}", file=out)
    print(f"verified:   {verified}", file=out)
    print(f"total:      {rep.total_ms:.1f} ms   downtime: {downtime}   rounds: {len(rep.rounds)}", file=out)
    print(f"sent:       {rep.pages_sent} pages ({_mib(rep.bytes_sent)})", file=out)
    for t in rep.trackers:
        print(
            f"tracker:    {t.name} ({t.kind}, {t.page_size} B pages): reports {t.reports}, "
            f"errors {t.errors}, fallbacks {t.fallbacks}, restarts {t.restarts}, {t.state}",
            file=out,
        )
    if rep.mismatched_pages:
        print(f"mismatched: {len(rep.mismatched_pages)} pages, first {rep.mismatched_pages[:8]}", file=out)
    if rep.error:
        print(f"error:      {rep.error}", file=out)
    for problem in rep.watch_errors:
        print(f"watch:      {problem}", file=out)
    out.flush()


def demo_lines(result: DemoResult) -> list[str]:
    """What the demo adds to the summary: how each guest and device fared."""
    lines = []
    if result.src_progress:
        lines.append(
            f"source guest:      last progress {result.src_progress[-1]}, {guest_rate(result.src_progress):.0f} pages/s"
        )
    if result.dst_progress:
        lines.append(
            f"destination guest: running, progress {result.dst_progress[-1]}, "
            + ("its own checks pass" if not result.guest_errors else f"FAILED its own checks: {result.guest_errors[0]}")
        )
    for name, check in result.devices.items():
        lines.append(
            f"device {name}: state migrated {'yes' if check['state_migrated'] else 'NO'}, "
            f"destination DMA consistent {'yes' if not check['destination_mismatched_pages'] else 'NO'}"
        )
    return lines


def write_json(data: dict, where: str | None) -> None:
    if where is None:
        return
    text = json.dumps(jsonable(data), indent=2, allow_nan=False)  # strict JSON: an unmeasured estimate is null
    if where == "-":
        print(text, flush=True)
    else:
        Path(where).write_text(text + "\n")
