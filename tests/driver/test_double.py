"""The QEMU double against what real QEMU 7.2 was recorded doing (`tests/qemu/recorded.py`), and
the QEMU behaviours the driver's abort paths rely on."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.qemu import choreography
from orchestrator.qemu.errors import (
    MigrationError,
    QmpCommandError,
    QmpDisconnectedError,
)
from tests.fakes.faults import Act, Fault
from tests.fakes.qemu import FakeHost, FakeQemu, RunState
from tests.fakes.rig import URI
from tests.qemu import recorded


def pair(paused: bool = False, **faults: list[Fault]) -> tuple[FakeQemu, FakeQemu]:
    host = FakeHost()
    return (
        FakeQemu(host, "src", RunState.PAUSED if paused else RunState.RUNNING, faults=faults.get("src", ())),
        FakeQemu(host, "dst", RunState.INMIGRATE, faults=faults.get("dst", ())),
    )


async def to_pre_switchover(src: FakeQemu, dst: FakeQemu) -> None:
    await choreography.prepare(src, dst)
    await choreography.listen(dst, URI)
    await choreography.wait_pre_switchover(src, after=await choreography.start(src, URI))


@pytest.mark.parametrize("paused", [False, True], ids=["running", "paused"])
async def test_a_switchover_sends_what_qemu_sends(paused: bool) -> None:
    src, dst = pair(paused)
    await to_pre_switchover(src, dst)
    assert (src.runstate, dst.runstate) == (RunState.FINISH_MIGRATE, RunState.INMIGRATE)
    await choreography.continue_(src)
    done = await choreography.wait_completed(src, dst, resumes=not paused)
    assert done.source_runstate == "postmigrate"
    assert dst.runstate is (RunState.PAUSED if paused else RunState.RUNNING)
    assert src.statuses() == recorded.SOURCE_STATUSES
    assert dst.statuses() == recorded.DESTINATION_STATUSES
    assert src.names() == (recorded.PAUSED_SOURCE_EVENTS if paused else recorded.SOURCE_EVENTS)
    assert dst.names() == (recorded.PAUSED_DESTINATION_EVENTS if paused else recorded.DESTINATION_EVENTS)
    assert (done.downtime_ns is None) is paused


@pytest.mark.parametrize("paused", [False, True], ids=["running", "paused"])
async def test_a_cancel_in_pre_switchover_is_what_qemu_does(paused: bool) -> None:
    src, dst = pair(paused)
    await to_pre_switchover(src, dst)
    assert await choreography.cancel(src, resume=False) == "cancelled"
    assert src.statuses()[-2:] == recorded.CANCEL_STATUSES
    assert src.names()[-3:] == (recorded.PAUSED_CANCEL_EVENTS if paused else recorded.CANCEL_EVENTS)
    assert src.runstate is (RunState.POSTMIGRATE if paused else RunState.RUNNING)
    assert await dst.wait_gone() == "closed its QMP connection (has the process died?)"  # exits on the broken stream
    assert dst.statuses()[-1] == "failed"


async def test_what_qemu_refuses() -> None:
    src, dst = pair()
    with pytest.raises(QmpCommandError, match="not in expected state: none"):
        await choreography.continue_(src)
    await to_pre_switchover(src, dst)
    with pytest.raises(QmpCommandError, match="already been started"):
        await choreography.listen(dst, URI)
    with pytest.raises(QmpCommandError, match="migration process in progress"):
        await src.execute("migrate-set-capabilities", capabilities=[{"capability": "events", "state": False}])
    with pytest.raises(QmpCommandError, match="not finalized yet"):
        await src.execute("cont")
    with pytest.raises(QmpCommandError, match="migration process in progress"):
        await choreography.start(src, URI)
    assert await choreography.cancel(src) == "cancelled"
    await src.execute("migrate-set-capabilities", capabilities=[{"capability": "events", "state": False}])
    assert await choreography.cancel(src) == "cancelled"  # nothing left to cancel


async def test_a_destination_that_dies_fails_a_source_still_sending() -> None:
    src, dst = pair(dst=[Fault("MIGRATION:active", Act.DIE_AFTER)])
    await choreography.prepare(src, dst)
    await choreography.listen(dst, URI)
    mark = await choreography.start(src, URI)
    with pytest.raises(MigrationError, match="failed before switchover: Unable to write"):
        await choreography.wait_pre_switchover(src, after=mark)
    assert src.running


async def test_a_source_that_dies_mid_stream_makes_the_destination_exit() -> None:
    src, dst = pair(src=[Fault("STOP", Act.DIE)])
    await choreography.prepare(src, dst)
    await choreography.listen(dst, URI)
    with pytest.raises(QmpDisconnectedError):
        await choreography.wait_pre_switchover(src, after=await choreography.start(src, URI))
    await dst.wait_gone()
    assert dst.statuses()[-1] == "failed"


async def test_a_shutdown_is_seen_before_the_connection_closes() -> None:
    src, _ = pair(src=[Fault("query-status", Act.SHUTDOWN)])
    gone = asyncio.ensure_future(src.wait_gone())
    with pytest.raises(QmpDisconnectedError):
        await src.execute("query-status")
    assert gone.result() == "shut down (host-qmp-quit)" and src.lost


async def test_a_destination_whose_load_fails_exits_without_running_the_guest() -> None:
    src, dst = pair(dst=[Fault("RESUME", Act.FAIL)])
    await to_pre_switchover(src, dst)
    await choreography.continue_(src)
    with pytest.raises(QmpDisconnectedError):
        await choreography.wait_completed(src, dst)
    assert src.statuses()[-1] == "completed" and dst.statuses()[-1] == "failed"
    assert "RESUME" not in dst.names() and not src.running
