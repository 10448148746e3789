"""Auto-converge (`ThrottlingPolicy`): QEMU's trigger on crafted rounds, its steps and cap,
the inner policy's say over the ending, and on virtual time a guest that does not converge
alone converging once the throttle slows it as (1 - level)."""

from __future__ import annotations

import itertools

import pytest

from orchestrator.migration.engine import Decision, DowntimePolicy, Observation, PolicyError, PrecopyEngine, RoundRecord
from orchestrator.migration.engine.policy import with_downtime_limit
from orchestrator.migration.engine.sequence import (
    Collect,
    Collected,
    MigrationSequence,
    Phase,
    SendPages,
    SendRound0,
    Sent,
    Throttle,
    Throttled,
)
from orchestrator.migration.engine.throttling import ThrottlingPolicy, throttles
from tests.engine.test_engine import ANSWER

PAGE = 4096
SENT = 1000 * PAGE  # what every crafted round sent
#: Never switches over by itself within these tests: the throttle is all there is to see.
STUBBORN = DowntimePolicy(downtime_limit_s=1e-9, max_rounds=1000)


def rounds(*dirty: int) -> tuple[RoundRecord, ...]:
    """Round 0 (all of RAM) then rounds that harvested `dirty` pages, each sending SENT."""
    return tuple(RoundRecord(i, d, SENT // PAGE, SENT, 10.0, 1e8, 1.0) for i, d in enumerate((10_000, *dirty)))


def obs(history: tuple[RoundRecord, ...], pending: int, throttle: float = 0.0) -> Observation:
    return Observation(len(history), pending, PAGE, 0, 1e8, 1.0, rounds=history, throttle=throttle)


HIGH, LOW = 600, 400  # pages dirtied against 1000 sent: above and below the 50% threshold


def test_every_second_high_round_steps_the_throttle() -> None:
    p = ThrottlingPolicy(STUBBORN)
    assert p.decide(obs(rounds(), HIGH)).throttle is None, "one high round is not enough"
    first = p.decide(obs(rounds(HIGH), HIGH))
    assert first.throttle == pytest.approx(0.2) and "throttling the guest to 20%" in first.reason
    assert p.decide(obs(rounds(HIGH, HIGH), HIGH, 0.2)).throttle is None, "the count starts again"
    assert p.decide(obs(rounds(HIGH, HIGH, HIGH), HIGH, 0.2)).throttle == pytest.approx(0.3)


def test_a_low_round_does_not_reset_the_count_and_never_triggers() -> None:
    p = ThrottlingPolicy(STUBBORN)
    assert p.decide(obs(rounds(HIGH), LOW)).throttle is None, "a low round itself never steps"
    assert p.decide(obs(rounds(HIGH, LOW), HIGH)).throttle == pytest.approx(0.2), "as in QEMU: high, low, high"


def test_the_throttle_stops_at_its_maximum() -> None:
    p = ThrottlingPolicy(STUBBORN, maximum=0.5)
    assert p.decide(obs(rounds(HIGH), HIGH, 0.45)).throttle == pytest.approx(0.5)
    assert p.decide(obs(rounds(HIGH), HIGH, 0.5)).throttle is None, "already at the cap: nothing to ask"


def test_tailslow_raises_only_as_far_as_the_threshold_needs() -> None:
    p = ThrottlingPolicy(STUBBORN, tailslow=True)
    # cpu now 0.8; dirty 600 vs threshold 500 -> ideal cpu 0.8 * 500/600, a raise of 0.133 > increment 0.1
    assert p.decide(obs(rounds(HIGH), HIGH, 0.2)).throttle == pytest.approx(0.3)
    # dirty 520 vs 500 -> a raise of 0.8 * (1 - 500/520) = 0.031
    assert p.decide(obs(rounds(520), 520, 0.2)).throttle == pytest.approx(0.2 + 0.8 * (1 - 500 / 520))


def test_the_inner_policy_decides_the_ending() -> None:
    p = ThrottlingPolicy(DowntimePolicy(downtime_limit_s=10.0))
    v = p.decide(obs(rounds(HIGH), HIGH))
    assert v.decision is Decision.SWITCHOVER and v.converged and v.throttle is None
    capped = ThrottlingPolicy(DowntimePolicy(downtime_limit_s=1e-9, max_rounds=2))
    assert capped.decide(obs(rounds(HIGH), HIGH)).decision is Decision.CANCEL


def test_a_downtime_limit_set_later_reaches_the_inner_policy() -> None:
    p = with_downtime_limit(ThrottlingPolicy(STUBBORN), 0.7)
    assert isinstance(p, ThrottlingPolicy) and p.inner.downtime_limit_s == 0.7  # type: ignore[attr-defined]
    assert throttles(p) and not throttles(STUBBORN)


@pytest.mark.parametrize(
    "settings",
    [{"threshold": 0.0}, {"threshold": 1.5}, {"initial": 1.0}, {"increment": 0.0}, {"initial": 0.6, "maximum": 0.5}],
)
def test_settings_it_cannot_work_with_are_refused(settings) -> None:
    with pytest.raises(PolicyError):
        ThrottlingPolicy(**settings)


def simulate(policy, dirty_pps: float, bw_bps: float, total_pages: int):
    """A guest dirtying `dirty_pps` pages a second of its full speed over a link of `bw_bps`,
    on virtual time; a Throttle action slows its dirtying to (1 - level)."""
    engine = PrecopyEngine(page_size=PAGE, policy=policy)
    seq = MigrationSequence(engine, total_pages, total_pages * PAGE)
    t, pending, level, levels = 0.0, total_pages, 0.0, []
    while (action := seq.next_action()) is not None:
        match action:
            case Throttle(level=new):
                level = new
                levels.append(new)
                seq.send(Throttled())
            case SendRound0() | SendPages():
                duration = pending * PAGE / bw_bps
                t += duration
                seq.send(Sent(pending, pending * PAGE, duration, elapsed_s=t))
                pending = min(total_pages, int(dirty_pps * (1 - level) * duration))
            case Collect():
                seq.send(Collected(pending, 0, 0.0, t))
            case _:
                seq.send(ANSWER[type(action)])
    return seq, levels


def test_a_guest_that_does_not_converge_alone_converges_throttled() -> None:
    """Dirtying at 90% of the link: without a throttle every round is as long as the last;
    auto-converge steps the guest down until the last round fits 50 ms."""
    limit = DowntimePolicy(downtime_limit_s=0.05, max_rounds=30)
    args = (0.9 * 1e8 / PAGE, 1e8, 65_536)
    alone, none = simulate(limit, *args)
    assert alone.phase is Phase.ABORTED and alone.outcome.status == "cancelled" and none == []
    throttled, levels = simulate(ThrottlingPolicy(limit), *args)
    assert throttled.phase is Phase.DONE and throttled.outcome.status == "completed", throttled.outcome
    assert levels[0] == pytest.approx(0.2) and levels == sorted(levels) and len(levels) >= 2
    assert all(b - a == pytest.approx(0.1) for a, b in itertools.pairwise(levels))
