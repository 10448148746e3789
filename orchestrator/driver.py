"""One live migration: trackers, the precopy engine, the page sink and QEMU's switchover.

The order is the whole point (architecture: "How a migration runs"):
1. prepare both QEMUs (x-ignore-shared, pause-before-switchover), start every tracker;
2. devices enter PRE_COPY; round 0 copies every non-zero page; each later round collects
   every tracker into the one bitmap, asks the engine (RAM plus device bytes still to move),
   and either harvests and sends or stops iterating;
3. switchover: `migrate` (QEMU moves only CPU/device-model state and stops the vCPUs in
   pre-switchover) -> devices to STOP_COPY, their final state read (no DMA after this) ->
   final collect -> final copy -> optional bit-exact verification -> destination devices
   loaded -> `migrate-continue` -> the destination runs, then its devices;
4. any failure or cancellation before `migrate-continue` cancels QEMU's migration and resumes
   the source and its devices; trackers are stopped on every path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from .bitmap import DirtyBitmap
from .devices.state import DeviceMigration, each_device
from .engine import Decision, DowntimePolicy, PrecopyEngine, RoundRecord
from .memory import MemoryLayout
from .qemu import migration as choreography
from .qemu.qmp import QmpSession
from .trackers import RecoveryPolicy, Tracker, TrackerEvent, TrackerSet
from .transport import PageSink


class VerificationFailed(RuntimeError):
    def __init__(self, pages: list[int]) -> None:
        self.pages = pages
        super().__init__(f"verification found {len(pages)} mismatched pages (first: {pages[:8]})")


@dataclass(frozen=True)
class MigrationOptions:
    downtime_limit_ms: float = 300.0
    max_rounds: int = 30
    max_time_s: float = 300.0
    on_limit: str = "cancel"  # what a migration that hits a cap does: cancel | force
    verify: bool = False
    recovery: RecoveryPolicy = RecoveryPolicy()
    qmp_timeout_s: float = 60.0
    device_timeout_s: float = 10.0  # one device state call (a hung device fails the migration)
    skip_final_copy: bool = False  # fault hook for negative controls: verification must catch it

    def policy(self) -> DowntimePolicy:
        return DowntimePolicy(self.downtime_limit_ms / 1e3, self.max_rounds, self.max_time_s, self.on_limit)


@dataclass
class MigrationReport:
    status: str = "failed"  # completed | cancelled | failed
    verified: bool | None = None
    total_ms: float = 0.0
    downtime_ms: float | None = None
    decision: str = ""
    pages_sent: int = 0
    bytes_sent: int = 0
    rounds: list[dict] = field(default_factory=list)
    trackers: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    mismatched_pages: list[int] | None = None
    devices: list[dict] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def ok(self) -> bool:
        return self.status == "completed" and self.verified is not False


class Migration:
    def __init__(
        self,
        src: QmpSession,
        dst: QmpSession,
        layout: MemoryLayout,
        sink: PageSink,
        trackers: Sequence[Tracker],
        uri: str,
        options: MigrationOptions = MigrationOptions(),
        on_round: Callable[[RoundRecord], None] | None = None,
        on_event: Callable[[TrackerEvent], None] | None = None,
        devices: Sequence[DeviceMigration] = (),
    ) -> None:
        self.src, self.dst, self.layout, self.sink, self.uri = src, dst, layout, sink, uri
        self.options = options
        self.bitmap = DirtyBitmap(layout.npages, layout.page_size)
        self.engine = PrecopyEngine(layout.page_size, options.policy())
        self.trackers = TrackerSet(trackers, self.bitmap, layout, options.recovery, on_event)
        self.devices = list(devices)
        for d in self.devices:
            d.timeout_s = options.device_timeout_s
        self.report = MigrationReport()
        self._on_round = on_round
        self._t0 = 0.0
        self._continued = False

    def _elapsed(self) -> float:
        return time.monotonic() - self._t0

    async def _send(self, pages=None, dirty: int | None = None) -> RoundRecord:
        """One round's copy. `dirty` is what the round found dirty when that differs from
        what it sends."""
        t = time.monotonic()
        if pages is None:
            n, nbytes = await self.sink.send_round0(self.trackers.on_sent)
            dirty = self.layout.npages
            work = sum(r.length for r in self.layout.regions)
        else:
            nbytes = await self.sink.send_pages(pages, self.trackers.on_sent)
            n = len(pages)
            dirty = n if dirty is None else dirty
            work = None
        rec = self.engine.record_round(dirty, n, nbytes, time.monotonic() - t, work)
        if self._on_round:
            self._on_round(rec)
        return rec

    async def run(self) -> MigrationReport:
        self._t0 = time.monotonic()
        rep = self.report
        try:
            await choreography.prepare(self.src, self.dst, self.uri)
            async with self.trackers:
                await self._each(lambda d: d.start_precopy())
                await self._precopy()
                if self.engine.verdict.decision == Decision.CANCEL:
                    rep.status, rep.decision = "cancelled", self.engine.verdict.reason
                    await self._abort()
                    return rep
                await self._switchover()
            rep.status = "completed"
        except asyncio.CancelledError:
            rep.status, rep.error = "cancelled", "cancelled by the caller"
            await asyncio.shield(self._abort())
            raise
        except VerificationFailed as exc:
            rep.status, rep.error, rep.verified = "failed", str(exc), False
            rep.mismatched_pages = exc.pages
            rep.decision = f"{rep.decision}; {exc}: cancelled, source running"
            await self._abort()
        except Exception as exc:  # noqa: BLE001 - every failure must end with the source running
            rep.status, rep.error = "failed", f"{type(exc).__name__}: {exc}"
            await self._abort()
        finally:
            self._finish()
        return rep

    async def _precopy(self) -> None:
        await self._send()  # round 0
        while True:
            t = time.monotonic()
            await self.trackers.collect(len(self.engine.rounds))
            collect_s = time.monotonic() - t
            device_bytes = sum(await self._each(lambda d: d.pending_bytes()))
            verdict = self.engine.next_step(self.bitmap.count(), device_bytes, self._elapsed(), collect_s)
            if verdict.decision != Decision.CONTINUE:
                self.report.decision = verdict.reason
                return
            await self._send(self.bitmap.harvest())

    async def _switchover(self) -> None:
        opts, rep = self.options, self.report
        mark = await choreography.start(self.src, self.uri)
        await choreography.wait_pre_switchover(self.src, opts.qmp_timeout_s, after=mark)
        await self._each(lambda d: d.stop_copy())  # devices quiesced: no DMA after this
        await self.trackers.collect(len(self.engine.rounds), final=True)
        final = self.bitmap.harvest()
        await self._send(final[:0] if opts.skip_final_copy else final, dirty=len(final))
        if opts.verify:
            bad = await self.sink.verify()
            if bad.size:
                raise VerificationFailed(bad.tolist())
            rep.verified, rep.mismatched_pages = True, []
        await self._each(lambda d: d.resume())
        await choreography.continue_(self.src)
        self._continued = True
        sw = await choreography.wait_completed(self.src, self.dst, opts.qmp_timeout_s)
        rep.downtime_ms = sw.downtime_ns / 1e6
        await self._each(lambda d: d.run_destination())

    async def _each(self, step) -> list:
        return await each_device(self.devices, step)

    async def _abort(self) -> None:
        """Before migrate-continue the source still owns the guest: make sure it runs, and
        its devices with it."""
        if self._continued:
            return
        problems = [p for p in await each_device(self.devices, lambda d: d.abort()) if p]
        try:
            await choreography.cancel(self.src, self.options.qmp_timeout_s)
        except Exception as exc:  # noqa: BLE001 - report every failure
            problems.append(f"cancelling on the source failed too: {exc}")
        if problems:
            self.report.error = "; ".join([self.report.error or "abort", *problems])

    def _finish(self) -> None:
        rep = self.report
        rep.total_ms = self._elapsed() * 1e3
        rep.rounds = [r.as_dict() for r in self.engine.rounds]
        rep.pages_sent = sum(r.sent_pages for r in self.engine.rounds)
        rep.bytes_sent = sum(r.sent_bytes for r in self.engine.rounds)
        rep.trackers = [s.as_dict() for s in self.trackers.stats()]
        rep.events = [e.as_dict() for e in self.trackers.events]
        rep.devices = [d.report.as_dict() for d in self.devices]
