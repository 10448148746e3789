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
4. any failure or cancellation before `migrate-continue` cancels QEMU's migration, resumes
   the source's devices, and the source itself if it ran before, and sets both QEMUs'
   capabilities back; a QEMU that dies or shuts down meanwhile fails the migration at once.
   After `migrate-continue` the switchover is finished even when the caller cancels; if the
   destination never ran the guest, the source resumes. Trackers are stopped on every path.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field

from .bitmap import DirtyBitmap
from .devices.state import DeviceMigration, each_device
from .engine import Decision, DowntimePolicy, PrecopyEngine, RoundRecord
from .memory import MemoryLayout
from .qemu import migration as choreography
from .qemu.errors import QemuError
from .qemu.peer import QmpPeer
from .trackers import RecoveryPolicy, Tracker, TrackerEvent, TrackerSet
from .transport import PageSink


async def _to_the_end(work: Awaitable[None]) -> None:
    """Await `work` to its end even when the caller cancels meanwhile, then let the cancel go
    on: a guest half handed over, or an abort cut short, could leave it running nowhere."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


def _gone(session: QmpPeer) -> bool:
    return session.lost or session.last_event("SHUTDOWN") is not None


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


class GuestHome(str, enum.Enum):
    """Where the guest runs once the migration has ended: what a caller must know first."""

    DESTINATION = "destination"  # migrated
    SOURCE = "source"  # not migrated: the source has it, running (or paused, as it was)
    NOWHERE = "nowhere"  # a QEMU died or could not be resumed: an operator must look


@dataclass
class MigrationReport:
    status: str = "failed"  # completed | cancelled | failed
    guest: GuestHome = GuestHome.SOURCE
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
    #: Set when the caller cancelled (a signal, for the CLI): the phase it arrived in.
    interrupted: str | None = None

    def as_dict(self) -> dict:
        return {**asdict(self), "guest": self.guest.value}

    @property
    def ok(self) -> bool:
        return self.status == "completed" and self.verified is not False


class Migration:
    def __init__(
        self,
        src: QmpPeer,
        dst: QmpPeer,
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
        self._listening = False  # the destination was given migrate-incoming
        self._migrating = False  # the source was given migrate (before that its run state is the user's)
        self._cancellable = True  # false once finishing the switchover or aborting
        self._saved: tuple[choreography.SavedCapabilities, ...] = ()
        self._src_was_running = False  # until QEMU says: an abort before then must not run a paused guest
        self._death: str | None = None  # which QEMU died or shut down, and how
        self._watch_cancelled = False  # the peer watch, not the caller, cancelled the run
        self._resume_mark = 0

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
        """Migrate, and return the report. A cancellation by the caller (the CLI's signals)
        aborts like a failure before `migrate-continue` and is raised again afterwards; once
        past it the switchover is finished first. Either way `report` tells the outcome."""
        self._t0 = time.monotonic()
        rep = self.report
        watch = asyncio.ensure_future(self._watch_peers(asyncio.current_task()))
        try:
            self._src_was_running = (await self.src.execute("query-status"))["running"]
            self._saved = await choreography.prepare(self.src, self.dst)
            async with self.trackers:
                await self._each(lambda d: d.start_precopy())
                await self._precopy()
                if self.engine.verdict.decision == Decision.CANCEL:
                    rep.status, rep.decision = "cancelled", self.engine.verdict.reason
                    await _to_the_end(self._abort())
                    return rep
                await self._switchover()
            rep.status, rep.guest = "completed", GuestHome.DESTINATION
        except asyncio.CancelledError:
            if not self._watch_cancelled:  # the caller's cancellation
                rep.interrupted = "after migrate-continue" if self._continued else "before migrate-continue"
                if rep.status != "completed":
                    rep.status, rep.error = "cancelled", "cancelled by the caller"
                    await _to_the_end(self._abort())
                raise
            asyncio.current_task().uncancel()  # ours, from the peer watch: a failure like any
            rep.status, rep.error = "failed", self._death
            await _to_the_end(self._abort())
        except VerificationFailed as exc:
            rep.status, rep.error, rep.verified = "failed", str(exc), False
            rep.mismatched_pages = exc.pages
            rep.decision = f"{rep.decision}; {exc}: cancelled, source {'running' if self._src_was_running else 'stays paused'}"
            await _to_the_end(self._abort())
        except Exception as exc:  # noqa: BLE001 - every failure must end with the source running
            rep.status, rep.error = "failed", f"{type(exc).__name__}: {exc}"
            await _to_the_end(self._abort())
        finally:
            watch.cancel()
            self._finish()
        return rep

    async def _watch_peers(self, run: asyncio.Task) -> None:
        """The first QEMU to die or shut down fails the migration at once (cancelling `run`)
        instead of surfacing as a timeout; past `migrate-continue` the switchover's own waits
        see it."""
        sides = {asyncio.ensure_future(s.wait_gone()): (name, s) for name, s in (("source", self.src), ("destination", self.dst))}
        try:
            done, _ = await asyncio.wait(sides, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in sides:
                w.cancel()
        first = next(iter(done))
        name, session = sides[first]
        self._death = f"the {name} QEMU ({session.socket_path}) {first.result()}"
        if self._cancellable:
            self._watch_cancelled = True
            run.cancel()

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
        opts = self.options
        await choreography.listen(self.dst, self.uri)
        self._listening = True
        self._migrating = True  # from here QEMU may stop the guest: an abort must give it back
        mark = await choreography.start(self.src, self.uri)
        await choreography.wait_pre_switchover(self.src, opts.qmp_timeout_s, after=mark)
        # QEMU stopped the guest only if it was running then: the truth for what follows.
        self._src_was_running = self.src.last_event("STOP", after=mark) is not None
        await self._each(lambda d: d.stop_copy())  # devices quiesced: no DMA after this
        await self.trackers.collect(len(self.engine.rounds), final=True)
        final = self.bitmap.harvest()
        await self._send(final[:0] if opts.skip_final_copy else final, dirty=len(final))
        if opts.verify:
            bad = await self.sink.verify()
            if bad.size:
                raise VerificationFailed(bad.tolist())
            self.report.verified, self.report.mismatched_pages = True, []
        await self._each(lambda d: d.resume())
        self._cancellable = False  # the guest is being handed over: see it through
        await _to_the_end(self._finish_switchover())

    async def _finish_switchover(self) -> None:
        self._resume_mark = self.dst.mark()
        await choreography.continue_(self.src)
        self._continued = True
        try:
            sw = await choreography.wait_completed(
                self.src, self.dst, self.options.qmp_timeout_s, resumes=self._src_was_running, after=self._resume_mark
            )
        except Exception:
            await self._resume_source_if_unclaimed()
            if self.report.guest is GuestHome.DESTINATION:
                await self._each(lambda d: d.run_destination())  # the guest runs there: its devices too
            raise
        self.report.status, self.report.guest = "completed", GuestHome.DESTINATION
        self.report.downtime_ms = None if sw.downtime_ns is None else sw.downtime_ns / 1e6
        await self._each(lambda d: d.run_destination())

    async def _resume_source_if_unclaimed(self) -> None:
        """After `migrate-continue` the guest is the destination's, unless the destination
        provably never ran it: it is gone without a RESUME (QEMU sends RESUME before running
        the guest, and the socket delivers it before the close), or its incoming migration
        failed. Then the paused source still holds the guest's latest state: run it again
        if it ran before, with its capabilities as they were. A destination still loading is
        left alone, and one that ran the guest and is gone took it along (NOWHERE: look first)."""
        rep = self.report
        if self.dst.last_event("RESUME", after=self._resume_mark) is not None:
            rep.guest = GuestHome.NOWHERE if _gone(self.dst) else GuestHome.DESTINATION
            return
        try:
            if (await self.dst.execute("query-status"))["running"]:
                rep.guest = GuestHome.DESTINATION
                return
            status = (await self.dst.query_migrate()).get("status")
        except QemuError:
            status = "failed"
        if status != "failed":
            rep.guest = GuestHome.DESTINATION if status == "completed" else GuestHome.NOWHERE
            return
        await self._each(lambda d: d.abort())
        note = "the destination never ran the guest"
        try:
            running = (await self.src.execute("query-status"))["running"]  # asked also to stay paused: is it there?
            if self._src_was_running and not running:
                await self.src.execute("cont")
        except QemuError as exc:
            rep.guest = GuestHome.NOWHERE
            rep.decision = f"{rep.decision}; {note}, and resuming the source failed: {exc}"
            return
        rep.guest = GuestHome.SOURCE
        rep.decision = f"{rep.decision}; {note}: the source {'runs again' if self._src_was_running else 'stays paused'}"
        try:
            await self._saved[0].restore()
        except QemuError as exc:
            rep.decision = f"{rep.decision}; setting its capabilities back failed: {exc}"

    async def _each(self, step) -> list:
        return await each_device(self.devices, step)

    async def _abort(self) -> None:
        """Before migrate-continue the source still owns the guest: make sure it runs (or
        stays paused, as its user left it), and its devices with it; set both QEMUs'
        capabilities back."""
        self._cancellable = False
        if self._continued:
            return
        problems = [p for p in await each_device(self.devices, lambda d: d.abort()) if p]
        try:
            # Before QEMU's migration started, nothing of ours touched the run state: a guest its
            # user paused meanwhile stays paused.
            resume = self._src_was_running and self._migrating
            await choreography.cancel(self.src, self.options.qmp_timeout_s, resume=resume)
        except Exception as exc:  # noqa: BLE001 - report every failure
            problems.append(f"cancelling on the source failed too: {exc}")
            self.report.guest = GuestHome.NOWHERE
        for saved in self._saved:
            if saved.session.lost or (saved.session is self.dst and self._listening):
                continue  # gone, or told where to listen: QEMU cannot take that back
            try:
                await saved.restore()
            except Exception as exc:  # noqa: BLE001
                problems.append(f"setting {saved.session.socket_path}'s capabilities back failed: {exc}")
        if self._listening:
            problems.append(
                f"the destination {self.dst.socket_path} was already listening for QEMU's stream, and a QEMU "
                "whose incoming migration broke off exits: start a new destination (-incoming defer) to retry"
            )
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
