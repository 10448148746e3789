"""A trace writer whose disk or drain fails never raises into the run it records and never
hangs its close; lines are strict JSON, and the reader takes files of either spelling."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from orchestrator.experiments.trace import (
    Decision,
    End,
    Harvest,
    Round,
    TraceError,
    TraceHeader,
    TraceKind,
    TraceWriter,
    read_trace,
)
from orchestrator.migration.engine import RoundRecord

pytestmark = pytest.mark.timeout(60)
PAGES = 64
HEADER = TraceHeader(TraceKind.MIGRATION, 4096, PAGES * 4096, PAGES, started_wall=1.7e9)


class FailingSink:
    """A disk that takes the header, then fails as told: `write_error` on later writes,
    `flush_error` on every flush and on close (which flushes, as a file's does)."""

    def __init__(self, write_error: BaseException | None = None, flush_error: OSError | None = None) -> None:
        self.lines: list[str] = []
        self.write_error, self.flush_error = write_error, flush_error
        self.closed = False

    async def write(self, text: str) -> None:
        if self.lines and self.write_error is not None:
            raise self.write_error
        self.lines.append(text)

    async def flush(self) -> None:
        if self.flush_error is not None:
            raise self.flush_error

    async def close(self) -> None:
        self.closed = True
        await self.flush()


def opener_of(sink: FailingSink):
    async def open_(path: Path) -> FailingSink:
        return sink

    return open_


def harvest(i: int) -> Harvest:
    return Harvest(float(i), 1.0, np.array([i % PAGES]))


async def test_a_full_disk_at_close_is_the_writers_failure_not_an_error(caplog) -> None:
    full = OSError(errno.ENOSPC, "No space left on device")
    sink = FailingSink(flush_error=full)
    writer = await TraceWriter(Path("t.jsonl"), HEADER, opener=opener_of(sink)).open()
    writer.offer(harvest(1))
    with caplog.at_level(logging.WARNING):
        await writer.close(lambda: End(2.0, {"status": "completed"}))  # must not raise
    assert sink.closed and writer.failure is full
    assert "closing the trace" in caplog.text


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
async def test_a_trace_written_to_dev_full_closes_quietly() -> None:
    writer = await TraceWriter(Path("/dev/full"), HEADER).open()
    writer.offer(harvest(1))
    await writer.close(lambda: End(2.0, {}))
    assert isinstance(writer.failure, OSError) and writer.failure.errno == errno.ENOSPC


async def test_a_drain_that_fails_on_something_else_records_it_and_close_returns() -> None:
    bug = RuntimeError("a sink with a bug")
    sink = FailingSink(write_error=bug)
    writer = await TraceWriter(Path("t.jsonl"), HEADER, maxsize=2, opener=opener_of(sink)).open()
    for i in range(10):
        writer.offer(harvest(i))
        await asyncio.sleep(0)
    async with asyncio.timeout(10):  # a hang guard: a dead drain would leave close waiting
        await writer.close(lambda: End(20.0, {}))
    assert writer.failure is bug and writer.written == 0 and writer.dropped == 10 and sink.closed


async def test_close_does_not_wait_on_a_drain_that_died() -> None:
    """The drain is cancelled from under the writer while its queue is full."""
    sink = FailingSink(write_error=asyncio.CancelledError())
    writer = await TraceWriter(Path("t.jsonl"), HEADER, maxsize=2, opener=opener_of(sink)).open()
    writer.offer(harvest(0))
    await asyncio.sleep(0.01)  # the drain takes it, its write raises and the drain is gone
    assert writer.offer(harvest(1)) and writer.offer(harvest(2)) and not writer.offer(harvest(3))
    async with asyncio.timeout(10):  # a hang guard: without the fix close waits forever
        await writer.close(lambda: End(4.0, {}))
    assert isinstance(writer.failure, TraceError) and writer.dropped == 3 and sink.closed


def strict(text: str) -> object:
    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


async def test_lines_are_strict_json_and_infinity_comes_back(tmp_path: Path) -> None:
    unbounded = RoundRecord(1, 10, 10, 40960, 2.0, 0.0, math.inf, ended_ms=5.0)
    decision = Decision(0.6, {"round": 1, "decision": "continue", "expected-downtime-ms": math.inf})
    path = tmp_path / "t.jsonl"
    writer = await TraceWriter(path, HEADER).open()
    writer.offer(Round(0.5, unbounded))
    writer.offer(decision)
    await writer.close(lambda: End(1.0, {"status": "completed", "bandwidth": math.nan}))
    lines = [strict(line) for line in path.read_text().splitlines()]  # every line parses strictly
    assert lines[1]["expected_downtime_ms"] is None and lines[2]["expected-downtime-ms"] is None
    assert lines[3]["report"]["bandwidth"] is None
    trace = read_trace(path)
    assert trace.rounds == [unbounded] and trace.decisions == [decision]


def test_an_older_trace_with_infinity_still_reads(tmp_path: Path) -> None:
    header = json.dumps({"format": "orchestrator-trace", "version": 1, **HEADER.as_json()})
    record = {"type": "round", "t": 0.5, "round": 1, "dirty_pages": 1, "sent_pages": 1, "sent_bytes": 4096}
    record |= {"duration_ms": 1.0, "bandwidth_bps": 0.0, "expected_downtime_ms": math.inf, "ended_ms": 1.0}
    path = tmp_path / "old.jsonl"
    path.write_text(f"{header}\n{json.dumps(record)}\n")
    assert "Infinity" in path.read_text(), "the old spelling"
    assert read_trace(path).rounds[0].expected_downtime_ms == math.inf
