"""The orchestrator migrates a real Linux guest (Debian's 6.12 kernel, rewriting its memory and
reading its virtio disk with O_DIRECT) with write-watch: bit-exact, and the guest runs on with
every check of its own passing. With the vCPU plugin alone the disk reads QEMU's virtio-blk
model writes into guest RAM are missed: verification must fail (the negative control)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from orchestrator.lab import linux
from orchestrator.lab.launcher import QemuVm, Role, launch
from orchestrator.lab.linux import LinuxWorkload
from orchestrator.lab.workload import parse_progress
from orchestrator.migration.attach import attach
from orchestrator.migration.driver import Migration, MigrationOptions
from orchestrator.trackers import QemuWrites, qemu_write_trackers
from orchestrator.trackers.vcpulog import VcpuDirtyLog, log_pages
from tests.linux_serial import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("linux_guest")]
RAM_MIB = 512
WORKLOAD = LinuxWorkload(mem=256 << 20, rate=64 << 20)


def progress_past(vm: QemuVm, lines: int, timeout: float):
    return wait_until(vm, lambda text: len(parse_progress(text)) >= lines, timeout, f"{lines} progress lines")


async def run(kind: QemuWrites, log: VcpuDirtyLog | None = None):
    """Boot the pair, let the guest work, migrate it with `kind`; a completed migration must
    leave the destination guest running with every one of its checks passing."""
    plugin = {"plugin": log.plugin_args()} if log else {}
    async with (
        launch(linux.vm_config("src", RAM_MIB, workload=WORKLOAD, **plugin)) as src,
        launch(linux.vm_config("dst", RAM_MIB, Role.DESTINATION, workload=WORKLOAD)) as dst,
    ):
        await progress_past(src, 20, 120)  # booted, and two seconds of memory and disk work
        ep = await attach(src.qmp, dst.qmp, src.ram_path, dst.ram_path)
        try:
            with qemu_write_trackers(kind, ep.layout, src.qmp.peer_pid(), log=log) as trackers:
                rep = await Migration(ep, trackers, dst.migration_uri(), MigrationOptions(verify=True)).run()
            if rep.status == "completed":
                before = len(parse_progress(dst.read_serial()))
                await progress_past(dst, before + 30, 60)  # three more seconds of checks, all passing
            else:
                assert (await src.qmp.execute("query-status"))["running"], "the source runs on"
            return rep
        finally:
            ep.sink.close()


async def test_linux_guest_is_bit_exact_with_write_watch():
    rep = await run(QemuWrites.WRITEWATCH)
    assert rep.status == "completed" and rep.verified is True, rep.error
    assert rep.trackers[0].kind == "write-watch" and rep.trackers[0].errors == 0


async def test_vcpu_plugin_alone_misses_the_disk_reads():
    log = VcpuDirtyLog.create(Path("/dev/shm") / f"orchestrator-vcpu-{uuid.uuid4().hex}", log_pages(RAM_MIB << 20))
    try:
        rep = await run(QemuWrites.VCPU, log)
        assert rep.status == "failed" and rep.verified is False and rep.mismatched_pages
    finally:
        log.close()
        log.unlink()
