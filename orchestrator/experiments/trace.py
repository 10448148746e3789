"""The trace format (docs/TRACE.md), in one place: what a recorder writes and a reader reads.

A trace is JSON Lines: a header, then one record per event, in order. Dirty sets travel as
compressed bitmaps, so a probe of a busy guest stays small and W(t) can be computed from it
exactly. The writer never makes its caller wait: records go through a bounded queue to a
task that writes them with `aiofiles` (file I/O off the event loop), and what does not fit
is dropped and counted, so a slow disk costs records, never a migration round.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import json
import logging
import math
import os
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import aiofiles
import numpy as np

from orchestrator.encoding.plainjson import jsonable
from orchestrator.experiments.errors import ExperimentError
from orchestrator.migration.engine.records import RoundRecord

FORMAT = "orchestrator-trace"
VERSION = 1


class TraceError(ExperimentError):
    """A file that is not a trace this reader understands; the message names the file and line."""


class TraceKind(enum.StrEnum):
    MIGRATION = "migration"  # every event of one migration
    PROBE = "probe"  # a running VM watched at a fixed period, nothing migrated


class RecordType(enum.StrEnum):
    HARVEST = "harvest"
    ROUND = "round"
    COLLECT = "collect"
    DECISION = "decision"
    THROTTLE = "throttle"
    STATUS = "status"
    TRACKER = "tracker"
    STEP = "step"
    CONTROL = "control"
    LOST = "lost"
    END = "end"


# -- bitmaps ---------------------------------------------------------------------------------
def encode_bitmap(bits: np.ndarray) -> str:
    """One bool per page -> base64(zlib(packbits, little bit order)): the format's dirty set."""
    packed = np.packbits(np.asarray(bits, dtype=bool), bitorder="little")
    return base64.b64encode(zlib.compress(packed.tobytes(), 1)).decode("ascii")


def decode_bitmap(text: str, npages: int) -> np.ndarray:
    """The bool per page `encode_bitmap` made; `TraceError` if it does not hold `npages` bits."""
    try:
        raw = zlib.decompress(base64.b64decode(text, validate=True))
    except (ValueError, zlib.error) as exc:
        raise TraceError(f"a bitmap that does not decode: {exc}") from None
    if len(raw) != -(-npages // 8):
        raise TraceError(f"a bitmap of {len(raw)} bytes for {npages} pages (needs {-(-npages // 8)})")
    return np.unpackbits(np.frombuffer(raw, np.uint8), count=npages, bitorder="little").astype(bool)


def bits_of(pages: np.ndarray, npages: int) -> np.ndarray:
    """Sorted page numbers -> one bool per page."""
    bits = np.zeros(npages, dtype=bool)
    bits[np.asarray(pages, dtype=np.int64)] = True
    return bits


# -- header and records ----------------------------------------------------------------------
@dataclass(frozen=True)
class TraceHeader:
    kind: TraceKind
    page_size: int
    ram_bytes: int
    npages: int
    started_wall: float = field(default_factory=time.time)
    workload: str | None = None
    policy: dict[str, Any] | None = None  # {"name": ..., "params": {...}}
    bandwidth_cap: float | None = None  # bytes per second of the page stream (None: uncapped)
    period_s: float | None = None  # a probe's harvest period

    def as_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **asdict(self), "kind": self.kind.value}

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> TraceHeader:
        if obj.get("format") != FORMAT:
            raise TraceError(f"{where}: not an {FORMAT} file (its first line has format {obj.get('format')!r})")
        if obj.get("version") != VERSION:
            raise TraceError(f"{where}: trace version {obj.get('version')!r}; this reader knows version {VERSION}")
        try:
            header = cls(
                kind=TraceKind(obj["kind"]),
                page_size=int(obj["page_size"]),
                ram_bytes=int(obj["ram_bytes"]),
                npages=int(obj["npages"]),
                started_wall=float(obj["started_wall"]),
                workload=obj.get("workload"),
                policy=obj.get("policy"),
                bandwidth_cap=obj.get("bandwidth_cap"),
                period_s=obj.get("period_s"),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise TraceError(f"{where}: a header without a valid {exc}") from None
        if header.npages <= 0 or header.page_size <= 0:
            raise TraceError(f"{where}: a header with {header.npages} pages of {header.page_size} bytes")
        return header


@dataclass(frozen=True)
class Harvest:
    """A probe's harvest: the pages written in (t - interval_s, t]."""

    t: float
    interval_s: float
    pages: np.ndarray = field(repr=False)  # sorted page numbers

    @property
    def dirty_pages(self) -> int:
        return int(self.pages.size)


@dataclass(frozen=True)
class Round:
    t: float
    record: RoundRecord


@dataclass(frozen=True)
class Collect:
    """One round's harvest in a migration, with what its collect cost (None where unknown)."""

    t: float
    round: int
    device_bytes: int | None
    collect_ms: float | None
    final: bool
    pages: np.ndarray = field(repr=False)  # sorted page numbers, as the harvest gave them

    @property
    def dirty_pages(self) -> int:
        return int(self.pages.size)


@dataclass(frozen=True)
class Decision:
    t: float
    data: dict[str, Any]  # ORCH_DECISION's data, in its names


@dataclass(frozen=True)
class Throttle:
    t: float
    level: float


@dataclass(frozen=True)
class Status:
    t: float
    status: str


@dataclass(frozen=True)
class TrackerNote:
    t: float
    data: dict[str, Any]


@dataclass(frozen=True)
class Step:
    t: float
    action: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Control:
    """A caller steered the migration (ORCH_CONTROL): a replay applies it at its time."""

    t: float
    command: str  # set-parameters, force-switchover, cancel
    data: dict[str, Any]


@dataclass(frozen=True)
class Lost:
    """Records the writer dropped because the disk fell behind."""

    t: float
    records: int


@dataclass(frozen=True)
class End:
    t: float
    report: dict[str, Any]  # MigrationReport.as_dict()


log = logging.getLogger(__name__)

Record = Harvest | Round | Collect | Decision | Throttle | Status | TrackerNote | Step | Control | Lost | End


def record_json(rec: Record, npages: int) -> dict[str, Any]:
    """A record as its line's object (`npages`: the bitmaps' length)."""
    match rec:
        case Harvest(t=t, interval_s=interval, pages=pages):
            return {
                "type": "harvest",
                "t": t,
                "interval_s": interval,
                "dirty_pages": int(pages.size),
                "bitmap": encode_bitmap(bits_of(pages, npages)),
            }
        case Round(t=t, record=r):
            return {"type": "round", "t": t, **asdict(r)}
        case Collect(t=t, pages=pages):
            return {
                "type": "collect",
                "t": t,
                "round": rec.round,
                "dirty_pages": int(pages.size),
                "device_bytes": rec.device_bytes,
                "collect_ms": rec.collect_ms,
                "final": rec.final,
                "bitmap": encode_bitmap(bits_of(pages, npages)),
            }
        case Decision(t=t, data=data) | TrackerNote(t=t, data=data):
            return {"type": "decision" if isinstance(rec, Decision) else "tracker", "t": t, **data}
        case Throttle(t=t, level=level):
            return {"type": "throttle", "t": t, "level": level}
        case Status(t=t, status=status):
            return {"type": "status", "t": t, "status": status}
        case Step(t=t, action=action, data=data):
            return {"type": "step", "t": t, **data, "action": action}
        case Control(t=t, command=command, data=data):
            return {"type": "control", "t": t, **data, "command": command}
        case Lost(t=t, records=n):
            return {"type": "lost", "t": t, "records": n}
        case End(t=t, report=report):
            return {"type": "end", "t": t, "report": report}
    raise TypeError(f"not a trace record: {rec!r}")


#: Per record type, the fields that are infinite when there is no bandwidth estimate yet:
#: strict JSON writes them as null, older writers as `Infinity`; both read back as infinity.
UNBOUNDED = {"round": ("expected_downtime_ms",), "decision": ("expected-downtime-ms",)}


def _parse(obj: dict[str, Any], npages: int) -> Record | None:
    """A line's record; None for a type this version does not know (newer writers may add some)."""
    rest = {k: v for k, v in obj.items() if k not in ("type", "t")}
    for name in UNBOUNDED.get(obj["type"], ()):
        if name in rest and rest[name] is None:
            rest[name] = math.inf
    t = float(obj["t"])
    match obj["type"]:
        case "harvest":
            return Harvest(t, float(obj["interval_s"]), _pages(obj, npages))
        case "round":
            return Round(t, RoundRecord(**{f.name: rest[f.name] for f in fields(RoundRecord) if f.name in rest}))
        case "collect":
            final = bool(obj.get("final", False))
            pages = _pages(obj, npages)
            return Collect(t, int(obj["round"]), obj.get("device_bytes"), obj.get("collect_ms"), final, pages)
        case "decision":
            return Decision(t, rest)
        case "throttle":
            return Throttle(t, float(obj["level"]))
        case "status":
            return Status(t, str(obj["status"]))
        case "tracker":
            return TrackerNote(t, rest)
        case "step":
            return Step(t, str(rest.pop("action")), rest)
        case "control":
            return Control(t, str(rest.pop("command")), rest)
        case "lost":
            return Lost(t, int(obj["records"]))
        case "end":
            return End(t, dict(obj["report"]))
    return None


def _pages(obj: dict[str, Any], npages: int) -> np.ndarray:
    """The record's bitmap as page numbers, checked against its count."""
    pages = np.flatnonzero(decode_bitmap(obj["bitmap"], npages))
    if pages.size != int(obj["dirty_pages"]):
        raise TraceError(f"a bitmap of {pages.size} pages where the record says {obj['dirty_pages']}")
    return pages


# -- reading -----------------------------------------------------------------------------------
@dataclass
class Trace:
    header: TraceHeader
    records: list[Record]
    truncated: bool = False  # the last line was cut short (the writer died mid-line)

    def of(self, kind: type[Any]) -> list[Any]:
        return [r for r in self.records if isinstance(r, kind)]

    @property
    def harvests(self) -> list[Harvest]:
        return self.of(Harvest)

    @property
    def rounds(self) -> list[RoundRecord]:
        return [r.record for r in self.of(Round)]

    @property
    def collects(self) -> list[Collect]:
        return self.of(Collect)

    @property
    def decisions(self) -> list[Decision]:
        return self.of(Decision)

    @property
    def end(self) -> End | None:
        """The run's last record; None when the trace ends early (a crash)."""
        ends = self.of(End)
        return ends[-1] if ends else None

    @property
    def lost(self) -> int:
        """Records the writer dropped (0 when it kept up)."""
        return sum(r.records for r in self.of(Lost))


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield number, line


def read_trace(path: str | Path) -> Trace:
    """The trace at `path`. A missing end is accepted (the run crashed), and so is a last line
    cut short; any other line that is not a record raises `TraceError` naming it."""
    path = Path(path)
    lines = list(_lines(path))
    if not lines:
        raise TraceError(f"{path} is empty: not a trace")
    header: TraceHeader | None = None
    records: list[Record] = []
    truncated = False
    for i, (number, line) in enumerate(lines):
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1 and i > 0 and not line.endswith("\n"):
                truncated = True
                break
            raise TraceError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise TraceError(f"{where}: a line that is not a JSON object")
        if header is None:
            header = TraceHeader.from_json(obj, where)
            continue
        try:
            rec = _parse(obj, header.npages)
        except TraceError as exc:
            raise TraceError(f"{where}: {exc}") from None
        except (KeyError, ValueError, TypeError) as exc:
            raise TraceError(f"{where}: a {obj.get('type')!r} record without a valid {exc}") from None
        if rec is not None:
            records.append(rec)
    assert header is not None
    return Trace(header, records, truncated)


# -- writing -----------------------------------------------------------------------------------
class TextSink(Protocol):
    """Where the writer's lines go: an `aiofiles` text file, or a test's slow double."""

    async def write(self, text: str) -> object: ...

    async def flush(self) -> object: ...

    async def close(self) -> object: ...


Opener = Callable[[Path], Awaitable[TextSink]]


async def open_file(path: Path) -> TextSink:
    """The trace file, created with mode 0600 (a bitmap says where the guest writes), truncated."""
    sink: TextSink = await aiofiles.open(path, "w", encoding="utf-8", opener=_private)
    return sink


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def _line(rec: Record | TraceHeader, npages: int) -> str:
    """One line of strict JSON: a non-finite number (an estimate with no bandwidth yet) is null."""
    obj = rec.as_json() if isinstance(rec, TraceHeader) else record_json(rec, npages)
    return json.dumps(jsonable(obj), allow_nan=False, separators=(",", ":")) + "\n"


class TraceWriter:
    """Writes one trace without ever blocking whoever offers records.

    `offer` puts a record on a bounded queue or, when the queue is full, drops it and counts
    it. A drain task encodes each record in a worker thread (bitmaps compress there) and
    writes it through the sink. `close` drains what is queued, adds a `lost` record when
    anything was dropped, then the last record if given, flushes and closes the file; it
    runs on every exit path of the recorder and the probe (a cancellation included). A disk
    that fails mid-way (or a bug in the drain) ends the writing, not the migration: `failure`
    says why, what was offered after it counts as dropped, and `close` does not raise for
    it, so a finished migration's report is never replaced by a trace's error."""

    def __init__(self, path: Path, header: TraceHeader, maxsize: int = 4096, opener: Opener = open_file) -> None:
        if maxsize < 1:
            raise ValueError(f"a trace queue holds at least one record, not {maxsize}")
        self.path, self.header = path, header
        self.dropped = 0
        self.written = 0
        self._queue: asyncio.Queue[Record | None] = asyncio.Queue(maxsize)
        self._opener = opener
        self._sink: TextSink | None = None
        self._drain: asyncio.Task[None] | None = None
        self._closed = False
        self.failure: Exception | None = None
        self._last_t = 0.0  # of the last record offered: when a `lost` note has no end to go by

    async def open(self) -> TraceWriter:
        """Create the file and write the header; the drain task starts."""
        self._sink = await self._opener(self.path)
        try:
            await self._sink.write(_line(self.header, self.header.npages))
        except BaseException:
            await self._sink.close()
            raise
        self._drain = asyncio.ensure_future(self._run())
        return self

    def offer(self, rec: Record) -> bool:
        """Queue `rec` if there is room (True); else drop it and count it. Never waits.
        Once the trace is closed nothing more is taken (False)."""
        if self._closed:
            return False
        self._last_t = rec.t
        try:
            self._queue.put_nowait(rec)
        except asyncio.QueueFull:
            self.dropped += 1
            return False
        return True

    async def _run(self) -> None:
        assert self._sink is not None
        while (rec := await self._queue.get()) is not None:
            if self.failure is not None:
                self.dropped += 1
                continue
            try:
                await self._sink.write(await asyncio.to_thread(_line, rec, self.header.npages))
            except Exception as exc:  # a disk error, or a bug: either way the run goes on
                self._failed(exc, "writing the trace %s failed, the rest of it is lost: %s")
                self.dropped += 1
                continue
            self.written += 1

    def _failed(self, exc: Exception, message: str) -> None:
        """The first failure is the writer's; each is said."""
        if self.failure is None:
            self.failure = exc
        log.warning(message, self.path, exc)

    async def close(self, last: Callable[[], Record] | None = None) -> None:
        """Drain, note what was lost, write `last()` (the end), flush, close. A cancellation
        while draining still closes the file (what was queued then is lost)."""
        if self._closed:
            return
        self._closed = True
        sink, drain = self._sink, self._drain
        try:
            if drain is not None:
                await self._finish_drain(drain)
            if sink is not None and self.failure is None:
                end = last() if last is not None else None
                if self.dropped:
                    await sink.write(_line(Lost(end.t if end else self._last_t, self.dropped), 0))
                if end is not None:
                    await sink.write(_line(end, 0))
                    self.written += 1
                await sink.flush()
        except OSError as exc:
            self._failed(exc, "finishing the trace %s failed: %s")
        finally:
            if drain is not None and not drain.done():
                drain.cancel()
                await asyncio.gather(drain, return_exceptions=True)
            if sink is not None:
                try:
                    await sink.close()  # flushes again: the same full disk fails here too
                except OSError as exc:
                    self._failed(exc, "closing the trace %s failed: %s")

    async def _finish_drain(self, drain: asyncio.Task[None]) -> None:
        """Let the drain write what is queued, then end; a drain that died meanwhile (it was
        cancelled) is not waited for, and what it left in the queue counts as dropped."""
        ending = asyncio.ensure_future(self._queue.put(None))
        try:
            await asyncio.wait((ending, drain), return_when=asyncio.FIRST_COMPLETED)
            if ending.done():
                await asyncio.wait((drain,))
        finally:
            ending.cancel()
        if drain.cancelled() or drain.exception() is not None:
            self.dropped += sum(1 for rec in _emptied(self._queue) if rec is not None)
            self._failed(TraceError("the trace's writer stopped early"), "writing the trace %s stopped: %s")


def _emptied(queue: asyncio.Queue[Record | None]) -> Iterator[Record | None]:
    """What is left in `queue`, taken out."""
    while not queue.empty():
        yield queue.get_nowait()
