"""`python -m orchestrator demo`: launch a source and a destination QEMU running the fixture
guest, and migrate it live with verification on, through the same attach path a management
stack uses."""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.lab import linux
from orchestrator.lab.errors import LabError
from orchestrator.lab.fleet import FaultPlan, Fleet, device_names
from orchestrator.lab.launcher import QemuVm, Role, VmConfig, default_qemu, launch
from orchestrator.lab.linux import LinuxWorkload
from orchestrator.lab.loopback import loopback_receiver
from orchestrator.lab.workload import (
    GUEST_ELF,
    WORKLOADS,
    Progress,
    dma_window,
    guest_errors,
    needs_fwcfg,
    parse_progress,
    qemu_args,
)
from orchestrator.migration.attach import Endpoints, attach, attach_remote
from orchestrator.migration.driver import Migration, MigrationOptions, MigrationReport, Watch, run_watched
from orchestrator.migration.engine import MigrationStatus
from orchestrator.native import builds
from orchestrator.trackers import QemuWrites, Tracker, qemu_write_trackers
from orchestrator.trackers.vcpulog import VcpuDirtyLog, log_pages
from orchestrator.transport.auth import load_token
from orchestrator.transport.endpoint import Endpoint

_SIZE = re.compile(r"^(\d+)([KMG]?)$", re.I)


def parse_size(text: str) -> int:
    """'256M', '1G', '4096' -> bytes."""
    m = _SIZE.match(text.strip())
    if not m:
        raise LabError(f"bad size {text!r}: use a number with an optional K, M or G suffix")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]


#: Progress lines the destination prints after a migration before the demo judges it: a
#: second of the guest checking what it got.
DESTINATION_LINES = 10


@dataclass
class DemoResult:
    report: MigrationReport
    src_progress: list[Progress]
    dst_progress: list[Progress]
    # per device: did the destination get the source's final state, and did its DMA go on
    # from there consistently (pages of its window that disagree)
    devices: dict[str, dict] = field(default_factory=dict)
    # the guest's own failed checks on the destination (E lines)
    guest_errors: list[str] = field(default_factory=list)


async def wait_progress(vm: QemuVm, after: int, timeout: float) -> list[Progress]:
    """Wait until the guest has printed more than `after` progress lines."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        lines = parse_progress(vm.read_serial())
        if len(lines) > after:
            return lines
        vm.check_running()
        if loop.time() > deadline:
            raise TimeoutError(f"{vm.name}: guest printed no progress within {timeout:g}s:\n{vm.read_serial()[-500:]}")
        await asyncio.sleep(0.05)


def check_accel(accel: str, tracker: QemuWrites) -> None:
    if accel not in ("tcg", "kvm"):
        raise LabError(f"accelerator {accel!r}: choose tcg or kvm")
    if accel == "kvm" and tracker is QemuWrites.VCPU:
        raise LabError("the vCPU plugin tracker needs TCG: with --accel kvm use --tracker writewatch or content")
    if accel == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise LabError("--accel kvm needs a usable /dev/kvm on this host")


def check_fixtures(tracker: QemuWrites, workload: str = "light") -> None:
    """Have what the demo runs: the fixture guest, the fw_cfg data file of its `fwcfg=`
    workloads and the vCPU plugin are built into the per-user cache on first use (a
    `builds.BuildError` names what the host lacks). The Linux guest is downloaded, not
    built, so only a source checkout makes it."""
    if workload == LINUX:
        try:
            linux.check_built()
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"{exc} in a source checkout (it downloads about 100 MB of Debian packages); "
                "an installed package runs the fixture guest's workloads only"
            ) from None
    else:
        builds.ensure(builds.GUEST)
        if needs_fwcfg(WORKLOADS[workload]):
            builds.ensure(builds.FWCFG)
    if tracker is QemuWrites.VCPU:
        builds.ensure(builds.PLUGIN)


#: The demo workload that boots the Linux guest (Debian's 6.12 rewriting its memory and
#: reading its virtio disk with O_DIRECT) instead of the fixture guest.
LINUX = "linux"
DEMO_WORKLOADS = {**WORKLOADS, LINUX: "Linux 6.12 guest: memory rewrites and O_DIRECT disk reads"}


def guest_configs(workload: str, mem: int, accel: str, qemu: str, plugin: str | None) -> tuple[VmConfig, VmConfig]:
    """Source and destination configurations for a demo workload; the source gets `plugin`."""
    if workload == LINUX:
        job = LinuxWorkload(mem=min(256 << 20, mem // 2), rate=64 << 20)
        return (
            linux.vm_config("src", mem >> 20, workload=job, plugin=plugin, accel=accel, qemu_binary=qemu),
            linux.vm_config("dst", mem >> 20, Role.DESTINATION, job, accel=accel, qemu_binary=qemu),
        )
    append = WORKLOADS[workload]
    extra = qemu_args(append)
    return (
        VmConfig(
            "src",
            mem >> 20,
            plugin=plugin,
            kernel=GUEST_ELF,
            append=append,
            extra_args=extra,
            accel=accel,
            qemu_binary=qemu,
        ),
        VmConfig(
            "dst",
            mem >> 20,
            Role.DESTINATION,
            kernel=GUEST_ELF,
            append=append,
            extra_args=extra,
            accel=accel,
            qemu_binary=qemu,
        ),
    )


@dataclass
class GuestPair:
    """A running source (guest at work) and a waiting destination, attached and checked."""

    src: QemuVm
    dst: QemuVm
    endpoints: Endpoints
    ram: list[Tracker]  # the trackers of QEMU's own writes
    fleet: Fleet | None = None
    device_tracking: bool = True

    def trackers(self) -> list[Tracker]:
        """The trackers of QEMU's own writes, plus one DMA-log tracker per emulated device
        unless device tracking is off."""
        return self.ram + (self.fleet.trackers() if self.fleet and self.device_tracking else [])

    def migration(
        self, options: MigrationOptions, trackers: list[Tracker] | None = None, on_round=None, on_event=None
    ) -> Migration:
        ep = self.endpoints
        hooks = [h for h in (self.fleet.on_round if self.fleet else None, on_round) if h]

        def each_round(rec) -> None:
            for hook in hooks:
                hook(rec)

        return Migration(
            ep,
            self.trackers() if trackers is None else trackers,
            self.dst.migration_uri(),
            options,
            each_round,
            on_event,
            devices=self.fleet.migrations() if self.fleet else (),
        )


@asynccontextmanager
async def guest_pair(
    workload: str,
    mem: int,
    tracker: QemuWrites | str = QemuWrites.WRITEWATCH,
    devices: list[str] | None = None,
    device_tracking: bool = True,
    faults: list[FaultPlan] | None = None,
    dma_rate: int = 4000,
    accel: str = "tcg",
    transport: str = "local",
    qemu: str | None = None,
    explicit: bool = True,
    trust_seccomp: bool = False,
    notice: Callable[[str], None] = print,
) -> AsyncIterator[GuestPair]:
    """Launch both QEMUs with the fixture guest doing `workload`, and emulated `devices`
    DMA-ing into the guest's DMA window; pages go by `transport` (local copy, or tcp through
    a receiver on loopback); QEMU's own writes are found by `tracker` (a write-watch not
    asked for `explicit`ly falls back to content hashing when refused); remove everything
    on exit. `notice` tells a write-watch refusal and the fallback taken."""
    tracker = QemuWrites(tracker)
    if workload not in DEMO_WORKLOADS:
        raise LabError(f"unknown workload {workload!r}; choose from {', '.join(DEMO_WORKLOADS)}")
    if mem % (1 << 20) or mem < (64 << 20):
        raise LabError(f"guest memory {mem} must be a whole number of MiB, at least 64M")
    check_fixtures(tracker, workload)
    check_accel(accel, tracker)
    if devices:
        device_names(devices, faults or [])
    log = (
        VcpuDirtyLog.create(Path("/dev/shm") / f"orchestrator-vcpu-{uuid.uuid4().hex}", log_pages(mem))
        if tracker is QemuWrites.VCPU
        else None
    )
    try:
        src_cfg, dst_cfg = guest_configs(
            workload, mem, accel, qemu or default_qemu(), log.plugin_args() if log else None
        )
        async with launch(src_cfg) as src, launch(dst_cfg) as dst, _receiver(dst, transport) as receiver:
            await wait_progress(src, 10 if workload == LINUX else 1, 120)  # Linux: a second of its work
            ep = await _attach(src, dst, receiver)
            fleet = None
            ram = qemu_write_trackers(
                tracker,
                ep.layout,
                src.qmp.peer_pid(),
                explicit=explicit,
                log=log,
                src_ram=str(src.ram_path),
                trust_seccomp=trust_seccomp,
                notice=notice,
            )
            try:
                if devices:
                    window = dma_window(src.read_serial())
                    if window is None:
                        raise RuntimeError("the source guest has not announced its DMA window")
                    fleet = Fleet.create(devices, src.ram_path, dst.ram_path, window, dma_rate)
                    fleet.faults = list(faults or [])
                    fleet.start()
                with ram as ram_trackers:
                    yield GuestPair(src, dst, ep, ram_trackers, fleet, device_tracking)
            finally:
                if fleet is not None:
                    fleet.close()
                ep.sink.close()
    finally:
        if log is not None:
            log.close()
            log.unlink()


@asynccontextmanager
async def _receiver(dst: QemuVm, transport: str) -> AsyncIterator[tuple[Endpoint, Path] | None]:
    """For the tcp transport, a receiver on loopback serving the destination's RAM file."""
    if transport == "local":
        yield None
    elif transport == "tcp":
        async with loopback_receiver(dst.ram_path) as receiver:
            yield receiver
    else:
        raise LabError(f"unknown transport {transport!r}; choose local or tcp")


async def _attach(src: QemuVm, dst: QemuVm, receiver: tuple[Endpoint, Path] | None) -> Endpoints:
    if receiver is None:
        return await attach(src.qmp, dst.qmp, src.ram_path, dst.ram_path)
    where, token_file = receiver
    return await attach_remote(src.qmp, dst.qmp, src.ram_path, where, load_token(token_file))


async def run_demo(
    workload: str,
    mem: int,
    tracker: QemuWrites | str,
    options: MigrationOptions,
    devices: list[str] | None = None,
    device_tracking: bool = True,
    faults: list[FaultPlan] | None = None,
    accel: str = "tcg",
    on_round=None,
    on_event=None,
    transport: str = "local",
    qemu: str | None = None,
    explicit: bool = True,
    trust_seccomp: bool = False,
    watches: Sequence[Watch] = (),
    notice: Callable[[str], None] = print,
) -> DemoResult:
    async with guest_pair(
        workload,
        mem,
        tracker,
        devices,
        device_tracking,
        faults,
        accel=accel,
        transport=transport,
        qemu=qemu,
        explicit=explicit,
        trust_seccomp=trust_seccomp,
        notice=notice,
    ) as pair:
        report = await run_watched(pair.migration(options, on_round=on_round, on_event=on_event), watches)
        src_lines = parse_progress(pair.src.read_serial())
        result = DemoResult(report, src_lines, [])
        if report.status is MigrationStatus.COMPLETED:
            before = len(parse_progress(pair.dst.read_serial()))
            result.dst_progress = (await wait_progress(pair.dst, before + DESTINATION_LINES, 30))[before:]
            result.guest_errors = guest_errors(pair.dst.read_serial())
            if pair.fleet:
                result.devices = device_checks(pair.fleet)
        return result


def device_checks(fleet: Fleet) -> dict[str, dict]:
    """After a completed migration: the state each twin resumed from is the source device's
    final state, and the twin's DMA since then is consistent in the destination's RAM."""
    windows = fleet.check_destination()
    return {
        d.name: {
            "state_migrated": d.resumed_state == d.src_model.device_data,
            "destination_mismatched_pages": len(windows.get(d.name, [])),
        }
        for d in fleet.devices
    }
