"""`Migration` against the doubles: the order of its steps, a fault at every step of a
migration (each side failing, dying or shutting down there), the caller cancelling on either
side of migrate-continue, a paused guest, verification failure and a guest given back."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
from collections.abc import Callable

import pytest

from orchestrator.migration.driver import GuestHome, Migration
from orchestrator.qemu.choreography import CAPABILITIES
from orchestrator.vfio import State
from tests.fakes.faults import Act, Fault
from tests.fakes.qemu import changes
from tests.fakes.rig import OPTIONS, Rig, clean_journal, qemu_step

pytestmark = pytest.mark.timeout(30)
MakeRig = Callable[..., Rig]
CONTINUE = "src: migrate-continue"

#: What a running guest's migration does, in order (MIGRATION events and queries left out).
STEPS = [
    "src: migrate-set-capabilities",
    "dst: migrate-set-capabilities",
    "dev.src: PRE_COPY",
    "sink: send_round0",
    "sink: send_pages",
    "sink: send_pages",
    "dst: migrate-incoming",
    "src: migrate",
    "src STOP",
    "dev.src: STOP_COPY",
    "dev.src: STOP",
    "sink: send_pages",
    "sink: verify",
    "dev.dst: RESUMING",
    "dev.dst: STOP",
    CONTINUE,
    "dst RESUME",
    "dev.dst: RUNNING",
]


def key_steps(rig: Rig) -> list[str]:
    return [e for e in changes(rig.host.journal) if " MIGRATION:" not in e]


async def test_a_migration_runs_its_steps_in_order(make_rig: MakeRig) -> None:
    rig = make_rig()
    rep = await rig.migration().run()
    assert rep.status == "completed" and rep.guest is GuestHome.DESTINATION and rep.ok, rep.error
    assert key_steps(rig) == STEPS
    assert rep.verified is True and rep.mismatched_pages == [] and rep.downtime_ms > 0
    assert len(rep.rounds) == 4 and rig.written and (rig.sink.dst == rig.sink.src).all()
    assert rig.device.dst.device_data == rig.device.src.device_data and rep.devices[0].state == "MIGRATED"
    assert rig.src.capabilities == {**dict.fromkeys(CAPABILITIES, True), "postcopy-ram": False}
    await rig.check_guest_home(rep)


async def test_a_paused_guest_migrates_paused(make_rig: MakeRig) -> None:
    rig = make_rig(paused=True)
    rep = await rig.migration().run()
    assert rep.status == "completed" and rep.guest is GuestHome.DESTINATION and rep.downtime_ms is None
    assert key_steps(rig) == [s for s in STEPS if s not in ("src STOP", "dst RESUME")]
    assert not rig.written
    await rig.check_guest_home(rep)


def faults_at_every_step() -> list[pytest.param]:
    """A fault at each step of a clean run (queries and events included), as each thing that
    can happen there: a refusal, the QEMU dying before or after it, shutting down instead."""

    journal = clean_journal()
    params, seen = [], {}
    last_reply = max(i for i, e in enumerate(journal) if e == "dst: query-status")
    for i, entry in enumerate(journal):
        seen[entry] = nth = seen.get(entry, 0) + 1
        if entry.startswith(("sink: ", "dev.")):
            acts = [Act.FAIL] if nth == 1 else []
        elif entry in ("dst MIGRATION:setup", "dst MIGRATION:completed"):  # QEMU cannot fail there
            acts = [a for a in Act if a is not Act.FAIL]
        elif i == last_reply:  # dying after it is dying after the migration
            acts = [a for a in Act if a is not Act.DIE_AFTER]
        else:
            acts = list(Act)
        phase = "before" if i < journal.index(CONTINUE) else "after"
        params += [pytest.param(entry, nth, act, phase, id=f"{entry}#{nth}-{act.value}") for act in acts]
    return params


def rig_failing_at(make_rig: MakeRig, entry: str, nth: int, act: Act) -> Rig:
    if entry.startswith("sink: "):
        return make_rig(sink=[Fault(entry.removeprefix("sink: "), act, nth)])
    if entry.startswith("dev."):
        return make_rig(device=entry.removeprefix("dev.").replace(": ", ":"))
    side, step = qemu_step(entry)
    return make_rig(**{side: [Fault(step, act, nth)]})


@pytest.mark.parametrize("entry,nth,act,phase", faults_at_every_step())
async def test_a_fault_at_any_step_leaves_the_guest_in_one_place(
    make_rig: MakeRig, entry: str, nth: int, act: Act, phase: str
) -> None:
    rig = rig_failing_at(make_rig, entry, nth, act)
    rep = await rig.migration().run()
    await rig.check_guest_home(rep)
    source_ended = entry.startswith("src") and act is not Act.FAIL
    if phase == "before":
        assert rep.status == "failed" and rep.error
        assert rep.guest is (GuestHome.NOWHERE if source_ended else GuestHome.SOURCE), (rep.error, rig.host.journal)
    elif "RESUME" in rig.dst.names():  # the destination ran the guest: never the source as well
        assert rep.guest is not GuestHome.SOURCE and "src: cont" not in rig.host.journal


async def test_a_destination_gone_without_resume_gives_the_guest_back(make_rig: MakeRig) -> None:
    rig = make_rig(dst=[Fault("RESUME", Act.DIE)])
    rep = await rig.migration().run()
    assert rep.status == "failed" and rep.guest is GuestHome.SOURCE
    assert "the destination never ran the guest: the source runs again" in rep.decision
    assert changes(rig.host.journal)[-3:] == ["src: cont", "src RESUME", "src: migrate-set-capabilities"]
    await rig.check_guest_home(rep)


async def test_a_destination_gone_after_resume_is_not_undone(make_rig: MakeRig) -> None:
    rig = make_rig(dst=[Fault("RESUME", Act.DIE_AFTER)])
    rep = await rig.migration().run()
    assert rep.status == "failed" and rep.guest is GuestHome.NOWHERE
    assert "src: cont" not in rig.host.journal and not rig.src.running
    await rig.check_guest_home(rep)


@pytest.mark.parametrize("side", ["src", "dst"])
async def test_a_query_failing_after_resume_leaves_the_guest_running_on_the_destination(
    make_rig: MakeRig, side: str
) -> None:
    """The destination's devices run with it, though the migration is reported failed."""
    rig = make_rig(**{side: [Fault("query-status", Act.FAIL, nth=2 if side == "src" else 1)]})
    rep = await rig.migration().run()
    assert rep.status == "failed" and rep.guest is GuestHome.DESTINATION and "query-status" in rep.error
    assert rig.device.dst.mig_state == State.VFIO_DEVICE_STATE_RUNNING and key_steps(rig) == STEPS
    await rig.check_guest_home(rep)


async def test_verification_failure_gives_the_guest_back(make_rig: MakeRig) -> None:
    rig = make_rig()

    def unseen_write(rec) -> None:
        if rec.round == 1:
            rig.guest.write(5, seen=False)

    rep = await rig.migration(on_round=unseen_write).run()
    assert rep.status == "failed" and rep.verified is False and rep.mismatched_pages == [5]
    assert "source running" in rep.decision and rep.guest is GuestHome.SOURCE
    await rig.check_guest_home(rep)


async def test_skipping_the_final_copy_is_caught(make_rig: MakeRig) -> None:
    rig = make_rig()
    rep = await rig.migration(dataclasses.replace(OPTIONS, skip_final_copy=True)).run()
    assert rep.status == "failed" and rep.mismatched_pages == rig.written[-1:]
    await rig.check_guest_home(rep)


async def test_a_failing_tracker_degrades_and_the_copy_stays_exact(make_rig: MakeRig) -> None:
    rig = make_rig(collect=["ok", errno.EIO])
    rep = await rig.migration().run()
    assert rep.status == "completed" and rep.verified is True, rep.error
    assert rep.trackers[0].errors == 1 and rep.trackers[0].restarts == 1
    await rig.check_guest_home(rep)


def cancel_at(rig: Rig, step: str) -> tuple[asyncio.Task, Migration]:
    """Run the migration and cancel it, as a signal would, when the journal reaches `step`
    (device steps are journalled from worker threads, hence call_soon_threadsafe)."""
    mig = rig.migration()
    task = asyncio.ensure_future(mig.run())
    loop = asyncio.get_running_loop()
    rig.host.on_step = lambda entry: loop.call_soon_threadsafe(task.cancel) if entry == step else None
    return task, mig


@pytest.mark.parametrize("paused", [False, True], ids=["running", "paused"])
@pytest.mark.parametrize(
    "at", ["sink: send_pages", "src: migrate", "dev.src: STOP_COPY", "sink: verify", "dev.dst: STOP"]
)
async def test_the_caller_cancelling_before_migrate_continue_aborts(make_rig: MakeRig, paused: bool, at: str) -> None:
    rig = make_rig(paused=paused)
    task, mig = cancel_at(rig, at)
    with pytest.raises(asyncio.CancelledError):
        await task
    rep = mig.report
    assert rep.status == "cancelled" and rep.interrupted == "before migrate-continue" and rep.guest is GuestHome.SOURCE
    assert CONTINUE not in rig.host.journal
    await rig.check_guest_home(rep)


@pytest.mark.parametrize("at", [CONTINUE, "dst RESUME"])
async def test_the_caller_cancelling_after_migrate_continue_finishes_the_switchover(make_rig: MakeRig, at: str) -> None:
    rig = make_rig()
    task, mig = cancel_at(rig, at)
    with pytest.raises(asyncio.CancelledError):
        await task
    rep = mig.report
    assert (
        rep.status == "completed" and rep.interrupted == "after migrate-continue" and rep.guest is GuestHome.DESTINATION
    )
    assert key_steps(rig) == STEPS
    await rig.check_guest_home(rep)


@pytest.mark.parametrize("at", ["src: migrate_cancel", "src: migrate-set-capabilities"])
async def test_the_caller_cancelling_during_an_abort_does_not_cut_it_short(make_rig: MakeRig, at: str) -> None:
    """A failure's abort runs to its end even when a signal arrives meanwhile."""
    rig = make_rig(sink=[Fault("verify")])
    task, mig = cancel_at(rig, at)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert mig.report.guest is GuestHome.SOURCE
    await rig.check_guest_home(mig.report)


async def test_a_guest_its_user_pauses_during_precopy_stays_paused_after_an_abort(make_rig: MakeRig) -> None:
    """The abort of a migration whose QEMU side never started leaves the run state alone."""
    rig = make_rig(sink=[Fault("send_pages", Act.FAIL, 2)])

    def user_pauses(rec) -> None:
        if rec.round == 1:
            asyncio.get_running_loop().create_task(rig.src.execute("stop"))

    rep = await rig.migration(on_round=user_pauses).run()
    assert rep.status == "failed" and rep.guest is GuestHome.SOURCE, rep.error
    assert "src: migrate" not in key_steps(rig)
    assert not rig.src.running, "the user's pause was undone"


async def test_a_device_call_still_running_when_the_caller_cancels_is_waited_for(
    make_rig: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancel lands while the device's STOP_COPY still runs in its thread (slowed here,
    after its journal step and before its ioctl): the abort's RUNNING must come after it, or
    the device would end stopped under a running guest."""
    import time

    from tests.fakes.devices import Journaled

    rig = make_rig()
    mig = rig.migration()
    task = asyncio.ensure_future(mig.run())
    loop = asyncio.get_running_loop()
    real = Journaled.set_state

    def slow_stop_copy(self: Journaled, state: State | int) -> int | None:
        if State(state) is State.VFIO_DEVICE_STATE_STOP_COPY:
            loop.call_soon_threadsafe(task.cancel)
            time.sleep(0.3)  # in the device call's own thread: the transition is not done yet
        return real(self, state)

    monkeypatch.setattr(Journaled, "set_state", slow_stop_copy)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert mig.report.status == "cancelled" and mig.report.guest is GuestHome.SOURCE
    await asyncio.sleep(0.5)  # a call left running in its thread has landed by now
    await rig.check_guest_home(mig.report)  # the source device is RUNNING again
