"""The recovery machine without threads: every decision on virtual time, and a property that
no sequence of events loses a dirty bit."""

from __future__ import annotations

import enum

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.trackers import Recovery, RecoveryPolicy, Step, TrackerState, TrackerStats
from orchestrator.trackers.recovery import RecoveryOrderError

POLICY = RecoveryPolicy(max_restarts=2, backoff_initial=1.0, backoff_max=4.0)


def machine() -> Recovery:
    return Recovery(TrackerStats("t", "scripted", 4096), POLICY)


def test_a_failed_report_marks_then_restarts_after_the_back_off() -> None:
    m = machine()
    assert not m.started(tracked=True).mark
    assert m.plan(0.0, final=False, busy=False) is Step.COLLECT
    v = m.collect_failed(now=10.0)
    assert v.mark and v.state is TrackerState.DEGRADED and v.retry_in == 1.0
    assert m.plan(10.5, final=False, busy=False) is Step.MARK, "back-off not elapsed"
    assert m.plan(11.0, final=False, busy=False) is Step.RESTART
    v = m.restarted(tracked=True)
    assert v.mark and v.state is TrackerState.RUNNING, "writes before the new START were logged nowhere"
    assert m.plan(12.0, final=False, busy=False) is Step.COLLECT
    s = m.stats
    assert (s.errors, s.fallbacks, s.restarts, s.reports) == (1, 3, 1, 0)


def test_back_off_doubles_up_to_its_cap_then_gives_up() -> None:
    m = machine()
    assert m.start_failed(now=0.0).retry_in == 1.0
    assert m.restart_failed(now=1.0).retry_in == 2.0
    assert m.restart_failed(now=3.0).retry_in == 4.0
    v = m.restart_failed(now=7.0)
    assert v.mark and v.state is TrackerState.PERMA_DIRTY and v.retry_in is None
    assert m.plan(100.0, final=False, busy=False) is Step.MARK, "never restarted again"


def test_a_busy_tracker_and_the_final_round_are_never_restarted() -> None:
    m = machine()
    m.start_failed(now=0.0)
    assert m.plan(50.0, final=False, busy=True) is Step.MARK
    assert m.plan(50.0, final=True, busy=False) is Step.MARK
    assert m.plan(50.0, final=False, busy=False) is Step.RESTART


def test_a_start_that_tracks_nothing_is_perma_dirty() -> None:
    m = machine()
    assert m.started(tracked=False).state is TrackerState.PERMA_DIRTY
    assert m.plan(0.0, final=False, busy=False) is Step.MARK


def test_out_of_order_events_are_refused() -> None:
    m = machine()
    with pytest.raises(RecoveryOrderError, match="collected while stopped"):
        m.collected()
    m.started(tracked=True)
    with pytest.raises(RecoveryOrderError, match="restarted while running"):
        m.restarted(tracked=True)
    m.stopped()
    with pytest.raises(RecoveryOrderError, match="plan while stopped"):
        m.plan(0.0, final=False, busy=False)


class Outcome(enum.Enum):
    OK = "ok"
    OK_UNTRACKED = "ok, nothing tracked"
    FAILED = "failed"
    TIMED_OUT = "timed out"  # the call stays in flight for a while


@settings(max_examples=300, deadline=None)
@given(
    start=st.sampled_from(Outcome),
    rounds=st.lists(st.tuples(st.sampled_from(Outcome), st.integers(0, 3), st.integers(0, 3)), max_size=30),
)
def test_no_sequence_of_events_loses_a_dirty_bit(start: Outcome, rounds: list[tuple[Outcome, int, int]]) -> None:
    """A model of the tracker, independent of the machine: it logs writes only between a
    START that tracks something and the next failure, and a failed report may have lost
    everything since the last good one. Writes happen between any two steps. After each
    round (the harvest), every write before the round's last step must be in a report or
    under a mark; writes after it belong to the next round."""
    m = machine()
    now, step_no = 0.0, 0
    logging = False
    lost_since: int | None = None  # first step after which writes are in no report or mark
    accounted = 0  # last step up to which every write is in the bitmap
    busy_until = -1.0

    def at_step(event_logging: bool) -> None:
        nonlocal step_no, logging, lost_since
        step_no += 1
        logging = event_logging
        if not logging and lost_since is None:
            lost_since = step_no

    def apply(mark: bool) -> None:
        nonlocal lost_since, accounted
        if mark:
            accounted = step_no
            lost_since = None if logging else step_no

    def failed(outcome: Outcome, verdict) -> None:
        nonlocal busy_until, lost_since
        if outcome is Outcome.TIMED_OUT:
            busy_until = now + 2.5
        lost_since = accounted if lost_since is None else min(lost_since, accounted)  # the call may have eaten it
        at_step(False)
        apply(verdict(now).mark)

    def started(outcome: Outcome, ok, verdict) -> None:
        if outcome in (Outcome.OK, Outcome.OK_UNTRACKED):
            at_step(outcome is Outcome.OK)
            apply(ok(outcome is Outcome.OK).mark)
        else:
            failed(outcome, verdict)

    started(start, m.started, m.start_failed)
    accounted = step_no  # round 0 copies every page after the start
    for i, (outcome, dt, final_flag) in enumerate(rounds):
        now += dt
        final = final_flag == 0 and i == len(rounds) - 1
        busy = now < busy_until
        step = m.plan(now, final=final, busy=busy)
        if step is Step.COLLECT:
            assert logging, "collected a tracker that is not logging"
            if outcome in (Outcome.OK, Outcome.OK_UNTRACKED):
                at_step(True)
                m.collected()
                if lost_since is None:
                    accounted = step_no
            else:
                failed(outcome, m.collect_failed)
        elif step is Step.RESTART:
            assert not busy and not final
            at_step(False)  # STOP
            started(outcome, m.restarted, m.restart_failed)
        else:
            at_step(logging)
            apply(True)
        assert lost_since is None or lost_since == step_no, f"round {i}: writes after step {lost_since} lost"
