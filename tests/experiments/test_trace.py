"""The trace format and its writer: bitmaps, a round trip of every record, files cut short,
a full queue that drops and counts, a slow disk that never holds up the loop, and the
recorder writing a whole migration of the doubles (rig) as a trace."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from pathlib import Path
from unittest.mock import Mock

import numpy as np
import pytest

from orchestrator.experiments.recorder import policy_description, trace_watch
from orchestrator.experiments.trace import (
    Collect,
    Decision,
    End,
    Harvest,
    Lost,
    Round,
    Status,
    Step,
    Throttle,
    TraceError,
    TraceHeader,
    TraceKind,
    TraceWriter,
    TrackerNote,
    bits_of,
    decode_bitmap,
    encode_bitmap,
    read_trace,
)
from orchestrator.migration.driver import run_watched
from orchestrator.migration.engine import DowntimePolicy, RoundRecord
from orchestrator.migration.engine.registry import rebuild
from tests.fakes.rig import NPAGES, Rig

pytestmark = pytest.mark.timeout(60)
PAGES = 1000  # not a multiple of 8: the bitmap's last byte is partial


def header(kind: TraceKind = TraceKind.PROBE) -> TraceHeader:
    return TraceHeader(kind, 4096, PAGES * 4096, PAGES, started_wall=1.7e9, workload="light", period_s=0.5)


def some_pages(seed: int, n: int = 50) -> np.ndarray:
    return np.unique(np.random.default_rng(seed).integers(0, PAGES, n))


class GatedSink:
    """A disk that takes lines only when the test lets it: the header passes, then every
    write waits for `gate`."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.gate = asyncio.Event()
        self.closed = False

    async def write(self, text: str) -> None:
        if self.lines:
            await self.gate.wait()
        self.lines.append(text)

    async def flush(self) -> None:
        pass

    async def close(self) -> None:
        self.closed = True


class SlowSink(GatedSink):
    """A disk whose every write takes a while in another thread (as aiofiles' do), or, as
    the negative control, blocks the loop's own thread."""

    def __init__(self, blocking: bool) -> None:
        super().__init__()
        self.blocking = blocking
        self.writing = False

    async def write(self, text: str) -> None:
        self.writing = True
        if self.blocking:
            time.sleep(0.002)
        else:
            await asyncio.to_thread(time.sleep, 0.002)
        self.writing = False
        self.lines.append(text)


def opener_of(sink: GatedSink):
    async def open_(path: Path) -> GatedSink:
        return sink

    return open_


def test_bitmaps_round_trip_and_refuse_the_wrong_length() -> None:
    pages = some_pages(1)
    bits = bits_of(pages, PAGES)
    text = encode_bitmap(bits)
    assert np.array_equal(decode_bitmap(text, PAGES), bits)
    assert np.array_equal(np.flatnonzero(decode_bitmap(text, PAGES)), pages)
    with pytest.raises(TraceError, match="needs"):
        decode_bitmap(text, PAGES + 8)
    with pytest.raises(TraceError, match="does not decode"):
        decode_bitmap("not base64!", PAGES)


async def test_every_record_round_trips_through_a_file(tmp_path: Path) -> None:
    rec = RoundRecord(1, 40, 40, 40 * 4096, 2.5, 1e9, 0.1, ended_ms=12.0)
    records = [
        Harvest(0.5, 0.5, some_pages(2)),
        Status(0.6, "active"),
        Round(0.7, rec),
        Decision(0.8, {"round": 2, "decision": "continue", "collect-ms": 0.3, "device-bytes": 0}),
        Throttle(0.85, 0.2),
        Step(0.86, "SendPages", {"final": False}),
        Collect(0.9, 2, 0, 0.3, False, some_pages(3)),
        TrackerNote(0.95, {"tracker": "write-watch", "kind": "started"}),
    ]
    end = End(1.0, {"status": "completed"})
    writer = await TraceWriter(tmp_path / "t.jsonl", header()).open()
    for r in records:
        assert writer.offer(r)
    await writer.close(lambda: end)
    assert stat.S_IMODE(os.stat(tmp_path / "t.jsonl").st_mode) == 0o600, "dirty sets say where the guest writes"
    trace = read_trace(tmp_path / "t.jsonl")
    assert trace.header == header() and not trace.truncated and trace.lost == 0
    assert [type(r) for r in trace.records] == [*map(type, records), End]
    for got, want in zip(trace.records, records, strict=False):
        if isinstance(want, Harvest | Collect):
            assert np.array_equal(got.pages, want.pages) and got.dirty_pages == want.dirty_pages
        else:
            assert got == want
    assert trace.rounds == [rec] and trace.end == end
    assert not writer.offer(records[0]), "a closed trace takes nothing more"


async def test_a_trace_cut_short_is_read_up_to_the_cut(tmp_path: Path) -> None:
    writer = await TraceWriter(tmp_path / "t.jsonl", header()).open()
    for i in range(3):
        writer.offer(Harvest(0.5 * (i + 1), 0.5, some_pages(i)))
    await writer.close()
    whole = (tmp_path / "t.jsonl").read_text()
    (tmp_path / "cut.jsonl").write_text(whole[: len(whole) - 20])  # the writer died mid-line
    cut = read_trace(tmp_path / "cut.jsonl")
    assert cut.truncated and len(cut.harvests) == 2 and cut.end is None
    whole_trace = read_trace(tmp_path / "t.jsonl")
    assert len(whole_trace.harvests) == 3 and whole_trace.end is None, "no end: a crash, still a trace"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda lines: [lines[0].replace('"version":1', '"version":2'), *lines[1:]], "version 2"),
        (lambda lines: [lines[0].replace("orchestrator-trace", "other"), *lines[1:]], "not an orchestrator-trace"),
        (lambda lines: [lines[0], "{oops\n", *lines[1:]], r"t\.jsonl:2: not JSON"),
        (lambda lines: [lines[0], lines[1].replace('"dirty_pages":', '"dirty_pages":1'), *lines[2:]], "says"),
        (lambda lines: [lines[0], '{"type": "harvest", "t": 1}\n', *lines[1:]], "harvest.*without a valid"),
    ],
)
async def test_what_is_not_a_trace_is_named(tmp_path: Path, edit, message: str) -> None:
    writer = await TraceWriter(tmp_path / "t.jsonl", header()).open()
    writer.offer(Harvest(0.5, 0.5, some_pages(4)))
    writer.offer(Harvest(1.0, 0.5, some_pages(5)))
    await writer.close()
    lines = (tmp_path / "t.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "t.jsonl").write_text("".join(edit(lines)))
    with pytest.raises(TraceError, match=message):
        read_trace(tmp_path / "t.jsonl")


async def test_a_full_queue_drops_counts_and_says_so(tmp_path: Path) -> None:
    sink = GatedSink()
    writer = await TraceWriter(tmp_path / "t.jsonl", header(), maxsize=4, opener=opener_of(sink)).open()
    accepted = [writer.offer(Harvest(0.1 * i, 0.1, some_pages(i))) for i in range(10)]
    assert accepted == [True] * 4 + [False] * 6 and writer.dropped == 6
    sink.gate.set()
    await writer.close(lambda: End(2.0, {}))
    assert sink.closed
    (tmp_path / "t.jsonl").write_text("".join(sink.lines))
    trace = read_trace(tmp_path / "t.jsonl")
    assert [h.t for h in trace.harvests] == [0.0, 0.1, 0.2, 0.30000000000000004], "the first four, in order"
    assert isinstance(trace.records[-2], Lost) and trace.lost == 6
    assert isinstance(trace.records[-1], End)


@pytest.mark.parametrize("blocking", [False, True], ids=["slow-disk", "negative-control-blocking-sink"])
async def test_a_slow_disk_never_holds_up_the_loop(blocking: bool) -> None:
    """A "migration" offers a record every loop turn while a ticker runs beside it. With the
    writes in a thread, the ticker runs while a write is under way, and loop latency stays
    that of a turn; a sink that blocks the loop's thread (the control) never lets it."""
    sink = SlowSink(blocking)
    writer = await TraceWriter(Path("unused"), header(), maxsize=8, opener=opener_of(sink)).open()
    ticks_during_writes = 0
    latencies: list[float] = []
    stop = False

    async def ticker() -> None:
        nonlocal ticks_during_writes
        loop = asyncio.get_running_loop()
        while not stop:
            t = loop.time()
            await asyncio.sleep(0)
            latencies.append(loop.time() - t)
            ticks_during_writes += sink.writing

    tick = asyncio.ensure_future(ticker())
    offered = 200
    for i in range(offered):
        writer.offer(Harvest(float(i), 1.0, some_pages(i, 5)))
        await asyncio.sleep(0)
    stop = True
    await tick
    await writer.close()
    kind = "blocking" if blocking else "threaded"
    print(f"loop latency over {len(latencies)} turns, {kind} sink: max {max(latencies) * 1e3:.2f} ms")
    assert writer.written + writer.dropped == offered
    times = [obj["t"] for obj in map(json.loads, sink.lines[1:]) if obj["type"] == "harvest"]
    assert times == sorted(times) and len(times) == writer.written
    if blocking:
        assert ticks_during_writes == 0
    else:
        assert ticks_during_writes > 0 and writer.dropped > 0, "the disk fell behind, the loop did not"


def test_the_header_names_the_policy_as_the_registry_rebuilds_it() -> None:
    policy = DowntimePolicy(0.05, 7)
    assert rebuild(policy_description(policy)) == policy
    assert policy_description(Mock(spec=["decide"])) is None, "a caller's own policy: not named"


async def test_the_recorder_writes_a_whole_migration(tmp_path: Path) -> None:
    rig = Rig.build()
    try:
        mig = rig.migration()
        rep = await run_watched(mig, [trace_watch(tmp_path / "m.jsonl", workload="fake")])
    finally:
        await rig.close()
    assert rep.ok
    trace = read_trace(tmp_path / "m.jsonl")
    h = trace.header
    assert (h.kind, h.npages, h.workload, h.policy["name"]) == (TraceKind.MIGRATION, NPAGES, "fake", "downtime")
    assert trace.rounds == rep.rounds and trace.lost == 0
    collects = trace.collects
    assert [c.round for c in collects] == [r.round for r in rep.rounds[1:]], "one harvest per round after round 0"
    assert [c.dirty_pages for c in collects] == [r.dirty_pages for r in rep.rounds[1:]]
    assert [c.final for c in collects] == [False] * (len(collects) - 1) + [True]
    assert all(c.collect_ms is not None and c.collect_ms >= 0 for c in collects), "the final one's too"
    assert all(c.device_bytes is not None for c in collects[:-1]) and collects[-1].device_bytes is None
    assert len(trace.decisions) == len(rep.rounds) - 1
    statuses = [r.status for r in trace.of(Status)]
    assert statuses == ["active", "pre-switchover", "device", "completed"]
    assert trace.end is not None and trace.end.report == json.loads(json.dumps(rep.as_dict()))
    assert isinstance(trace.records[-1], End)


async def test_a_cancelled_migration_still_ends_its_trace(tmp_path: Path) -> None:
    rig = Rig.build()
    try:
        mig = rig.migration()
        mig.listen(lambda ev: mig.cancel() if ev.data.get("action") == "SendPages" else None)
        rep = await run_watched(mig, [trace_watch(tmp_path / "m.jsonl")])
    finally:
        await rig.close()
    assert rep.status == "cancelled"
    trace = read_trace(tmp_path / "m.jsonl")
    assert trace.end is not None and trace.end.report["status"] == "cancelled"
    assert [r.status for r in trace.of(Status)][-2:] == ["cancelling", "cancelled"]
