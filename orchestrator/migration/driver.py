"""One live migration: the I/O of every step the engine's `MigrationSequence` asks for.

The order (architecture: "How a migration runs") is the sequence machine's: prepare both
QEMUs, start trackers, round 0, collect/send rounds as the policy says, the switchover steps,
and the rule that aborts before `migrate-continue` and sees the handover through after it.
`Migration` performs each action it is given (QEMU, devices, trackers, the page sink, the
clock) and answers with what it saw; it decides nothing about the order itself. Signals
(the caller cancelling) and a QEMU that dies or shuts down become events like any failure;
actions the machine marks uncancellable (the handover, an abort) run to their end first.

While it runs, a caller reads `info()`, watches `events` (listeners or `subscribe()`) and
steers it: `set_parameters`, `force_switchover`, `cancel`; each is safe in every phase and
goes through the sequence machine, which refuses what its phase no longer allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from orchestrator.dirty.bitmap import DirtyBitmap
from orchestrator.migration.attach import Endpoints
from orchestrator.migration.devices import DeviceMigration, DeviceReport, each_device
from orchestrator.migration.engine import (
    DowntimePolicy,
    GuestHome,
    MigrationSequence,
    MigrationStatus,
    OnLimit,
    Outcome,
    Policy,
    PrecopyEngine,
    RoundRecord,
)
from orchestrator.migration.engine import sequence as seq
from orchestrator.migration.engine.policy import downtime_limit_of, with_downtime_limit
from orchestrator.migration.engine.sequence import NotNow
from orchestrator.migration.events import EventHub, EventName, EventStream, Listener, decision_data
from orchestrator.migration.info import MigrationInfo, RamInfo
from orchestrator.migration.throttle import Actuator
from orchestrator.qemu import choreography
from orchestrator.qemu.errors import QemuError
from orchestrator.qemu.peer import QmpPeer
from orchestrator.trackers import RecoveryPolicy, Tracker, TrackerEvent, TrackerSet, TrackerStats


def _plain(items: list[tuple[str, Any]]) -> dict[str, Any]:
    return {k: v.value if isinstance(v, enum.Enum) else v for k, v in items}


def _gone(session: QmpPeer) -> bool:
    return session.lost or session.last_event("SHUTDOWN") is not None


def _this_task() -> asyncio.Task[object]:
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("a migration runs in an asyncio task")
    return task


@dataclass(frozen=True)
class MigrationOptions:
    """What a caller can set; the policy's defaults are `DowntimePolicy`'s, in one place."""

    downtime_limit_ms: float = DowntimePolicy.downtime_limit_s * 1e3
    max_rounds: int = DowntimePolicy.max_rounds
    max_time_s: float = DowntimePolicy.max_time_s
    on_limit: OnLimit = DowntimePolicy.on_limit
    verify: bool = False
    recovery: RecoveryPolicy = RecoveryPolicy()
    qmp_timeout_s: float = 60.0
    device_timeout_s: float = 10.0  # one device state call (a hung device fails the migration)
    skip_final_copy: bool = False  # fault hook for negative controls: verification must catch it
    #: Another policy than the downtime rule these numbers make (experiments, management stacks).
    custom_policy: Policy | None = None

    def policy(self) -> Policy:
        if self.custom_policy is not None:
            return self.custom_policy
        return DowntimePolicy(self.downtime_limit_ms / 1e3, self.max_rounds, self.max_time_s, self.on_limit)


@dataclass
class MigrationReport:
    status: MigrationStatus = MigrationStatus.FAILED
    guest: GuestHome = GuestHome.SOURCE
    verified: bool | None = None
    total_ms: float = 0.0
    downtime_ms: float | None = None
    decision: str = ""
    pages_sent: int = 0
    bytes_sent: int = 0
    rounds: list[RoundRecord] = field(default_factory=list)
    trackers: list[TrackerStats] = field(default_factory=list)  # each tracker's counters at the end
    events: list[TrackerEvent] = field(default_factory=list)
    mismatched_pages: list[int] | None = None
    devices: list[DeviceReport] = field(default_factory=list)
    error: str | None = None
    #: Set when the caller cancelled (a signal, for the CLI): the phase it arrived in.
    interrupted: str | None = None
    #: What failed in a watch (trace, metrics, control socket, progress) as it closed: the
    #: migration's outcome stands, these are said beside it.
    watch_errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data: records as objects, enums as their values."""
        return asdict(self, dict_factory=_plain)

    @property
    def ok(self) -> bool:
        return self.status is MigrationStatus.COMPLETED and self.verified is not False


#: Something that watches a migration while it runs (a trace, metrics, a control socket, a
#: progress display): entered before `run()`, left after it, on every exit path.
Watch = Callable[["Migration"], contextlib.AbstractAsyncContextManager[object]]


class Migration:
    def __init__(
        self,
        endpoints: Endpoints,
        trackers: Sequence[Tracker],
        uri: str,
        options: MigrationOptions = MigrationOptions(),
        on_round: Callable[[RoundRecord], None] | None = None,
        on_event: Callable[[TrackerEvent], None] | None = None,
        devices: Sequence[DeviceMigration] = (),
        actuator: Actuator | None = None,
    ) -> None:
        """`endpoints` is what `attach` checked and mapped; `uri` where the source's QEMU
        sends its device state to the destination's. `on_round`/`on_event` are shorthands
        for listeners of rounds and tracker events; `actuator` throttles the source's vCPUs
        when the policy asks (without one, a policy's throttle request fails the migration)."""
        src, dst, layout, sink = endpoints.src, endpoints.dst, endpoints.layout, endpoints.sink
        self.src, self.dst, self.layout, self.sink, self.uri = src, dst, layout, sink, uri
        self.options = options
        self._t0 = 0.0
        self.events = EventHub(lambda: self._elapsed() if self._t0 else 0.0)
        if on_round is not None:
            self.events.listen(lambda ev: on_round(ev.record) if ev.name is EventName.MIGRATION_PASS else None)  # type: ignore[arg-type]
        if on_event is not None:
            self.events.listen(lambda ev: on_event(ev.record) if ev.name is EventName.TRACKER else None)  # type: ignore[arg-type]
        self.bitmap = DirtyBitmap(layout.npages, layout.page_size)
        self.engine = PrecopyEngine(layout.page_size, options.policy())
        self.trackers = TrackerSet(trackers, self.bitmap, layout, options.recovery, self._tracker_event)
        self.actuator = actuator
        self.devices = list(devices)
        for d in self.devices:
            d.timeout_s = options.device_timeout_s
        self.report = MigrationReport()
        self.sequence = MigrationSequence(
            self.engine, layout.npages, sum(r.length for r in layout.regions), options.verify
        )
        self._status = self.sequence.job_status
        self._run_task: asyncio.Task[object] | None = None
        self._cancel_requested = False  # cancel() was called: run() returns, it does not raise
        self._setup_ms: float | None = None
        self._dirty_rate = 0.0
        self._last_collect_s = 0.0
        self._saved: tuple[choreography.SavedCapabilities, ...] = ()
        self._death: str | None = None  # which QEMU died or shut down, and how
        self._watch_cancelled = False  # the peer watch, not the caller, cancelled the run
        self._resume_mark = 0

    def _elapsed(self) -> float:
        return time.monotonic() - self._t0

    # -- watching and steering ------------------------------------------------------------
    def listen(self, listener: Listener) -> None:
        """Call `listener` with every event, on the loop's thread (it must not block)."""
        self.events.listen(listener)

    def subscribe(self, maxsize: int = 1024, replay: bool = False) -> EventStream:
        """An async iterator of events (`replay`: from the first), ending with the migration."""
        return self.events.subscribe(maxsize, replay)

    def info(self) -> MigrationInfo:
        """Where the migration is now; safe at any moment, before, during and after `run()`."""
        sq, eng, o = self.sequence, self.engine, self.sequence.outcome
        done = len(eng.rounds)
        sent_pages = sum(r.sent_pages for r in eng.rounds)
        page = self.layout.page_size
        obs = eng.observation
        limit = downtime_limit_of(eng.policy)
        ended = self.sequence.finished and self.report.total_ms > 0
        return MigrationInfo(
            status=sq.job_status,
            phase=sq.phase.value,
            total_time_ms=self.report.total_ms if ended else self._elapsed() * 1e3 if self._t0 else 0.0,
            setup_time_ms=self._setup_ms,
            expected_downtime_ms=None if obs is None or not eng.bandwidth_bps else obs.expected_downtime_s * 1e3,
            downtime_ms=o.downtime_ms,
            ram=RamInfo(
                transferred=sum(r.sent_bytes for r in eng.rounds),
                remaining=(self.bitmap.count() if done else self.layout.npages) * page,
                total=self.layout.npages * page,
                normal=sent_pages,
                page_size=page,
                dirty_pages_rate=self._dirty_rate,
                dirty_sync_count=done,
                mbps=eng.bandwidth_bps * 8 / 1e6,
            ),
            downtime_limit_ms=None if limit is None else limit * 1e3,
            max_bandwidth=self.sink.max_bandwidth,
            throttle=eng.throttle,
            decision=o.decision or (eng.verdict.reason if eng.verdict else ""),
            guest=o.guest.value,
            error=o.error,
            trackers=tuple(replace(s) for s in self.trackers.stats()),
        )

    def set_parameters(self, downtime_limit_ms: float | None = None, max_bandwidth: float | None = None) -> None:
        """QEMU's `migrate-set-parameters` for this migration: a new downtime limit counts
        from the next decision (`NotNow` once the switchover is decided); a bandwidth cap
        (bytes per second, 0 lifts it) applies to the page stream from its next frame."""
        if max_bandwidth is not None and max_bandwidth < 0:
            raise ValueError(f"a bandwidth cap must be positive (0 lifts it), got {max_bandwidth}")
        if downtime_limit_ms is not None:
            self.sequence.set_policy(with_downtime_limit(self.engine.policy, downtime_limit_ms / 1e3))
        if max_bandwidth is not None:
            self.sink.set_max_bandwidth(max_bandwidth or None)
        changed = {"downtime-limit": downtime_limit_ms, "max-bandwidth": max_bandwidth}
        self._steered("set-parameters", {k: v for k, v in changed.items() if v is not None})

    def force_switchover(self) -> None:
        """Switch over at the next decision whatever the expected downtime (`NotNow` after)."""
        self.sequence.request_switchover()
        self._steered("force-switchover")

    def cancel(self) -> bool:
        """Abort as a signal would: before `migrate-continue` the source keeps the guest;
        past it the handover is finished first. `run()` then returns the report (it raises
        only a cancellation that came from outside). False once the migration has ended."""
        if self.sequence.finished:
            return False
        if not self._cancel_requested:
            self._cancel_requested = True
            self._steered("cancel")
            if self._run_task is not None:
                self._run_task.cancel()
        return True

    def _steered(self, command: str, data: dict[str, Any] | None = None) -> None:
        """What a caller changed, for the watchers (a trace replays a steered run with it)."""
        self.events.emit(EventName.CONTROL, {"command": command, **(data or {})})

    def _tracker_event(self, ev: TrackerEvent) -> None:
        self.events.emit(EventName.TRACKER, _plain(list(asdict(ev).items())), ev)

    def _observe(self, action: seq.Action, rec: RoundRecord | None) -> None:
        """Tell listeners what the last answered action changed."""
        if rec is not None:
            self.events.emit(EventName.MIGRATION_PASS, {"pass": rec.round, **asdict(rec)}, rec)
        if isinstance(action, seq.Collect) and not action.final and self.engine.observation is not None:
            obs, v = self.engine.observation, self.engine.verdict
            gap = obs.elapsed_s - self._last_collect_s
            self._dirty_rate = obs.pending_pages / gap if gap > 0 else 0.0
            self._last_collect_s = obs.elapsed_s
            if v is not None:
                self.events.emit(EventName.DECISION, decision_data(obs, v), v)
        status = self.sequence.job_status
        if status is not self._status:
            self._status = status
            if status is seq.JobStatus.ACTIVE and self._setup_ms is None:
                self._setup_ms = self._elapsed() * 1e3
            self.events.emit(EventName.MIGRATION, {"status": status.value})

    async def run(self) -> MigrationReport:
        """Migrate, and return the report. A cancellation by the caller (the CLI's signals)
        aborts like a failure before `migrate-continue` and is raised again afterwards; once
        past it the switchover is finished first. Either way `report` tells the outcome."""
        self._t0 = time.monotonic()
        self._run_task = _this_task()
        watch = asyncio.ensure_future(self._watch_peers(self._run_task))
        try:
            if self._cancel_requested:
                self._run_task.cancel()
            while (action := self.sequence.next_action()) is not None:
                fields_ = _plain(list(asdict(action).items()))
                self.events.emit(EventName.STEP, {"action": type(action).__name__, **fields_}, action)
                rec = self.sequence.send(await self._step(action))
                self._observe(action, rec)
        finally:
            watch.cancel()
            if self.actuator is not None and (problem := await self._release_throttle()):
                o = self.sequence.outcome
                o.error = problem if o.error is None else f"{o.error}; {problem}"
            self._finish()
            self.events.close()
        if self.sequence.caller_cancelled:
            if self._cancel_requested and self._run_task.uncancel() == 0:
                return self.report  # cancel()'s own: the report says so
            raise asyncio.CancelledError
        return self.report

    async def _step(self, action: seq.Action) -> seq.Event:
        """Perform one action; a failure, the caller's cancellation or a lost QEMU is the event."""
        if not self.sequence.cancellable:
            return await self._to_the_end(action)
        try:
            return await self._perform(action)
        except asyncio.CancelledError:
            if not self._watch_cancelled:
                return seq.CallerCancelled()
            _this_task().uncancel()  # ours, from the peer watch: a failure like any
            return seq.PeerGone(self._death or "a QEMU is gone")
        except Exception as exc:
            return seq.Failed(f"{type(exc).__name__}: {exc}")

    async def _to_the_end(self, action: seq.Action) -> seq.Event:
        """Perform `action` to its end even when the caller cancels meanwhile (the machine is
        told, and the cancellation raised once the migration has ended): a guest half handed
        over, or an abort cut short, could leave it running nowhere."""
        task = asyncio.ensure_future(self._perform(action))
        while True:
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                self.sequence.send(seq.CallerCancelled())
            except Exception as exc:
                return seq.Failed(f"{type(exc).__name__}: {exc}")

    async def _watch_peers(self, run: asyncio.Task) -> None:
        """The first QEMU to die or shut down fails the migration at once (cancelling `run`)
        instead of surfacing as a timeout; past `migrate-continue` the switchover's own waits
        see it."""
        sides = {
            asyncio.ensure_future(s.wait_gone()): (name, s)
            for name, s in (("source", self.src), ("destination", self.dst))
        }
        try:
            done, _ = await asyncio.wait(sides, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in sides:
                w.cancel()
        first = next(iter(done))
        name, session = sides[first]
        self._death = f"the {name} QEMU ({session.socket_path}) {first.result()}"
        if self.sequence.cancellable:
            self._watch_cancelled = True
            run.cancel()

    async def _perform(self, action: seq.Action) -> seq.Event:
        opts = self.options
        match action:
            case seq.Prepare():
                running = (await self.src.execute("query-status"))["running"]
                self._saved = await choreography.prepare(self.src, self.dst)
                return seq.Prepared(running)
            case seq.StartTrackers():
                await self.trackers.start()
                await self._each(lambda d: d.start_precopy())
                return seq.Started()
            case seq.SendRound0():
                t = time.monotonic()
                n, nbytes = await self.sink.send_round0(self.trackers.on_sent)
                return seq.Sent(n, nbytes, time.monotonic() - t, elapsed_s=self._elapsed())
            case seq.Collect(round=round_, final=final):
                t = time.monotonic()
                await self.trackers.collect(round_, final=final)
                collect_s = time.monotonic() - t
                device_bytes = 0 if final else sum(await self._each(lambda d: d.pending_bytes()))
                return seq.Collected(self.bitmap.count(), device_bytes, collect_s, self._elapsed())
            case seq.SendPages(final=final):
                pages = self.bitmap.harvest()
                data = {"round": len(self.engine.rounds), "pages": int(pages.size), "final": final}
                self.events.emit(EventName.HARVEST, data, pages)
                sent = pages[:0] if final and opts.skip_final_copy else pages
                t = time.monotonic()
                nbytes = await self.sink.send_pages(sent, self.trackers.on_sent)
                return seq.Sent(len(sent), nbytes, time.monotonic() - t, len(pages), self._elapsed())
            case seq.Throttle(level=level):
                if self.actuator is None:
                    raise NotNow(f"the policy asked to throttle the guest to {level:.0%} but no actuator was given")
                await self.actuator.set(level)
                return seq.Throttled()
            case seq.Listen():
                await choreography.listen(self.dst, self.uri)
                return seq.Listening()
            case seq.Migrate():
                mark = await choreography.start(self.src, self.uri)
                await choreography.wait_pre_switchover(self.src, opts.qmp_timeout_s, after=mark)
                # QEMU stopped the guest only if it was running then: the truth for what follows.
                return seq.PreSwitchover(self.src.last_event("STOP", after=mark) is not None)
            case seq.DevicesStopCopy():
                await self._each(lambda d: d.stop_copy())  # devices quiesced: no DMA after this
                return seq.DevicesStopped()
            case seq.Verify():
                bad = await self.sink.verify()
                return seq.Verified(not bad.size, tuple(bad.tolist()))
            case seq.LoadDevices():
                await self._each(lambda d: d.resume())
                return seq.DevicesLoaded()
            case seq.Continue():
                self._resume_mark = self.dst.mark()
                await choreography.continue_(self.src)
                return seq.Continued()
            case seq.AwaitCompletion(resumes=resumes):
                sw = await choreography.wait_completed(
                    self.src, self.dst, opts.qmp_timeout_s, resumes=resumes, after=self._resume_mark
                )
                return seq.Completed(None if sw.downtime_ns is None else sw.downtime_ns / 1e6)
            case seq.GiveBack(resume_source=resume):
                return await self._give_back(resume)
            case seq.RunDestinationDevices():
                await self._each(lambda d: d.run_destination())
                return seq.DevicesRunning()
            case seq.Cancel(resume_source=resume, dst_listening=listening):
                return await self._cancel(resume, listening)
            case seq.StopTrackers():
                await self.trackers.stop()
                return seq.TrackersStopped()
        raise TypeError(f"no such action: {action!r}")

    async def _give_back(self, resume: bool) -> seq.GivenBack:
        """After `migrate-continue` the guest is the destination's, unless the destination
        provably never ran it: it is gone without a RESUME (QEMU sends RESUME before running
        the guest, and the socket delivers it before the close), or its incoming migration
        failed. Then the paused source still holds the guest's latest state: run it again
        if it ran before, with its capabilities as they were. A destination still loading is
        left alone, and one that ran the guest and is gone took it along (NOWHERE: look first)."""
        if self.dst.last_event("RESUME", after=self._resume_mark) is not None:
            return seq.GivenBack(GuestHome.NOWHERE if _gone(self.dst) else GuestHome.DESTINATION)
        try:
            if (await self.dst.execute("query-status"))["running"]:
                return seq.GivenBack(GuestHome.DESTINATION)
            status = (await self.dst.query_migrate()).get("status")
        except QemuError:
            status = "failed"
        if status != "failed":
            return seq.GivenBack(GuestHome.DESTINATION if status == "completed" else GuestHome.NOWHERE)
        await self._each(lambda d: d.abort())
        note = "the destination never ran the guest"
        try:
            running = (await self.src.execute("query-status"))["running"]  # asked also to stay paused: is it there?
            if resume and not running:
                await self.src.execute("cont")
        except QemuError as exc:
            return seq.GivenBack(GuestHome.NOWHERE, f"{note}, and resuming the source failed: {exc}")
        note = f"{note}: the source {'runs again' if resume else 'stays paused'}"
        try:
            await self._saved[0].restore()
        except QemuError as exc:
            note = f"{note}; setting its capabilities back failed: {exc}"
        return seq.GivenBack(GuestHome.SOURCE, note)

    async def _each(self, step) -> list:
        return await each_device(self.devices, step)

    async def _release_throttle(self) -> str | None:
        """The guest gets all its vCPU time back (every exit path); a failure is said, not raised."""
        assert self.actuator is not None
        try:
            await self.actuator.release()
        except Exception as exc:
            return f"releasing the throttle failed: {exc}"
        return None

    async def _cancel(self, resume: bool, dst_listening: bool) -> seq.Cancelled:
        """Before migrate-continue the source still owns the guest: make sure it runs (or
        stays paused, as its user left it) at full speed, and its devices with it; set both
        QEMUs' capabilities back. Every step is tried; what failed is reported, not raised."""
        problems = [p for p in await each_device(self.devices, lambda d: d.abort()) if p]
        if self.actuator is not None and (problem := await self._release_throttle()):
            problems.append(problem)
        lost = False
        try:
            await choreography.cancel(self.src, self.options.qmp_timeout_s, resume=resume)
        except Exception as exc:
            problems.append(f"cancelling on the source failed too: {exc}")
            lost = True
        for saved in self._saved:
            if saved.session.lost or (saved.session is self.dst and dst_listening):
                continue  # gone, or told where to listen: QEMU cannot take that back
            try:
                await saved.restore()
            except Exception as exc:
                problems.append(f"setting {saved.session.socket_path}'s capabilities back failed: {exc}")
        if dst_listening:
            problems.append(
                f"the destination {self.dst.socket_path} was already listening for QEMU's stream, and a QEMU "
                "whose incoming migration broke off exits: start a new destination (-incoming defer) to retry"
            )
        return seq.Cancelled(tuple(problems), lost)

    def _finish(self) -> None:
        rep = self.report
        for f in fields(Outcome):
            setattr(rep, f.name, getattr(self.sequence.outcome, f.name))
        rep.total_ms = self._elapsed() * 1e3
        rep.rounds = list(self.engine.rounds)
        rep.pages_sent = sum(r.sent_pages for r in self.engine.rounds)
        rep.bytes_sent = sum(r.sent_bytes for r in self.engine.rounds)
        rep.trackers = [replace(s) for s in self.trackers.stats()]  # copies: the live ones keep counting
        rep.events = list(self.trackers.events)
        rep.devices = [replace(d.report) for d in self.devices]


async def run_watched(mig: Migration, watches: Sequence[Watch] = ()) -> MigrationReport:
    """`mig.run()` with every watch entered first and left afterwards, whatever happens. A
    watch that cannot start stops the migration before it begins (nothing changed yet); one
    that fails while closing never replaces the outcome: its error goes to the report's
    `watch_errors`, and the other watches still close."""
    async with contextlib.AsyncExitStack() as stack:
        for watch in watches:
            await stack.enter_async_context(_closing_safely(watch(mig), mig.report))
        return await mig.run()


@contextlib.asynccontextmanager
async def _closing_safely(
    cm: contextlib.AbstractAsyncContextManager[object], report: MigrationReport
) -> AsyncIterator[object]:
    entered = await cm.__aenter__()
    try:
        yield entered
    except BaseException as exc:
        try:
            suppress = await cm.__aexit__(type(exc), exc, exc.__traceback__)
        except Exception as problem:
            if problem is not exc:
                report.watch_errors.append(f"{type(problem).__name__}: {problem}")
            raise exc from None
        if not suppress:
            raise
    else:
        try:
            await cm.__aexit__(None, None, None)
        except Exception as problem:
            report.watch_errors.append(f"{type(problem).__name__}: {problem}")
