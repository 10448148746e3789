"""The switchover choreography against real QEMU 7.2: the orchestrator copies guest RAM itself
while QEMU, with x-ignore-shared and pause-before-switchover, moves only device state."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

from orchestrator.lab.launcher import QemuVm, Role, VmConfig, launch
from orchestrator.qemu import choreography
from orchestrator.qemu.layout import check_migratable, discover_layout

from . import recorded
from .conftest import wait_serial

pytestmark = pytest.mark.slow

PAGE = 4096
#: Far above anything firmware or the halting guest touches.
MARKER_GPA = 64 << 20


def ram_of(vm: QemuVm) -> np.memmap:
    return np.memmap(vm.ram_path, dtype=np.uint8, mode="r+")


def statuses(vm: QemuVm) -> list[str]:
    return [e.data["status"] for e in vm.qmp.events if e.name == "MIGRATION"]


def names(vm: QemuVm) -> list[str]:
    return [e.name for e in vm.qmp.events if e.name != "MIGRATION_PASS"]


def destination(config: VmConfig, name: str = "dst") -> VmConfig:
    return replace(config, name=name, role=Role.DESTINATION)


async def test_switchover_with_ram_copied_by_the_orchestrator(halting_guest: VmConfig) -> None:
    async with launch(halting_guest) as src, launch(destination(halting_guest)) as dst:
        await wait_serial(src, "ready")
        layout = await discover_layout(src.qmp)
        check_migratable(layout)
        _, marker = layout.locate(MARKER_GPA)
        marker_page = slice(marker, marker + PAGE)
        src_ram, dst_ram = ram_of(src), ram_of(dst)
        # If QEMU sent guest RAM after all, this page would reach the destination as 0xA5.
        src_ram[marker_page] = 0xA5

        await choreography.prepare(src.qmp, dst.qmp)
        await choreography.listen(dst.qmp, dst.migration_uri())
        mark = await choreography.start(src.qmp, dst.migration_uri())
        await choreography.wait_pre_switchover(src.qmp, after=mark)
        assert (await dst.qmp.execute("query-status"))["status"] == "inmigrate"

        np.copyto(dst_ram, src_ram)
        dst_ram[marker_page] = 0x5A
        expected = np.array(dst_ram)

        continued_ns = time.monotonic_ns()
        await choreography.continue_(src.qmp)
        done = await choreography.wait_completed(src.qmp, dst.qmp)

        assert done.source_runstate == "postmigrate"
        assert (await dst.qmp.execute("query-status"))["status"] == "running"
        assert done.source_stop.received_ns < continued_ns < done.destination_resume.received_ns
        # Neither QEMU nor the (halted) guest wrote the destination's RAM: it is what we copied,
        # including the page that differs from the source.
        assert np.array_equal(dst_ram, expected)
        assert (dst_ram[marker_page] == 0x5A).all()
        # QEMU moved only its own small non-shared blocks (BIOS and option ROMs).
        ram = done.source_info["ram"]
        assert ram["total"] < 1 << 20
        assert ram["transferred"] < 1 << 20 < src.ram_size
        assert statuses(src) == recorded.SOURCE_STATUSES
        assert statuses(dst) == recorded.DESTINATION_STATUSES
        assert names(src) == recorded.SOURCE_EVENTS
        assert names(dst) == recorded.DESTINATION_EVENTS


async def test_a_paused_guest_migrates_paused(halting_guest: VmConfig) -> None:
    async with launch(halting_guest) as src, launch(destination(halting_guest)) as dst:
        await wait_serial(src, "ready")
        await src.qmp.execute("stop")
        np.copyto(ram_of(dst), ram_of(src))
        mark = src.qmp.mark()
        await _reach("pre-switchover", src, dst)
        await choreography.continue_(src.qmp)
        done = await choreography.wait_completed(src.qmp, dst.qmp, resumes=False)
        assert done.downtime_ns is None and done.source_runstate == "postmigrate"
        assert (await dst.qmp.execute("query-status"))["status"] == "paused"
        assert statuses(src) == recorded.SOURCE_STATUSES
        assert statuses(dst) == recorded.DESTINATION_STATUSES
        assert [e.name for e in src.qmp.events[mark:] if e.name != "MIGRATION_PASS"] == recorded.PAUSED_SOURCE_EVENTS
        assert names(dst) == recorded.PAUSED_DESTINATION_EVENTS


async def test_switchover_timing_without_ram_copy(halting_guest: VmConfig) -> None:
    """The fixed cost QEMU adds to downtime: pre-switchover -> destination running.

    The guest is halted, so its RAM is copied before the migration starts and the measured
    window holds no copy at all. (The destination needs that RAM: loading device state reads
    guest memory, e.g. kvm-tpr-opt fails to load against an all-zero RAM file.)
    """
    runs = []
    for i in range(5):
        async with launch(halting_guest) as src, launch(destination(halting_guest, f"dst{i}")) as dst:
            await wait_serial(src, "ready")
            np.copyto(ram_of(dst), ram_of(src))
            await choreography.prepare(src.qmp, dst.qmp)
            await choreography.listen(dst.qmp, dst.migration_uri())
            mark = await choreography.start(src.qmp, dst.migration_uri())
            await choreography.wait_pre_switchover(src.qmp, after=mark)
            continued_ns = time.monotonic_ns()
            await choreography.continue_(src.qmp)
            done = await choreography.wait_completed(src.qmp, dst.qmp)
            runs.append((done.destination_resume.received_ns - continued_ns, done.downtime_ns))
    ms = np.array(runs) / 1e6
    print(
        "\ncontinue->RESUME ms: "
        + " ".join(f"{v:.1f}" for v in ms[:, 0])
        + f" (median {np.median(ms[:, 0]):.1f})"
        + "\nSTOP->RESUME ms:     "
        + " ".join(f"{v:.1f}" for v in ms[:, 1])
        + f" (median {np.median(ms[:, 1]):.1f})"
    )
    assert (ms[:, 0] < 2000).all()


async def _reach(phase: str, src: QemuVm, dst: QemuVm) -> None:
    await choreography.prepare(src.qmp, dst.qmp)
    await choreography.listen(dst.qmp, dst.migration_uri())
    if phase == "active":
        # ~100 bytes per 100 ms: the ROM blocks alone keep the migration active for minutes.
        await src.qmp.execute("migrate-set-parameters", **{"max-bandwidth": 1000})
    mark = await choreography.start(src.qmp, dst.migration_uri())
    if phase == "active":
        await src.qmp.wait_migration_status({"active"})
    else:
        await choreography.wait_pre_switchover(src.qmp, after=mark)


@pytest.mark.parametrize("phase", ["active", "pre-switchover"])
async def test_cancel_leaves_the_source_running(halting_guest: VmConfig, phase: str) -> None:
    async with launch(halting_guest) as src, launch(destination(halting_guest)) as dst:
        await wait_serial(src, "ready")
        await _reach(phase, src, dst)

        assert await choreography.cancel(src.qmp) == "cancelled"

        assert (await src.qmp.execute("query-status"))["status"] == "running"
        assert statuses(src)[-2:] == recorded.CANCEL_STATUSES
        if phase == "pre-switchover":
            assert names(src)[-3:] == recorded.CANCEL_EVENTS
        # QEMU 7.2's destination gives up on the broken stream by exiting.
        assert await dst.wait_exit(10) != 0

        # The source is intact: a second migration to a fresh destination completes.
        async with launch(destination(halting_guest, "dst2")) as dst2:
            await choreography.prepare(src.qmp, dst2.qmp)
            await choreography.listen(dst2.qmp, dst2.migration_uri())
            mark = await choreography.start(src.qmp, dst2.migration_uri())
            await choreography.wait_pre_switchover(src.qmp, after=mark)
            np.copyto(ram_of(dst2), ram_of(src))
            await choreography.continue_(src.qmp)
            done = await choreography.wait_completed(src.qmp, dst2.qmp)
            assert done.source_runstate == "postmigrate"


async def test_cancel_without_a_migration_is_harmless(halting_guest: VmConfig) -> None:
    async with launch(halting_guest) as src:
        assert await choreography.cancel(src.qmp) == "none"
        assert (await src.qmp.execute("query-status"))["running"]


@pytest.mark.parametrize("resume", [True, False])
async def test_cancel_of_a_source_that_was_paused_before(halting_guest: VmConfig, resume: bool) -> None:
    # QEMU resumes the source after a cancel only if it ran when the migration began; the
    # caller says whether it must run afterwards (the driver: only if it ran before).
    async with launch(halting_guest) as src, launch(destination(halting_guest)) as dst:
        await src.qmp.execute("stop")
        await _reach("pre-switchover", src, dst)
        assert await choreography.cancel(src.qmp, resume=False) == "cancelled"
        assert statuses(src)[-2:] == recorded.CANCEL_STATUSES
        assert names(src)[-3:] == recorded.PAUSED_CANCEL_EVENTS
        # Paused either way: QEMU 7.2 leaves it in postmigrate, 10.0 puts back the state it had.
        assert (await src.qmp.execute("query-status"))["status"] in recorded.PAUSED_AFTER_CANCEL
        assert await choreography.cancel(src.qmp, resume=resume) == "cancelled"
        assert (await src.qmp.execute("query-status"))["running"] is resume
