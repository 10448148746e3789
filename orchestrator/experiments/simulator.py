"""A migration on a virtual clock: the real `MigrationSequence`, engine and policy, driven as
`migration/driver.py` drives them, with every action answered by the models instead of QEMU.

The simulator keeps two clocks: wall time (what the report and the policy see) and guest time,
which runs (1 - level) as fast while the guest is throttled, so a `Throttle` action scales
the workload's dirty rate exactly as an actuator would. With a `Script` (a recorded run's own
numbers: dirty counts, collect and send times, downtime) the answers are the recorded ones
for as long as the replay follows the recording, and the models' after that. Every step
costs its `StepCosts` time on top of what the link and collect models charge, except while a
recording is followed: its times hold every step's already.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from orchestrator.experiments.model import CollectModel, LinkModel, StepCosts, Workload, step_key
from orchestrator.experiments.trace import Control
from orchestrator.migration.driver import MigrationReport
from orchestrator.migration.engine import MigrationSequence, Outcome, Policy, PrecopyEngine, RoundRecord
from orchestrator.migration.engine import sequence as seq
from orchestrator.migration.engine.policy import with_downtime_limit
from orchestrator.migration.events import EventHub, EventName, Listener, decision_data


@dataclass(frozen=True)
class RecordedCollect:
    """What one precopy collect of a recorded run saw, and when the policy was asked."""

    pending_pages: int
    device_bytes: int
    collect_s: float
    elapsed_s: float


@dataclass(frozen=True)
class Script:
    """A recorded run's own numbers, answered in order while the replay follows them.
    `collects[i]` is the collect after round i; `rounds[i]` is round i as sent."""

    rounds: tuple[RoundRecord, ...]
    collects: tuple[RecordedCollect, ...]
    downtime_ms: float | None = None
    total_ms: float | None = None


@dataclass(frozen=True)
class Scenario:
    """Everything a simulated migration runs against."""

    workload: Workload
    ram_bytes: int
    page_size: int = 4096
    link: LinkModel = field(default_factory=LinkModel)
    collect: CollectModel = field(default_factory=CollectModel)
    steps: StepCosts = field(default_factory=StepCosts)
    device_bytes: int = 0  # device state still to move at every collect
    script: Script | None = None
    #: What a caller did to the recorded run (new limits, caps, a forced switchover, a cancel),
    #: applied when the virtual clock reaches each one's time.
    controls: tuple[Control, ...] = ()


def _plain(items: list[tuple[str, Any]]) -> dict[str, Any]:
    return {k: v.value if isinstance(v, enum.Enum) else v for k, v in items}


#: A control is stamped when its event is emitted, a moment after the step boundary the driver
#: takes it at (the listeners of the step before run first): it applies at the boundary this
#: close before its time.
STEER_SLACK_S = 1e-3


@dataclass
class Simulation:
    """One simulated migration; `run()` returns the report `migrate` would print."""

    scenario: Scenario
    policy: Policy
    now_s: float = 0.0  # wall clock since the start
    guest_s: float = 0.0  # the guest's own clock: slower while throttled
    throttle: float = 0.0
    events: EventHub = field(init=False)
    _scan_guest_s: float = 0.0  # guest time of the last harvest: the next window starts here
    _stop_s: float | None = None  # when QEMU stopped the guest
    _following: bool = True  # the replay still matches the script
    _pending: int = 0  # what the last collect found, for the send that follows
    #: Collected and not yet sent (the bitmap), as page numbers; empty while a recording answers.
    _harvest: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        self._controls = sorted(self.scenario.controls, key=lambda c: c.t)
        self.events = EventHub(lambda: self.now_s)
        sc = self.scenario
        self.engine = PrecopyEngine(sc.page_size, self.policy)
        self.sequence = MigrationSequence(self.engine, sc.ram_bytes // sc.page_size, sc.ram_bytes)
        self._following = sc.script is not None

    def listen(self, listener: Listener) -> None:
        """Every event a real migration would emit, stamped with the virtual clock."""
        self.events.listen(listener)

    def _advance(self, seconds: float) -> None:
        self.now_s += seconds
        if self._stop_s is None:
            self.guest_s += seconds * (1 - self.throttle)

    def _jump(self, to_s: float) -> None:
        """A recorded time: the clocks move to it (never back)."""
        self._advance(max(0.0, to_s - self.now_s))

    def _recorded_collect(self, round_: int) -> RecordedCollect | None:
        script = self.scenario.script
        if not self._following or script is None or round_ - 1 >= len(script.collects):
            self._following = False
            return None
        return script.collects[round_ - 1]

    def _recorded_round(self, round_: int) -> RoundRecord | None:
        script = self.scenario.script
        if not self._following or script is None or round_ >= len(script.rounds):
            self._following = False
            return None
        return script.rounds[round_]

    def _steer(self) -> bool:
        """Apply the controls now due, as the driver would have taken them; True: a cancel
        arrived (the pending action is answered with the caller's cancellation)."""
        cancelled = False
        while self._controls and self._controls[0].t <= self.now_s + STEER_SLACK_S:
            c = self._controls.pop(0)
            sq, data = self.sequence, c.data
            if c.command == "set-parameters":
                if data.get("downtime-limit") is not None and sq.tunable:
                    sq.set_policy(with_downtime_limit(self.engine.policy, float(data["downtime-limit"]) / 1e3))
                if data.get("max-bandwidth") is not None:
                    cap = float(data["max-bandwidth"]) or None
                    self.scenario = replace(self.scenario, link=replace(self.scenario.link, cap_bps=cap))
            elif c.command == "force-switchover" and sq.tunable:
                sq.request_switchover()
            elif c.command == "cancel":
                cancelled = True
        return cancelled

    def run(self) -> MigrationReport:
        sq = self.sequence
        status = sq.job_status
        while (action := sq.next_action()) is not None:
            self.events.emit(
                EventName.STEP, {"action": type(action).__name__, **_plain(list(asdict(action).items()))}, action
            )
            if self._steer():
                cancellable = sq.cancellable
                sq.send(seq.CallerCancelled())  # after migrate-continue only noted, as the driver does
                if cancellable:
                    continue
            rec = sq.send(self._answer(action))
            if rec is not None:
                self.events.emit(EventName.MIGRATION_PASS, {"pass": rec.round, **asdict(rec)}, rec)
            if isinstance(action, seq.Collect) and not action.final:
                self._decided()
            if sq.job_status is not status:
                status = sq.job_status
                self.events.emit(EventName.MIGRATION, {"status": status.value})
        self.events.close()
        return self.report()

    def _decided(self) -> None:
        obs, v = self.engine.observation, self.engine.verdict
        if obs is None or v is None:
            return
        self.events.emit(EventName.DECISION, decision_data(obs, v), v)

    def _spend(self, key: str, modelled_s: float = 0.0) -> None:
        """The rest of a step of `key` whose modelled part took `modelled_s` (already spent)."""
        if not self._following:
            self._advance(self.scenario.steps.spend(key, modelled_s) - modelled_s)

    def _answer(self, action: seq.Action) -> seq.Event:
        name = type(action).__name__
        match action:
            case seq.SendRound0():
                event: seq.Event = self._round0()
            case seq.Collect(round=round_, final=final):
                event = self._collect(round_, final)
            case seq.SendPages(final=final):
                event = self._send(final)
            case seq.AwaitCompletion():
                event = seq.Completed(self._complete())
            case _:
                event = self._fixed(action)
        modelled = event.seconds if isinstance(event, seq.Sent) else 0.0
        if isinstance(event, seq.Collected):
            modelled = event.collect_s
        self._spend(step_key(name, getattr(action, "final", False)), modelled)
        if isinstance(action, seq.Migrate):
            self._stop_s = self.now_s  # QEMU stops the guest as it reaches pre-switchover
        return event

    def _fixed(self, action: seq.Action) -> seq.Event:
        """The answer of a step that has only its fixed cost."""
        match action:
            case seq.Prepare():
                return seq.Prepared(True)
            case seq.StartTrackers():
                self._scan_guest_s = self.guest_s  # tracking starts: the first window opens
                return seq.Started()
            case seq.Throttle(level=level):
                self.throttle = level
                return seq.Throttled()
            case seq.Listen():
                return seq.Listening()
            case seq.Migrate():
                return seq.PreSwitchover(True)
            case seq.DevicesStopCopy():
                return seq.DevicesStopped()
            case seq.LoadDevices():
                return seq.DevicesLoaded()
            case seq.Continue():
                return seq.Continued()
            case seq.RunDestinationDevices():
                return seq.DevicesRunning()
            case seq.Cancel():
                return seq.Cancelled()
            case seq.StopTrackers():
                script = self.scenario.script
                if self._following and script is not None and script.total_ms is not None:
                    self._jump(script.total_ms / 1e3)  # the last step: a followed run ends when it did
                return seq.TrackersStopped()
        raise TypeError(f"the simulator has no answer to {action!r}")

    def _round0(self) -> seq.Sent:
        sc = self.scenario
        if (r0 := self._recorded_round(0)) is not None:
            self._jump(r0.ended_ms / 1e3)
            return seq.Sent(r0.sent_pages, r0.sent_bytes, r0.duration_ms / 1e3, elapsed_s=self.now_s)
        pages = sc.workload.resident_pages()
        took = sc.link.round0_s(pages * sc.page_size, sc.ram_bytes)
        self._advance(took)
        return seq.Sent(pages, pages * sc.page_size, took, elapsed_s=self.now_s)

    def _collect(self, round_: int, final: bool) -> seq.Collected:
        sc = self.scenario
        if not final and (rc := self._recorded_collect(round_)) is not None:
            self._pending, self._harvest = rc.pending_pages, np.zeros(0, np.int64)
            self._jump(rc.elapsed_s)
            self._scan_guest_s = self.guest_s
            return seq.Collected(rc.pending_pages, rc.device_bytes, rc.collect_s, rc.elapsed_s)
        if final and self._following:
            self._following = self._final_recorded(round_)
        if final and self._following:
            script = self.scenario.script
            assert script is not None
            self._pending, self._harvest = script.rounds[round_].dirty_pages, np.zeros(0, np.int64)
            return seq.Collected(self._pending, 0, 0.0, self.now_s)
        # The scan adds what was written since the last one to what is still unsent (the
        # bitmap keeps a switchover's pending pages for the final copy) and starts the next window.
        self._harvest = np.union1d(self._harvest, sc.workload.pages(self._scan_guest_s, self.guest_s))
        self._pending = int(self._harvest.size)
        self._scan_guest_s = self.guest_s
        took = sc.collect.seconds(self._pending, sc.ram_bytes)
        self._advance(took)
        return seq.Collected(self._pending, 0 if final else sc.device_bytes, took, self.now_s)

    def _final_recorded(self, round_: int) -> bool:
        """The recording switched over after the same round: its final copy is this one's."""
        script = self.scenario.script
        return script is not None and len(script.rounds) == round_ + 1 and script.downtime_ms is not None

    def _send(self, final: bool) -> seq.Sent:
        sc = self.scenario
        pages = self._pending
        harvested = {"round": len(self.engine.rounds), "pages": pages, "final": final}
        self.events.emit(EventName.HARVEST, harvested, self._harvest)
        self._harvest = np.zeros(0, np.int64)
        if (rec := self._recorded_round(len(self.engine.rounds))) is not None:
            self._jump(rec.ended_ms / 1e3)
            return seq.Sent(rec.sent_pages, rec.sent_bytes, rec.duration_ms / 1e3, rec.dirty_pages, self.now_s)
        nbytes = pages * sc.page_size + (sc.device_bytes if final else 0)
        took = sc.link.send_s(nbytes)
        self._advance(took)
        return seq.Sent(pages, pages * sc.page_size, took, pages, self.now_s)

    def _complete(self) -> float:
        """Downtime from STOP to RESUME; a followed recording's own figures."""
        script = self.scenario.script
        if self._following and script is not None and script.downtime_ms is not None:
            return script.downtime_ms
        self._advance(self.scenario.steps.resume_s)
        assert self._stop_s is not None
        return (self.now_s - self._stop_s) * 1e3

    def report(self) -> MigrationReport:
        """The same report a real migration makes (no trackers, events or devices to list)."""
        rep = MigrationReport()
        outcome = self.sequence.outcome
        for f in fields(Outcome):
            setattr(rep, f.name, getattr(outcome, f.name))
        rep.total_ms = self.now_s * 1e3
        rep.rounds = list(self.engine.rounds)
        rep.pages_sent = sum(r.sent_pages for r in rep.rounds)
        rep.bytes_sent = sum(r.sent_bytes for r in rep.rounds)
        return rep


def simulate(scenario: Scenario, policy: Policy) -> MigrationReport:
    """One simulated migration of `scenario` under `policy`."""
    return Simulation(scenario, policy).run()
