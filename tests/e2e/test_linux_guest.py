"""End to end with the Linux guest and QEMU's own migration (no orchestrator): two QEMUs from
the launcher, `migrate` over a unix socket, the guest rewriting its memory and reading its disk
throughout. The source's RAM is a share=on file, but without x-ignore-shared QEMU copies every
page itself.

Live, QEMU before 9.0 (Debian 12's 7.2) loses the guest's writes under TCG (a QEMU race; see
`orchestrator.lab.linux`): in most runs the destination's kernel crashes or hangs, or its
checker finds a stale page, which the test excuses there and only there (as an expected
failure); a run the race spares passes.
The same live migration on QEMU 10.0 (`make test`'s second pass) keeps the guest running, and
so does 7.2 migrating the guest paused: the bug is the dirty tracking, not the guest.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from orchestrator.lab import linux
from orchestrator.lab.launcher import QemuVm, Role, VmConfig, launch, qemu_version
from orchestrator.lab.linux import LinuxWorkload
from orchestrator.lab.workload import Progress, parse_progress
from tests.linux_serial import wait_until

pytestmark = pytest.mark.slow
# 16384 pages/s over 256 MiB: busy, yet well below what QEMU copies over a unix socket.
WORKLOAD = LinuxWorkload(mem=256 << 20, rate=64 << 20)
NPAGES = WORKLOAD.mem // 4096


def swept(after: int = 0):
    """More than a full sweep written past `after` pages: every page checked since then."""
    return lambda text: any(p.pages > after + NPAGES for p in parse_progress(text))


async def migrate(src: QemuVm, dst: QemuVm) -> dict:
    caps = {c["capability"]: c["state"] for c in await src.qmp.execute("query-migrate-capabilities")}
    assert caps["x-ignore-shared"] is False
    await dst.qmp.execute("migrate-incoming", uri=dst.migration_uri())
    await src.qmp.execute("migrate-set-parameters", **{"max-bandwidth": 4 << 30})
    await src.qmp.execute("migrate", uri=dst.migration_uri())
    deadline = time.monotonic() + 120
    while (info := await src.qmp.execute("query-migrate"))["status"] not in ("completed", "failed", "cancelled"):
        src.check_running()
        assert time.monotonic() < deadline, f"migration not done within 120s: {info}"
        await asyncio.sleep(0.1)
    assert info["status"] == "completed", info
    assert info["ram"]["transferred"] > WORKLOAD.mem, "QEMU copied the guest's RAM itself"
    return info


async def goes_on(dst: QemuVm, src: QemuVm) -> None:
    """The guest continues on the destination from where the source left it, checks every
    page it got and reads on, without an error."""
    src_text = src.read_serial()
    assert not linux.errors(src_text)
    last: Progress = parse_progress(src_text)[-1]
    reads = linux.disk_progress(src_text)[-1].reads
    text = await wait_until(dst, swept(last.pages), 60, "full sweep on the destination")
    assert parse_progress(text)[-1].ms > last.ms, "the guest's own clock goes on"
    assert linux.disk_progress(text)[-1].reads > reads


def configs() -> tuple[VmConfig, VmConfig]:
    return (linux.vm_config("src", 512, workload=WORKLOAD), linux.vm_config("dst", 512, Role.DESTINATION, WORKLOAD))


async def test_qemu_live_migration_keeps_the_guest_running(linux_guest: None) -> None:
    version = qemu_version()
    src_cfg, dst_cfg = configs()
    assert src_cfg.share
    async with launch(src_cfg) as src, launch(dst_cfg) as dst:
        await wait_until(src, swept(), 120, "full sweep")  # every page of the workload written
        before = parse_progress(src.read_serial())[-1]
        info = await migrate(src, dst)
        assert parse_progress(src.read_serial())[-1].pages > before.pages, "the guest ran meanwhile"
        assert (await dst.qmp.execute("query-status"))["status"] == "running"
        try:
            await goes_on(dst, src)
        except AssertionError:
            if version >= (9, 0) or not lost_writes(dst.read_serial(), src.read_serial()):
                raise
            # The race is QEMU's: it loses writes in most runs, not in all, so a clean run
            # passes; only the bug's own symptom is excused.
            pytest.xfail(f"QEMU {version} lost the guest's writes in its own precopy (upstream 03bfc2188f)")
        print(
            f"\nQEMU {version} live migration of the Linux guest: {info['total-time']} ms, "
            f"downtime {info.get('downtime')} ms, {info['ram']['transferred'] >> 20} MiB sent"
        )


def lost_writes(dst_text: str, src_text: str) -> bool:
    """The destination shows what lost writes do to this guest: its checker found a stale
    page, its kernel died of one, or it hung short of a full sweep past the source's last."""
    last = parse_progress(src_text)[-1]
    return linux.failed(dst_text) or not swept(last.pages)(dst_text)


async def test_qemu_migration_of_the_paused_guest(linux_guest: None) -> None:
    src_cfg, dst_cfg = configs()
    async with launch(src_cfg) as src, launch(dst_cfg) as dst:
        await wait_until(src, swept(), 120, "full sweep")
        await src.qmp.execute("stop")
        await migrate(src, dst)
        assert (await dst.qmp.execute("query-status"))["status"] == "paused"
        await dst.qmp.execute("cont")
        await goes_on(dst, src)
