"""End to end: the orchestrator migrates a running guest between two real QEMUs.

Acceptance of the live-migration work: bit-exact at switchover, the guest keeps running on
the destination, verification can fail (negative controls), and every failure path leaves
the source running, trackers stopped and files removed.
"""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

from fixtures.guest.pattern import check_guest_ram
from orchestrator.lab.demo import guest_pair, wait_progress
from orchestrator.lab.workload import parse_progress
from orchestrator.migration.driver import MigrationOptions

pytestmark = pytest.mark.slow
MEM = 256 << 20


async def source_runs(pair) -> bool:
    status = await pair.src.qmp.execute("query-status")
    return status["running"]


async def assert_source_alive(pair) -> None:
    """The source is running and its guest is still making progress."""
    assert await source_runs(pair)
    before = len(parse_progress(pair.src.read_serial()))
    await wait_progress(pair.src, before + 1, 30)


async def destination_consistent(pair) -> None:
    """Stop the destination and check the guest's own memory invariant, then let it go on."""
    await pair.dst.qmp.execute("stop")
    try:
        ram = np.memmap(pair.dst.ram_path, np.uint8, mode="r")
        result = check_guest_ram(ram)
        assert result.ok, result.errors[:5]
        del ram
    finally:
        await pair.dst.qmp.execute("cont")


@pytest.mark.parametrize("workload", ["idle", "light", "heavy"])
async def test_bit_exact_and_guest_runs_on(workload):
    async with guest_pair(workload, MEM) as pair:
        rep = await pair.migration(MigrationOptions(verify=True)).run()
        assert rep.status == "completed", rep.error
        assert rep.verified is True and rep.mismatched_pages == []
        assert rep.downtime_ms is not None and rep.downtime_ms > 0
        assert rep.rounds and rep.rounds[0].round == 0
        assert rep.trackers[0].state == "stopped" and rep.trackers[0].errors == 0
        # the guest keeps running on the destination: serial progress and memory advance
        dst_status = await pair.dst.qmp.execute("query-status")
        assert dst_status["status"] == "running"
        n = len(parse_progress(pair.dst.read_serial()))
        lines = await wait_progress(pair.dst, n + 1, 30)
        src_last = parse_progress(pair.src.read_serial())[-1]
        assert lines[-1].ms > src_last.ms, "the destination continues the guest's own clock"
        if workload != "idle":
            assert lines[-1].pages > src_last.pages, "and its writes"
        await destination_consistent(pair)
        assert (await pair.src.qmp.execute("query-status"))["status"] == "postmigrate"


async def test_negative_control_skipping_final_copy_is_caught():
    async with guest_pair("heavy", MEM) as pair:
        rep = await pair.migration(MigrationOptions(verify=True, skip_final_copy=True)).run()
        assert rep.status == "failed" and rep.verified is False and not rep.ok
        assert rep.mismatched_pages, "a busy guest dirties pages during the last round"
        assert "mismatched pages" in rep.error and "source running" in rep.decision
        await assert_source_alive(pair)


async def test_negative_control_no_tracker_is_caught():
    """Without any tracker the rounds send nothing after round 0: verification must fail."""
    async with guest_pair("heavy", MEM) as pair:
        rep = await pair.migration(MigrationOptions(verify=True), trackers=[]).run()
        assert rep.status == "failed" and rep.verified is False
        status = pair.endpoints.layout
        lo, hi = 2 << 20, (2 << 20) + (128 << 20)  # the heavy workload's working set
        pages = np.array(rep.mismatched_pages) * status.page_size
        assert ((pages >= lo) & (pages < hi)).mean() > 0.99
        await assert_source_alive(pair)


async def test_non_convergence_cancel_leaves_source_running():
    async with guest_pair("heavy", MEM) as pair:
        opts = MigrationOptions(downtime_limit_ms=0.01, max_rounds=3, on_limit="cancel")
        rep = await pair.migration(opts).run()
        assert rep.status == "cancelled" and "round cap 3" in rep.decision
        assert len(rep.rounds) == 3  # the cap counts every precopy round, round 0 included
        assert (await pair.src.qmp.query_migrate()).get("status") in (None, "none")
        assert rep.trackers[0].state == "stopped"
        await assert_source_alive(pair)


async def test_non_convergence_force_switches_over():
    async with guest_pair("heavy", MEM) as pair:
        opts = MigrationOptions(downtime_limit_ms=0.01, max_rounds=2, on_limit="force", verify=True)
        rep = await pair.migration(opts).run()
        assert rep.status == "completed" and rep.verified is True
        assert "forcing switchover" in rep.decision


async def test_cancel_during_precopy():
    async with guest_pair("heavy", MEM) as pair:
        rounds = []
        mig = pair.migration(MigrationOptions(downtime_limit_ms=0.01, max_rounds=1000, max_time_s=600))
        task = asyncio.create_task(mig.run())
        while len(mig.engine.rounds) < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        rounds.append(len(mig.engine.rounds))
        assert mig.report.status == "cancelled"
        assert [e.kind for e in mig.trackers.events][-1] == "stop"
        await assert_source_alive(pair)
        files = [pair.src.ram_path, pair.dst.ram_path]
    assert not any(os.path.exists(f) for f in files), "RAM files removed on exit"


@pytest.mark.parametrize("victim,at_round", [("dst", 2), ("src", 1)])
async def test_a_qemu_killed_during_precopy(victim, at_round):
    """A dead destination fails the switchover; a dead source is a clear QMP error. Either
    way the migration ends failed with its trackers stopped, and a surviving source runs."""
    async with guest_pair("heavy", MEM) as pair:
        vm = getattr(pair, victim)

        def kill(rec):
            if rec.round == at_round:
                vm.process.kill()

        opts = MigrationOptions(downtime_limit_ms=0.01, max_rounds=at_round + 3, on_limit="force", qmp_timeout_s=15)
        rep = await pair.migration(opts, on_round=kill).run()
        assert rep.status == "failed" and rep.error
        assert rep.trackers[0].state == "stopped"
        if victim == "dst":
            await assert_source_alive(pair)
        else:
            assert "QMP" in rep.error or "exited" in rep.error, rep.error
