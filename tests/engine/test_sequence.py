"""The migration's order as a machine: the actions of a clean run, out-of-order events
refused, and the rule that aborts before migrate-continue and sees the handover through after."""

from __future__ import annotations

import pytest

from orchestrator.migration.engine import (
    DowntimePolicy,
    GuestHome,
    MigrationSequence,
    OutOfOrder,
    Phase,
    PrecopyEngine,
)
from orchestrator.migration.engine import sequence as s

PAGE = 4096
CLEAN = {
    s.Prepare: s.Prepared(True),
    s.StartTrackers: s.Started(),
    s.Listen: s.Listening(),
    s.Migrate: s.PreSwitchover(True),
    s.DevicesStopCopy: s.DevicesStopped(),
    s.Verify: s.Verified(True),
    s.LoadDevices: s.DevicesLoaded(),
    s.Continue: s.Continued(),
    s.AwaitCompletion: s.Completed(5.0),
    s.RunDestinationDevices: s.DevicesRunning(),
    s.Cancel: s.Cancelled(),
    s.StopTrackers: s.TrackersStopped(),
    s.GiveBack: s.GivenBack(GuestHome.SOURCE, "the destination never ran the guest"),
}


def machine(**policy) -> MigrationSequence:
    engine = PrecopyEngine(PAGE, DowntimePolicy(**{"downtime_limit_s": 0.3, **policy}))
    return MigrationSequence(engine, total_pages=1024, ram_bytes=1024 * PAGE, verify=True)


def answer(action: s.Action, dirty: list[int]) -> s.Event:
    """A guest whose collects find `dirty` pages in turn (then none), on a 1 GB/s link."""
    match action:
        case s.SendRound0() | s.SendPages():
            return s.Sent(100, 100 * PAGE, 100 * PAGE / 1e9)
        case s.Collect(final=final):
            return s.Collected(0 if final or not dirty else dirty.pop(0), 0, 0.001, 1.0)
    return CLEAN[type(action)]


def run(m: MigrationSequence, dirty: list[int], faults: dict[type, s.Event] | None = None) -> list[str]:
    """Drive to the end; `faults` answers the first action of a type with another event."""
    faults = dict(faults or {})
    done = []
    while (action := m.next_action()) is not None:
        done.append(type(action).__name__ + ("(final)" if getattr(action, "final", False) else ""))
        m.send(faults.pop(type(action), None) or answer(action, dirty))
    return done


def test_a_clean_migration_runs_the_order() -> None:
    m = machine()
    assert run(m, dirty=[10**10 // PAGE, 10]) == [
        "Prepare",
        "StartTrackers",
        "SendRound0",
        "Collect",
        "SendPages",
        "Collect",
        "Listen",
        "Migrate",
        "DevicesStopCopy",
        "Collect(final)",
        "SendPages(final)",
        "Verify",
        "LoadDevices",
        "Continue",
        "AwaitCompletion",
        "RunDestinationDevices",
        "StopTrackers",
    ]
    o = m.outcome
    assert m.phase is Phase.DONE and (o.status, o.guest, o.verified, o.downtime_ms) == (
        "completed",
        GuestHome.DESTINATION,
        True,
        5.0,
    )
    assert "<= limit" in o.decision and len(m.engine.rounds) == 3


def test_out_of_order_events_and_actions_are_refused() -> None:
    m = machine()
    with pytest.raises(OutOfOrder, match="no action pending"):
        m.send(s.Prepared(True))
    assert isinstance(m.next_action(), s.Prepare)
    with pytest.raises(OutOfOrder, match="Prepare is still unanswered"):
        m.next_action()
    with pytest.raises(OutOfOrder, match="Started does not answer Prepare"):
        m.send(s.Started())
    assert issubclass(OutOfOrder, s.EngineError)


@pytest.mark.parametrize("at", [s.Prepare, s.SendRound0, s.Listen, s.Migrate, s.Verify, s.LoadDevices, s.Continue])
def test_a_failure_before_migrate_continue_aborts(at: type) -> None:
    m = machine()
    done = run(m, dirty=[10], faults={at: s.Failed("boom")})
    assert done[-2:] == ["Cancel", "StopTrackers"] if at is not s.Prepare else done == ["Prepare", "Cancel"]
    assert m.phase is Phase.ABORTED and m.outcome.status == "failed" and m.outcome.error == "boom"
    assert m.outcome.guest is GuestHome.SOURCE


def cancel_after_failing(at: type) -> s.Cancel:
    m = machine()
    while not isinstance(action := m.next_action(), s.Cancel):
        m.send(s.Failed("no") if isinstance(action, at) else answer(action, [10]))
    return action


def test_the_abort_resumes_the_source_only_once_qemu_may_have_stopped_it() -> None:
    """Before `migrate` the run state is the user's; a destination told to listen keeps listening."""
    assert cancel_after_failing(s.Listen) == s.Cancel(resume_source=False, dst_listening=False)
    assert cancel_after_failing(s.Migrate) == s.Cancel(resume_source=True, dst_listening=True)
    assert cancel_after_failing(s.DevicesStopCopy) == s.Cancel(resume_source=True, dst_listening=True)


def test_a_failed_handover_gives_the_guest_back() -> None:
    m = machine()
    done = run(m, dirty=[10], faults={s.AwaitCompletion: s.Failed("RESUME never came")})
    assert done[-3:] == ["AwaitCompletion", "GiveBack", "StopTrackers"] and "Cancel" not in done
    o = m.outcome
    assert (o.status, o.guest, o.error) == ("failed", GuestHome.SOURCE, "RESUME never came")
    assert o.decision.endswith("; the destination never ran the guest")


def test_the_caller_cancelling_during_the_handover_is_noted_not_obeyed() -> None:
    m = machine()
    while not isinstance(action := m.next_action(), s.Continue):
        m.send(answer(action, [10]))
    assert not m.cancellable
    m.send(s.CallerCancelled())
    m.send(s.Continued())
    run(m, dirty=[])
    assert m.caller_cancelled and m.outcome.status == "completed" and m.outcome.interrupted == "after migrate-continue"


def test_the_caller_cancelling_in_precopy_aborts() -> None:
    m = machine()
    done = run(m, dirty=[10**9], faults={s.SendPages: s.CallerCancelled()})
    assert done[-2:] == ["Cancel", "StopTrackers"]
    o = m.outcome
    assert (o.status, o.error, o.interrupted) == ("cancelled", "cancelled by the caller", "before migrate-continue")


def test_a_verification_failure_aborts_with_the_pages() -> None:
    m = machine()
    run(m, dirty=[10], faults={s.Verify: s.Verified(False, (5,))})
    o = m.outcome
    assert (o.status, o.verified, o.mismatched_pages) == ("failed", False, [5]) and "source running" in o.decision


def test_a_policy_that_gives_up_cancels() -> None:
    m = machine(downtime_limit_s=1e-9, max_rounds=3)
    done = run(m, dirty=[10**6] * 10)
    assert done[-2:] == ["Cancel", "StopTrackers"] and m.outcome.status == "cancelled"
    assert "round cap 3" in m.outcome.decision
