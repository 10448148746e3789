"""Write-watch end to end with real QEMU: every fixture workload, QEMU's own fw_cfg DMA
included, is bit-exact; the vCPU plugin alone is caught missing the DMA (negative control);
refusals (QEMU's own sandbox, a foreign seccomp filter, a killed QEMU) end as promised."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from contextlib import asynccontextmanager

import numpy as np
import pytest

from fixtures.guest.pattern import check_guest_ram
from orchestrator.lab.demo import guest_pair, wait_progress
from orchestrator.lab.launcher import Role, VmConfig, default_qemu, launch
from orchestrator.lab.workload import GUEST_ELF, WORKLOADS, fwcfg_buffer, parse_progress
from orchestrator.migration.attach import attach
from orchestrator.migration.driver import Migration, MigrationOptions
from orchestrator.trackers import QemuWrites, qemu_write_trackers
from orchestrator.uapi import ptrace as P
from orchestrator.writewatch import Refusal, WriteWatchRefused
from tests.writewatch.filters import exec_wrapper, on_syscall

pytestmark = pytest.mark.slow
MEM = 256 << 20


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
async def test_every_workload_is_bit_exact_with_write_watch(workload):
    async with guest_pair(workload, MEM, QemuWrites.WRITEWATCH) as pair:
        rep = await pair.migration(MigrationOptions(verify=True)).run()
        assert rep.status == "completed" and rep.verified is True, rep.error
        ww = next(t for t in rep.trackers if t.kind == "write-watch")
        assert ww.errors == 0 and ww.fallbacks == 0 and ww.state == "stopped"
        n = len(parse_progress(pair.dst.read_serial()))
        await wait_progress(pair.dst, n + 1, 30)
        assert "\nE " not in pair.dst.read_serial()
        await pair.dst.qmp.execute("stop")
        result = check_guest_ram(np.memmap(pair.dst.ram_path, np.uint8, mode="r"))
        assert result.ok, result.errors[:5]


async def test_vcpu_plugin_alone_misses_fw_cfg_dma():
    """Negative control: the plugin sees no device-model write, so the fw_cfg buffer the guest
    never stores to goes stale on the destination; every mismatch lies inside it."""
    async with guest_pair("fwcfg", MEM, QemuWrites.VCPU, devices=[]) as pair:
        lo, length = fwcfg_buffer(pair.src.read_serial())
        rep = await pair.migration(MigrationOptions(verify=True)).run()
        assert rep.status == "failed" and rep.verified is False
        pages = np.array(rep.mismatched_pages)
        assert pages.size and ((pages >= lo // 4096) & (pages < (lo + length) // 4096)).all(), pages[:8]
        assert (await pair.src.qmp.execute("query-status"))["running"], "the source runs on"


@asynccontextmanager
async def vm_pair(src_config: VmConfig):
    dst_config = VmConfig("dst", src_config.ram_mib, Role.DESTINATION, kernel=GUEST_ELF, append=src_config.append)
    async with launch(src_config) as src, launch(dst_config) as dst:
        await wait_progress(src, 1, 60)
        ep = await attach(src.qmp, dst.qmp, src.ram_path, dst.ram_path)
        try:
            yield src, dst, ep
        finally:
            ep.sink.close()


def light(**more) -> VmConfig:
    return VmConfig("src", 128, kernel=GUEST_ELF, append=WORKLOADS["light"], **more)


async def migrate(src, dst, ep, trackers, **options):
    mig = Migration(ep, trackers, dst.migration_uri(), MigrationOptions(verify=True, **options))
    return await mig.run()


def seccomp_mode(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("Seccomp:")).split()[1])


async def test_qemus_own_sandbox_is_vouched_for():
    """`-sandbox on` installs QEMU's own filters; they allow userfaultfd (postcopy needs it),
    the verdict says so, and the migration is bit-exact."""
    async with vm_pair(light(extra_args=("-sandbox", "on"))) as (src, dst, ep):
        pid = src.qmp.peer_pid()
        assert pid == src.process.pid and seccomp_mode(pid) == P.SECCOMP_MODE_FILTER
        with qemu_write_trackers(QemuWrites.WRITEWATCH, ep.layout, pid) as trackers:
            rep = await migrate(src, dst, ep, trackers)
        assert rep.status == "completed" and rep.verified is True, rep.error
        assert rep.trackers[0].kind == "write-watch"


async def test_a_foreign_filter_that_kills_userfaultfd_is_refused(tmp_path):
    """Asked for by name: a clear refusal and the source untouched; not asked for: the
    migration goes on with content hashing, saying why."""
    wrapper = exec_wrapper(tmp_path, on_syscall(P.SYS_userfaultfd, P.SECCOMP_RET_KILL_PROCESS), default_qemu())
    async with vm_pair(light(qemu_binary=str(wrapper))) as (src, dst, ep):
        pid = src.qmp.peer_pid()
        fds = set(os.listdir(f"/proc/{pid}/fd"))
        with pytest.raises(WriteWatchRefused) as info, qemu_write_trackers(QemuWrites.WRITEWATCH, ep.layout, pid):
            pass
        assert info.value.cause is Refusal.SECCOMP_FORBIDS and "userfaultfd" in str(info.value)
        assert set(os.listdir(f"/proc/{pid}/fd")) == fds
        n = len(parse_progress(src.read_serial()))
        await wait_progress(src, n + 1, 30)  # still running its guest

        notices: list[str] = []
        with qemu_write_trackers(
            QemuWrites.WRITEWATCH, ep.layout, pid, explicit=False, src_ram=str(src.ram_path), notice=notices.append
        ) as trackers:
            rep = await migrate(src, dst, ep, trackers)
        assert notices and "falling back to content hashing" in notices[0]
        assert rep.status == "completed" and rep.verified is True, rep.error
        assert rep.trackers[0].kind == "content-hash"


async def test_a_source_killed_mid_migration_fails_the_migration_cleanly():
    async with vm_pair(light()) as (src, dst, ep):
        pid = src.qmp.peer_pid()
        with qemu_write_trackers(QemuWrites.WRITEWATCH, ep.layout, pid) as trackers:

            def kill_after_round_1(rec) -> None:
                if rec.round == 1:
                    os.kill(pid, signal.SIGKILL)

            mig = Migration(
                ep,
                trackers,
                dst.migration_uri(),
                MigrationOptions(verify=True, max_time_s=30),
                on_round=kill_after_round_1,
            )
            rep = await asyncio.wait_for(mig.run(), 120)
        assert rep.status == "failed" and rep.error
        assert rep.trackers[0].kind == "write-watch" and rep.trackers[0].state == "stopped"


@pytest.fixture(scope="module")
def kvm(tmp_path_factory) -> None:
    """Skip unless KVM really runs a guest here: a /dev/kvm that opens is not enough (some
    hosts answer every KVM_RUN with an internal error). The fixture guest must announce
    itself under `-accel kvm` within a few seconds."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm")
    serial = tmp_path_factory.mktemp("kvm") / "serial"
    probe = subprocess.Popen(
        [
            default_qemu(),
            "-accel",
            "kvm",
            "-machine",
            "pc",
            "-m",
            "64",
            "-nodefaults",
            "-display",
            "none",
            "-kernel",
            str(GUEST_ELF),
            "-append",
            "pattern=idle",
            "-serial",
            f"file:{serial}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while probe.poll() is None and time.monotonic() < deadline and "\nA " not in "\n" + _read(serial):
            time.sleep(0.05)
        announced = "\nA " in "\n" + _read(serial)
    finally:
        probe.kill()
        _, err = probe.communicate()
    if not announced:
        pytest.skip(f"KVM does not run a guest here: {err.decode(errors='replace').strip()[:200] or 'no output'}")


def _read(path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


@pytest.mark.usefixtures("kvm")
@pytest.mark.parametrize("workload", ["heavy", "fwcfg"])
async def test_kvm_guest_is_bit_exact_with_write_watch(workload):
    """Under KVM the vCPUs write through EPT, not QEMU's page tables: a write fault goes through
    GUP with write intent (marked written), and each harvest's re-protection zaps the EPT
    entries through the mmu notifier, so the next guest write faults again."""
    async with guest_pair(workload, MEM, QemuWrites.WRITEWATCH, devices=[], accel="kvm") as pair:
        rep = await pair.migration(MigrationOptions(verify=True)).run()
        assert rep.status == "completed" and rep.verified is True, rep.error
