"""The order of one live migration as a sans-IO machine, in the h11 style.

`next_action()` says what to do; the driver performs it and answers with `send(event)`. The
machine owns the sequence (prepare, trackers, round 0, collect/send rounds, the switchover
steps), the consult of `PrecopyEngine` and its policy, and the one rule that decides every
ending: before `migrate-continue` any failure, lost QEMU or caller cancellation aborts (the
source keeps the guest); once `Continue` is issued the handover is seen through, and a
destination that fails to take the guest gives it back. An event the pending action cannot
produce raises `OutOfOrder`, so a driver and a simulator cannot drift apart silently.

A caller steers a running migration through the machine, never around it: `set_policy`
(a new downtime limit, say) and `request_switchover` take effect at the next decision, and
`job_status` names the phase with QEMU's MigrationStatus values.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from orchestrator.migration.engine.errors import EngineError
from orchestrator.migration.engine.policy import Decision, Policy, Verdict
from orchestrator.migration.engine.precopy import PrecopyEngine
from orchestrator.migration.engine.records import RoundRecord


class OutOfOrder(EngineError):
    """An event that does not answer the pending action, or an action asked for twice."""


class NotNow(EngineError):
    """A caller's request the migration's phase no longer allows (tuning after precopy)."""


class JobStatus(enum.StrEnum):
    """QEMU's MigrationStatus values, for what a management stack already knows how to read."""

    SETUP = "setup"
    ACTIVE = "active"
    PRE_SWITCHOVER = "pre-switchover"  # QEMU stopped the guest; the final copy runs
    DEVICE = "device"  # migrate-continue issued: QEMU moves device state, the destination starts
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    COMPLETED = "completed"
    FAILED = "failed"


class Phase(enum.StrEnum):
    IDLE = "idle"
    PREPARED = "prepared"  # capabilities set on both QEMUs
    PRECOPY = "precopy"  # trackers and devices started; rounds run
    SWITCHING = "switching"  # the policy said switch over; not yet handed over
    HANDED_OVER = "handed over"  # migrate-continue issued: finish whatever arrives
    DONE = "done"
    ABORTING = "aborting"  # before migrate-continue: giving the source its guest back
    ABORTED = "aborted"


class GuestHome(enum.StrEnum):
    """Where the guest runs once the migration has ended: what a caller must know first."""

    DESTINATION = "destination"  # migrated
    SOURCE = "source"  # not migrated: the source has it, running (or paused, as it was)
    NOWHERE = "nowhere"  # a QEMU died or could not be resumed: an operator must look


# -- actions: what the driver must do next ----------------------------------------------------
@dataclass(frozen=True)
class Prepare:
    """Read the source's run state; set capabilities on both QEMUs."""


@dataclass(frozen=True)
class StartTrackers:
    """Start every tracker, then take the devices to PRE_COPY."""


@dataclass(frozen=True)
class SendRound0:
    """Clear the destination's RAM, copy every non-zero page."""


@dataclass(frozen=True)
class Collect:
    """Collect every tracker into the bitmap (`final`: vCPUs and devices stopped)."""

    round: int
    final: bool = False


@dataclass(frozen=True)
class SendPages:
    """Harvest the bitmap and send those pages."""

    final: bool = False


@dataclass(frozen=True)
class Throttle:
    """Take `level` (a share, 0 for none) of the source's vCPU time, as the policy asked."""

    level: float


@dataclass(frozen=True)
class Listen:
    """`migrate-incoming` on the destination: only now, so a failed precopy can be retried."""


@dataclass(frozen=True)
class Migrate:
    """`migrate` on the source, then wait until QEMU stops in pre-switchover."""


@dataclass(frozen=True)
class DevicesStopCopy:
    """Source devices to STOP_COPY, final state read: no DMA after this."""


@dataclass(frozen=True)
class Verify:
    """Compare both RAMs bit for bit (both guests paused)."""


@dataclass(frozen=True)
class LoadDevices:
    """Destination devices RESUMING, state written, STOP."""


@dataclass(frozen=True)
class Continue:
    """`migrate-continue`: from here the guest is the destination's."""


@dataclass(frozen=True)
class AwaitCompletion:
    """Wait for both sides to complete, and for the destination's RESUME if the guest ran."""

    resumes: bool


@dataclass(frozen=True)
class GiveBack:
    """The handover failed: if the destination provably never ran the guest, the source has
    it again (`cont` only if `resume_source`: it ran before), its capabilities set back."""

    resume_source: bool


@dataclass(frozen=True)
class RunDestinationDevices:
    """The guest runs on the destination: its devices too."""


@dataclass(frozen=True)
class Cancel:
    """Abort before migrate-continue: devices back to RUNNING, `migrate_cancel`, the source
    `cont` only if `resume_source`, capabilities set back (not the destination's once it
    listens: QEMU cannot take that back)."""

    resume_source: bool
    dst_listening: bool


@dataclass(frozen=True)
class StopTrackers:
    """Stop every tracker: the last action of every path that started them."""


Action = (
    Prepare
    | StartTrackers
    | SendRound0
    | Collect
    | SendPages
    | Throttle
    | Listen
    | Migrate
    | DevicesStopCopy
    | Verify
    | LoadDevices
    | Continue
    | AwaitCompletion
    | GiveBack
    | RunDestinationDevices
    | Cancel
    | StopTrackers
)


# -- events: what the driver saw ----------------------------------------------------------
@dataclass(frozen=True)
class Prepared:
    src_running: bool


@dataclass(frozen=True)
class Started:
    """Trackers started, devices in PRE_COPY."""


@dataclass(frozen=True)
class Sent:
    pages: int
    bytes: int
    seconds: float
    dirty_pages: int | None = None  # harvested, when more than sent (a skipped final copy)
    elapsed_s: float = 0.0  # since the migration started, when the send ended


@dataclass(frozen=True)
class Throttled:
    pass


@dataclass(frozen=True)
class Collected:
    dirty_pages: int
    device_bytes: int
    collect_s: float
    elapsed_s: float


@dataclass(frozen=True)
class Listening:
    pass


@dataclass(frozen=True)
class PreSwitchover:
    src_running: bool  # QEMU stopped a running guest (else the user had paused it)


@dataclass(frozen=True)
class DevicesStopped:
    pass


@dataclass(frozen=True)
class Verified:
    ok: bool
    pages: tuple[int, ...] = ()  # the mismatched ones


@dataclass(frozen=True)
class DevicesLoaded:
    pass


@dataclass(frozen=True)
class Continued:
    pass


@dataclass(frozen=True)
class Completed:
    downtime_ms: float | None  # None: the guest was paused, nothing to measure


@dataclass(frozen=True)
class GivenBack:
    guest: GuestHome
    note: str = ""


@dataclass(frozen=True)
class DevicesRunning:
    pass


@dataclass(frozen=True)
class Cancelled:
    problems: tuple[str, ...] = ()
    source_lost: bool = False  # cancelling on the source failed: it may not run the guest


@dataclass(frozen=True)
class TrackersStopped:
    pass


@dataclass(frozen=True)
class Failed:
    """The pending action failed."""

    why: str


@dataclass(frozen=True)
class PeerGone:
    """A QEMU died or shut down (`why` names it)."""

    why: str


@dataclass(frozen=True)
class CallerCancelled:
    """The caller (a signal, for the CLI) cancelled while the pending action ran."""


Event = (
    Prepared
    | Started
    | Sent
    | Collected
    | Throttled
    | Listening
    | PreSwitchover
    | DevicesStopped
    | Verified
    | DevicesLoaded
    | Continued
    | Completed
    | GivenBack
    | DevicesRunning
    | Cancelled
    | TrackersStopped
    | Failed
    | PeerGone
    | CallerCancelled
)

#: The event that answers each action when it succeeds.
ANSWERS: dict[type, type] = {
    Prepare: Prepared,
    StartTrackers: Started,
    SendRound0: Sent,
    Collect: Collected,
    SendPages: Sent,
    Throttle: Throttled,
    Listen: Listening,
    Migrate: PreSwitchover,
    DevicesStopCopy: DevicesStopped,
    Verify: Verified,
    LoadDevices: DevicesLoaded,
    Continue: Continued,
    AwaitCompletion: Completed,
    GiveBack: GivenBack,
    RunDestinationDevices: DevicesRunning,
    Cancel: Cancelled,
    StopTrackers: TrackersStopped,
}


class MigrationStatus(enum.StrEnum):
    """How a migration ended (where the guest is, is `GuestHome`)."""

    COMPLETED = "completed"
    CANCELLED = "cancelled"  # by a cap with on_limit cancel, or by the caller
    FAILED = "failed"


@dataclass
class Outcome:
    """What the report says about the ending, decided here so every driver says the same."""

    status: MigrationStatus = MigrationStatus.FAILED
    guest: GuestHome = GuestHome.SOURCE
    decision: str = ""
    error: str | None = None
    verified: bool | None = None
    mismatched_pages: list[int] | None = None
    downtime_ms: float | None = None
    interrupted: str | None = None  # the caller cancelled: before or after migrate-continue


@dataclass
class MigrationSequence:
    """`total_pages`/`ram_bytes`: what round 0 scans (its bandwidth sample is that work)."""

    engine: PrecopyEngine
    total_pages: int
    ram_bytes: int
    verify: bool = False
    phase: Phase = Phase.IDLE
    outcome: Outcome = field(default_factory=Outcome)
    caller_cancelled: bool = False
    _next: Action | None = field(default_factory=Prepare)
    _pending: Action | None = None
    _src_running: bool = False  # until QEMU says: an abort before then must not run a paused guest
    _migrating: bool = False  # `migrate` issued: before that the run state is the user's
    _listening: bool = False
    _trackers: bool = False  # StartTrackers issued: a start in flight may have succeeded
    _continued: bool = False
    _stopped: bool = False  # QEMU stopped the source in pre-switchover
    _forced: bool = False  # the caller asked for the switchover
    _then_send: bool = False  # a Throttle comes before the round the verdict asked for
    _end: Phase = Phase.DONE  # where StopTrackers leads

    def __post_init__(self) -> None:
        self.engine.ram_bytes = self.engine.ram_bytes or self.ram_bytes

    @property
    def cancellable(self) -> bool:
        """False once the handover or an abort began: both must run to their end."""
        return self.phase in (Phase.IDLE, Phase.PREPARED, Phase.PRECOPY, Phase.SWITCHING) and not isinstance(
            self._pending, Continue
        )

    @property
    def finished(self) -> bool:
        return self.phase in (Phase.DONE, Phase.ABORTED)

    @property
    def tunable(self) -> bool:
        """Policy changes and a forced switchover still matter: no switchover decided yet."""
        return self.phase in (Phase.IDLE, Phase.PREPARED, Phase.PRECOPY)

    @property
    def job_status(self) -> JobStatus:
        failed = self.outcome.status is MigrationStatus.FAILED
        match self.phase:
            case Phase.IDLE | Phase.PREPARED:
                return JobStatus.SETUP
            case Phase.PRECOPY:
                return JobStatus.ACTIVE
            case Phase.SWITCHING:
                if isinstance(self._pending, Continue):
                    return JobStatus.DEVICE
                return JobStatus.PRE_SWITCHOVER if self._stopped else JobStatus.ACTIVE
            case Phase.HANDED_OVER:
                return JobStatus.DEVICE
            case Phase.ABORTING:
                return JobStatus.CANCELLING
            case Phase.DONE:
                return JobStatus.COMPLETED if self.outcome.status is MigrationStatus.COMPLETED else JobStatus.FAILED
        return JobStatus.FAILED if failed else JobStatus.CANCELLED

    def set_policy(self, policy: Policy) -> None:
        """Decide with `policy` from the next collect on (`NotNow` once a switchover is decided)."""
        if not self.tunable:
            raise NotNow(f"the policy cannot change now: the migration is {self.job_status.value}")
        self.engine.policy = policy

    def request_switchover(self) -> None:
        """Switch over at the next decision whatever the expected downtime (`NotNow` once a
        switchover or an abort is under way)."""
        if not self.tunable:
            raise NotNow(f"no switchover to force: the migration is {self.job_status.value}")
        self._forced = True

    def next_action(self) -> Action | None:
        """The action to perform now (None: finished). Each must be answered before the next."""
        if self._pending is not None:
            raise OutOfOrder(f"{type(self._pending).__name__} is still unanswered")
        self._pending, self._next = self._next, None
        if isinstance(self._pending, Migrate):
            self._migrating = True  # from here QEMU may stop the guest: an abort must give it back
        elif isinstance(self._pending, StartTrackers):
            self._trackers = True
        return self._pending

    def send(self, event: Event) -> RoundRecord | None:
        """Take what the driver saw; returns the round a `Sent` completed."""
        pending = self._pending
        if pending is None:
            raise OutOfOrder(f"{type(event).__name__} with no action pending ({self.phase.value})")
        if isinstance(event, (CallerCancelled, PeerGone)) and not self.cancellable:
            # The pending action runs to its end and is answered as usual; a lost QEMU shows
            # in that answer (the handover's own waits see it, an abort reports it).
            self.caller_cancelled |= isinstance(event, CallerCancelled)
            return None
        if isinstance(event, (Failed, PeerGone, CallerCancelled)):
            self._pending = None
            self._interrupted(pending, event)
            return None
        if not isinstance(event, ANSWERS[type(pending)]):
            raise OutOfOrder(f"{type(event).__name__} does not answer {type(pending).__name__} ({self.phase.value})")
        self._pending = None
        return self._answered(pending, event)

    # -- transitions ----------------------------------------------------------------------
    def _where(self) -> str:
        return "after migrate-continue" if self._continued else "before migrate-continue"

    def _abort(self, status: MigrationStatus) -> None:
        self.phase, self.outcome.status = Phase.ABORTING, status
        self._next = Cancel(self._src_running and self._migrating, self._listening)

    def _stop_trackers_then(self, end: Phase) -> None:
        if self._trackers:
            self._next, self._trackers, self._end = StopTrackers(), False, end
        else:
            self._finish(end)

    def _finish(self, end: Phase) -> None:
        self.phase, self._next = end, None
        if self.caller_cancelled and self.outcome.interrupted is None:
            self.outcome.interrupted = self._where()

    def _interrupted(self, pending: Action, event: Failed | PeerGone | CallerCancelled) -> None:
        o = self.outcome
        if isinstance(event, CallerCancelled):
            self.caller_cancelled = True
            o.interrupted = self._where()
            o.error = "cancelled by the caller"
            self._abort(MigrationStatus.CANCELLED)
            return
        why = event.why
        if isinstance(pending, StopTrackers):
            o.error = f"{o.error or 'stopping the trackers'}; {why}"
            self._finish(self._end)
        elif isinstance(pending, Cancel):  # the abort goes on: say what failed in it
            self._answered(pending, Cancelled((why,)))
        elif self.phase is Phase.HANDED_OVER:
            o.status, o.error = MigrationStatus.FAILED, why
            if isinstance(pending, AwaitCompletion):
                self._next = GiveBack(self._src_running)
            else:
                self._stop_trackers_then(Phase.DONE)
        else:
            o.error = why
            self._abort(MigrationStatus.FAILED)

    def _answered(self, pending: Action, event: Event) -> RoundRecord | None:
        o = self.outcome
        match pending, event:
            case Prepare(), Prepared(src_running=running):
                self._src_running, self.phase, self._next = running, Phase.PREPARED, StartTrackers()
            case StartTrackers(), Started():
                self.phase, self._next = Phase.PRECOPY, SendRound0()
            case SendRound0(), Sent():
                rec = self.engine.record_round(
                    self.total_pages, event.pages, event.bytes, event.seconds, self.ram_bytes, event.elapsed_s
                )
                self._next = Collect(len(self.engine.rounds))
                return rec
            case Collect(final=False), Collected():
                self._consult(event)
            case Collect(final=True), Collected():
                self._next = SendPages(final=True)
            case SendPages(final=final), Sent():
                dirty = event.pages if event.dirty_pages is None else event.dirty_pages
                rec = self.engine.record_round(dirty, event.pages, event.bytes, event.seconds, ended_s=event.elapsed_s)
                if not final:
                    self._next = Collect(len(self.engine.rounds))
                else:
                    self._next = Verify() if self.verify else LoadDevices()
                return rec
            case Throttle(level=level), Throttled():
                self.engine.throttle = level
                if self._then_send:
                    self._then_send, self._next = False, SendPages()
            case Listen(), Listening():
                self._listening, self._next = True, Migrate()
            case Migrate(), PreSwitchover(src_running=running):
                self._src_running, self._next = running, DevicesStopCopy()  # the truth from here on
                self._stopped = True
            case DevicesStopCopy(), DevicesStopped():
                self._next = Collect(len(self.engine.rounds), final=True)
            case Verify(), Verified(ok=True):
                o.verified, o.mismatched_pages, self._next = True, [], LoadDevices()
            case Verify(), Verified(pages=pages):
                o.verified, o.mismatched_pages = False, list(pages)
                o.error = f"verification found {len(pages)} mismatched pages (first: {list(pages[:8])})"
                source = "running" if self._src_running else "stays paused"
                o.decision = f"{o.decision}; {o.error}: cancelled, source {source}"
                self._abort(MigrationStatus.FAILED)
            case LoadDevices(), DevicesLoaded():
                self._next = Continue()
            case Continue(), Continued():
                self._continued, self.phase, self._next = True, Phase.HANDED_OVER, AwaitCompletion(self._src_running)
            case AwaitCompletion(), Completed(downtime_ms=downtime):
                o.status, o.guest, o.downtime_ms = MigrationStatus.COMPLETED, GuestHome.DESTINATION, downtime
                self._next = RunDestinationDevices()
            case GiveBack(), GivenBack(guest=guest, note=note):
                o.guest = guest
                if note:
                    o.decision = f"{o.decision}; {note}"
                if guest is GuestHome.DESTINATION:
                    self._next = RunDestinationDevices()
                else:
                    self._stop_trackers_then(Phase.DONE)
            case RunDestinationDevices(), DevicesRunning():
                self._stop_trackers_then(Phase.DONE)
            case Cancel(), Cancelled(problems=problems, source_lost=lost):
                if problems:
                    o.error = "; ".join([o.error or "abort", *problems])
                if lost:
                    o.guest = GuestHome.NOWHERE
                self._stop_trackers_then(Phase.ABORTED)
            case StopTrackers(), TrackersStopped():
                self._finish(self._end)
            case _:
                raise OutOfOrder(f"{type(event).__name__} does not answer {pending}")
        return None

    def _consult(self, c: Collected) -> None:
        verdict = self.engine.next_step(c.dirty_pages, c.device_bytes, c.elapsed_s, c.collect_s)
        if self._forced and verdict.decision is not Decision.SWITCHOVER:
            dt = self.engine.observation.expected_downtime_s * 1e3 if self.engine.observation else float("inf")
            verdict = Verdict(Decision.SWITCHOVER, f"switchover forced by the caller (expected downtime {dt:.1f} ms)")
            self.engine.verdict = verdict
        if verdict.decision is Decision.CONTINUE:
            if verdict.throttle is not None and verdict.throttle != self.engine.throttle:
                self._next, self._then_send = Throttle(verdict.throttle), True
            else:
                self._next = SendPages()
            return
        self.outcome.decision = verdict.reason
        if verdict.decision is Decision.SWITCHOVER:
            self.phase, self._next = Phase.SWITCHING, Listen()
        else:
            self._abort(MigrationStatus.CANCELLED)
