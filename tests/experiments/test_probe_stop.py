"""A probe stopped by a signal (through the CLI's signal policy) says what it kept: its
summary and where the trace is, exit 1; the tracker is stopped and the trace ends
`interrupted`. Against a tracker double, no QEMU."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path

import pytest

from orchestrator.app.probe import EXIT_STOPPED, _probe
from orchestrator.app.signals import under_signal_policy
from orchestrator.dirty.bitmap import DirtyBitmap
from orchestrator.dirty.memory import MemoryLayout
from orchestrator.experiments.trace import read_trace

pytestmark = pytest.mark.timeout(60)
LAYOUT = MemoryLayout.flat(64 * 4096)


class Tracker:
    """Writes two pages a harvest; `harvested` is set after the third."""

    def __init__(self) -> None:
        self.collects = 0
        self.started = self.stopped = False
        self.harvested = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def start(self, layout: MemoryLayout) -> None:
        self.started = True

    def collect(self, bitmap: DirtyBitmap) -> None:
        self.collects += 1
        bitmap.mark(self.collects % 32 * 4096, 2 * 4096)
        if self.collects == 3:
            self._loop.call_soon_threadsafe(self.harvested.set)

    def stop(self) -> None:
        self.stopped = True


def args_for(trace: Path, duration: float) -> argparse.Namespace:
    return argparse.Namespace(duration=duration, period=0.01, trace=trace)


async def test_a_signal_ends_the_probe_keeping_its_trace(tmp_path: Path, capsys) -> None:
    trace, tracker = tmp_path / "cut.jsonl", Tracker()
    probe = asyncio.ensure_future(under_signal_policy(_probe(args_for(trace, 60.0), LAYOUT, tracker)))  # type: ignore[arg-type]
    await tracker.harvested.wait()
    os.kill(os.getpid(), signal.SIGINT)
    assert await probe == EXIT_STOPPED == 1
    out, err = capsys.readouterr()
    assert f"the trace so far is kept in {trace}" in err and "probe: " in out, "the summary is printed"
    assert tracker.stopped
    cut = read_trace(trace)
    assert len(cut.harvests) >= 3 and cut.end is not None and cut.end.report["interrupted"] is True


async def test_a_probe_that_runs_its_duration_exits_0_and_says_nothing_kept(tmp_path: Path, capsys) -> None:
    trace, tracker = tmp_path / "whole.jsonl", Tracker()
    assert await under_signal_policy(_probe(args_for(trace, 0.05), LAYOUT, tracker)) == 0  # type: ignore[arg-type]
    assert "kept" not in capsys.readouterr().err
    assert read_trace(trace).end.report["interrupted"] is False  # type: ignore[union-attr]


async def test_a_cancellation_on_top_of_another_still_propagates(tmp_path: Path) -> None:
    """Two cancellations pending (a caller's besides the signal's): the probe does not eat them."""
    tracker = Tracker()
    probe = asyncio.ensure_future(_probe(args_for(tmp_path / "t.jsonl", 60.0), LAYOUT, tracker))  # type: ignore[arg-type]
    await tracker.harvested.wait()
    probe.cancel()
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert tracker.stopped
