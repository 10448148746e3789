"""Watching and steering a running `Migration` against the doubles: `info()` every round, the
event stream, a downtime limit changed mid-way, a forced switchover, `cancel()` in every
phase, and what each refuses once its moment has passed."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable

import pytest

from orchestrator.migration.driver import GuestHome, Migration, run_watched
from orchestrator.migration.engine import Decision, DowntimePolicy, Observation, Verdict
from orchestrator.migration.engine.sequence import JobStatus, NotNow
from orchestrator.migration.events import EventName, MigrationEvent
from tests.fakes.rig import NPAGES, OPTIONS, Rig

pytestmark = pytest.mark.timeout(30)
MakeRig = Callable[..., Rig]
#: Precopy that never converges by itself and cancels at its cap: any switchover is the caller's.
STUBBORN = dataclasses.replace(OPTIONS, max_rounds=12, on_limit="cancel")


def on(mig: Migration, name: EventName, act: Callable[[MigrationEvent], None]) -> None:
    mig.listen(lambda ev: act(ev) if ev.name is name else None)


def at_step(mig: Migration, action: str, act: Callable[[], object]) -> None:
    """`act` when the driver begins `action` for the first time."""
    done: list[bool] = []

    def once(ev: MigrationEvent) -> None:
        if ev.data["action"] == action and not done:
            done.append(True)
            act()

    on(mig, EventName.STEP, once)


async def test_info_every_round_follows_the_rounds(make_rig: MakeRig) -> None:
    rig = make_rig()
    mig = rig.migration()
    before = mig.info()
    assert before.status is JobStatus.SETUP and before.ram.remaining == before.ram.total == NPAGES * 4096
    seen = []
    on(mig, EventName.MIGRATION_PASS, lambda ev: seen.append((ev.record, mig.info())))
    rep = await mig.run()
    assert rep.ok and len(seen) == len(rep.rounds)
    for rec, info in seen:
        assert info.ram.dirty_sync_count == rec.round + 1
        assert info.ram.transferred == sum(r.sent_bytes for r in rep.rounds[: rec.round + 1])
        assert info.status in (JobStatus.ACTIVE, JobStatus.PRE_SWITCHOVER)
        assert info.setup_time_ms is not None and info.setup_time_ms <= info.total_time_ms
    end = mig.info()
    assert end.status is JobStatus.COMPLETED and end.downtime_ms == rep.downtime_ms
    assert end.trackers[0].state == "stopped" and end.guest == "destination"
    qmp = end.as_qmp()
    assert qmp["status"] == "completed" and qmp["ram"]["dirty-sync-count"] == len(rep.rounds)
    assert qmp["ram"]["transferred"] == rep.bytes_sent


async def test_the_event_stream_tells_statuses_in_qemus_order(make_rig: MakeRig) -> None:
    rig = make_rig()
    mig = rig.migration()
    stream = mig.subscribe()
    events: list[MigrationEvent] = []

    async def read() -> None:
        events.extend([ev async for ev in stream])

    reader = asyncio.ensure_future(read())
    rep = await mig.run()
    await asyncio.wait_for(reader, 5)
    statuses = [ev.data["status"] for ev in events if ev.name is EventName.MIGRATION]
    assert statuses == ["active", "pre-switchover", "device", "completed"], statuses
    passes = [ev.data["pass"] for ev in events if ev.name is EventName.MIGRATION_PASS]
    assert passes == list(range(len(rep.rounds)))
    decisions = [ev for ev in events if ev.name is EventName.DECISION]
    assert len(decisions) == len(rep.rounds) - 1 and decisions[-1].data["decision"] == "switchover"
    assert [ev.data["action"] for ev in events if ev.name is EventName.STEP][:2] == ["Prepare", "StartTrackers"]
    assert any(ev.name is EventName.TRACKER and ev.data["kind"] == "start" for ev in events)
    harvests = [ev for ev in events if ev.name is EventName.HARVEST]
    assert [h.data["round"] for h in harvests] == list(range(1, len(rep.rounds)))
    assert [h.data["pages"] for h in harvests] == [r.dirty_pages for r in rep.rounds[1:]]
    assert all(len(h.record) == h.data["pages"] for h in harvests)
    # A subscriber that comes late gets the whole story, and the stream ends at once.
    late = [ev async for ev in mig.subscribe(replay=True)]
    assert [e.name for e in late] == [e.name for e in mig.events.history]
    assert all(e.record is None for e in late if e.name is EventName.HARVEST), "no page arrays kept"


async def test_a_lower_limit_mid_way_switches_over_only_once_it_fits(make_rig: MakeRig) -> None:
    rig = make_rig()
    mig = rig.migration(STUBBORN)
    rounds_at_change: list[int] = []

    def relax(ev: MigrationEvent) -> None:
        if ev.data["pass"] == 2:
            mig.set_parameters(downtime_limit_ms=60_000)
            rounds_at_change.append(ev.data["pass"])

    on(mig, EventName.MIGRATION_PASS, relax)
    rep = await mig.run()
    assert rep.ok and rounds_at_change == [2]
    steered = [ev.data for ev in mig.events.history if ev.name is EventName.CONTROL]
    assert steered == [{"command": "set-parameters", "downtime-limit": 60_000}]
    assert "<= limit 60000 ms" in rep.decision
    assert len(rep.rounds) == 4  # round 0, 1, 2; the next collect fits the new limit: the final copy
    assert mig.info().downtime_limit_ms == 60_000


async def test_a_limit_that_never_fits_keeps_iterating(make_rig: MakeRig) -> None:
    """A new limit tighter than any round keeps the migration going to its cap: changing the
    limit is not a switchover."""
    rig = make_rig()
    mig = rig.migration(STUBBORN)
    on(mig, EventName.MIGRATION_PASS, lambda ev: mig.set_parameters(downtime_limit_ms=1e-9))
    rep = await mig.run()
    assert rep.status == "cancelled" and rep.guest is GuestHome.SOURCE and "round cap 12" in rep.decision
    await rig.check_guest_home(rep)


async def test_force_switchover_switches_at_the_next_decision(make_rig: MakeRig) -> None:
    rig = make_rig()
    mig = rig.migration(STUBBORN)
    on(mig, EventName.MIGRATION_PASS, lambda ev: mig.force_switchover() if ev.data["pass"] == 1 else None)
    rep = await mig.run()
    assert rep.ok and "forced by the caller" in rep.decision and len(rep.rounds) == 3


PRECOPY_STEPS = ["Prepare", "StartTrackers", "SendRound0", "Collect", "SendPages"]


@pytest.mark.parametrize("step", PRECOPY_STEPS)
async def test_force_switchover_is_safe_before_the_decision(make_rig: MakeRig, step: str) -> None:
    rig = make_rig()
    mig = rig.migration(STUBBORN)
    at_step(mig, step, mig.force_switchover)
    rep = await mig.run()
    assert rep.ok and rep.guest is GuestHome.DESTINATION and "forced by the caller" in rep.decision


SWITCHOVER_STEPS = ["Listen", "Migrate", "DevicesStopCopy", "Verify", "LoadDevices", "Continue", "AwaitCompletion"]


@pytest.mark.parametrize("step", SWITCHOVER_STEPS)
async def test_steering_after_the_decision_is_refused_not_harmful(make_rig: MakeRig, step: str) -> None:
    rig = make_rig()
    mig = rig.migration()
    refused: list[str] = []

    def steer() -> None:
        for call in (mig.force_switchover, lambda: mig.set_parameters(downtime_limit_ms=500)):
            try:
                call()
            except NotNow as exc:
                refused.append(str(exc))
        mig.set_parameters(max_bandwidth=1 << 30)  # the stream's cap may change at any time

    at_step(mig, step, steer)
    rep = await mig.run()
    assert rep.ok and len(refused) == 2 and all("the migration is" in r for r in refused)
    assert mig.info().max_bandwidth == 1 << 30


@pytest.mark.parametrize("step", [*PRECOPY_STEPS, "Listen"])
async def test_cancel_in_precopy_leaves_the_source_running(make_rig: MakeRig, step: str) -> None:
    rig = make_rig()
    mig = rig.migration()
    at_step(mig, step, lambda: mig.cancel())
    rep = await mig.run()  # returns: the cancellation was the caller's own call
    assert rep.status == "cancelled" and rep.guest is GuestHome.SOURCE and mig.info().status is JobStatus.CANCELLED
    await rig.check_guest_home(rep)


@pytest.mark.parametrize("step", ["Migrate", "DevicesStopCopy", "Verify", "LoadDevices"])
async def test_cancel_in_the_switchover_before_continue_gives_the_source_back(make_rig: MakeRig, step: str) -> None:
    rig = make_rig()
    mig = rig.migration()
    at_step(mig, step, lambda: mig.cancel())
    rep = await mig.run()
    assert rep.status == "cancelled" and rep.guest is GuestHome.SOURCE, rep.error
    assert rep.interrupted == "before migrate-continue"
    await rig.check_guest_home(rep)


@pytest.mark.parametrize("step", ["Continue", "AwaitCompletion", "RunDestinationDevices"])
async def test_cancel_after_continue_finishes_the_handover(make_rig: MakeRig, step: str) -> None:
    rig = make_rig()
    mig = rig.migration()
    at_step(mig, step, lambda: mig.cancel())
    rep = await mig.run()
    assert rep.status == "completed" and rep.guest is GuestHome.DESTINATION
    assert rep.interrupted == "after migrate-continue"
    await rig.check_guest_home(rep)


async def test_cancel_before_run_and_after_the_end(make_rig: MakeRig) -> None:
    rig = make_rig()
    mig = rig.migration()
    assert mig.cancel()
    rep = await mig.run()
    assert rep.status == "cancelled" and rep.guest is GuestHome.SOURCE
    assert not mig.cancel()  # ended: nothing to cancel
    await rig.check_guest_home(rep)


async def test_an_outside_cancellation_is_still_raised(make_rig: MakeRig) -> None:
    """The CLI's signals cancel the task itself: `run()` raises after the abort, as before."""
    rig = make_rig()
    mig = rig.migration()
    task = asyncio.ensure_future(mig.run())
    at_step(mig, "SendPages", task.cancel)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert mig.report.status == "cancelled"


@dataclasses.dataclass(frozen=True)
class HalfSpeed:
    """Asks to throttle the guest to half speed whenever its inner policy continues."""

    inner: DowntimePolicy

    def decide(self, obs: Observation) -> Verdict:
        v = self.inner.decide(obs)
        return Verdict(v.decision, v.reason, v.converged, throttle=0.5) if v.decision is Decision.CONTINUE else v


async def test_a_throttle_without_an_actuator_fails_safely(make_rig: MakeRig) -> None:
    rig = make_rig()
    mig = rig.migration(dataclasses.replace(OPTIONS, custom_policy=HalfSpeed(DowntimePolicy(1e-9, 5))))
    rep = await mig.run()
    assert rep.status == "failed" and rep.guest is GuestHome.SOURCE and "no actuator" in rep.error
    await rig.check_guest_home(rep)


async def test_a_watch_failing_as_it_closes_never_replaces_the_outcome(make_rig: MakeRig) -> None:
    """A trace on a full disk, say: the migration completed, and the report says what failed."""
    closed: list[str] = []

    @contextlib.asynccontextmanager
    async def breaks_on_exit(mig: Migration) -> AsyncIterator[None]:
        yield
        raise OSError(28, "No space left on device")

    @contextlib.asynccontextmanager
    async def closes(mig: Migration) -> AsyncIterator[None]:
        yield
        closed.append("closed")

    rig = make_rig()
    rep = await run_watched(rig.migration(), [closes, breaks_on_exit])
    assert rep.ok and rep.guest is GuestHome.DESTINATION and closed == ["closed"]
    assert rep.watch_errors == ["OSError: [Errno 28] No space left on device"]


async def test_a_watch_that_cannot_start_stops_the_migration_before_anything(make_rig: MakeRig) -> None:
    @contextlib.asynccontextmanager
    async def refuses(mig: Migration) -> AsyncIterator[None]:
        raise OSError(13, "Permission denied")
        yield

    rig = make_rig()
    mig = rig.migration()
    with pytest.raises(OSError, match="Permission denied"):
        await run_watched(mig, [refuses])
    assert mig.info().status is JobStatus.SETUP and not rig.host.journal


async def test_info_after_the_end_stands_still_and_names_a_wrapped_policys_limit(make_rig: MakeRig) -> None:
    from orchestrator.migration.engine.throttling import ThrottlingPolicy

    rig = make_rig()
    wrapped = ThrottlingPolicy(inner=dataclasses.replace(OPTIONS, downtime_limit_ms=40).policy())
    mig = rig.migration(dataclasses.replace(OPTIONS, custom_policy=wrapped))
    assert mig.info().downtime_limit_ms == 40
    mig.set_parameters(downtime_limit_ms=60)
    assert mig.info().downtime_limit_ms == 60
    rep = await mig.run()
    first = mig.info().as_qmp()["total-time"]
    await asyncio.sleep(0.05)
    assert mig.info().as_qmp()["total-time"] == first == round(rep.total_ms)


async def test_a_throttle_that_cannot_be_released_is_said_in_the_report(make_rig: MakeRig) -> None:
    class Stuck:
        def __init__(self) -> None:
            self.levels: list[float] = []

        async def set(self, level: float) -> None:
            self.levels.append(level)

        async def release(self) -> None:
            raise OSError(16, "Device or resource busy")

    rig = make_rig()
    options = dataclasses.replace(STUBBORN, custom_policy=HalfSpeed(DowntimePolicy(1e-9, 4)))
    actuator = Stuck()
    mig = rig.migration(options)
    mig.actuator = actuator
    rep = await mig.run()
    assert actuator.levels == [0.5] and rep.status == "cancelled" and rep.guest is GuestHome.SOURCE
    assert "releasing the throttle failed" in rep.error and "busy" in rep.error
