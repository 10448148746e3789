"""`python -m orchestrator demo`: launch a source and a destination QEMU running the fixture
guest, and migrate it live with verification on, through the same attach path a management
stack uses."""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .attach import Endpoints, attach
from .driver import Migration, MigrationOptions, MigrationReport
from .qemu.launcher import QemuVm, Role, VmConfig, launch
from .trackers import ContentTracker, Tracker, VcpuTracker
from .vcpulog import PLUGIN, VcpuDirtyLog
from .workload import GUEST_ELF, WORKLOADS, Progress, parse_progress

_SIZE = re.compile(r"^(\d+)([KMG]?)$", re.I)


def parse_size(text: str) -> int:
    """'256M', '1G', '4096' -> bytes."""
    m = _SIZE.match(text.strip())
    if not m:
        raise ValueError(f"bad size {text!r}: use a number with an optional K, M or G suffix")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]


@dataclass
class DemoResult:
    report: MigrationReport
    src_progress: list[Progress]
    dst_progress: list[Progress]


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


def check_fixtures(tracker: str) -> None:
    need = [GUEST_ELF] + ([PLUGIN] if tracker == "vcpu" else [])
    missing = [str(p) for p in need if not p.exists()]
    if missing:
        raise FileNotFoundError(f"fixtures not built ({', '.join(missing)}): run `make fixtures`")


@dataclass
class GuestPair:
    """A running source (guest at work) and a waiting destination, attached and checked."""

    src: QemuVm
    dst: QemuVm
    endpoints: Endpoints
    log: VcpuDirtyLog | None

    def trackers(self) -> list[Tracker]:
        if self.log is not None:
            return [VcpuTracker(self.log)]
        return [ContentTracker(_source_view(self.src.ram_path))]

    def migration(self, options: MigrationOptions, trackers: list[Tracker] | None = None, on_round=None, on_event=None) -> Migration:
        ep = self.endpoints
        return Migration(
            ep.src, ep.dst, ep.layout, ep.sink, self.trackers() if trackers is None else trackers,
            self.dst.migration_uri(), options, on_round, on_event,
        )


@asynccontextmanager
async def guest_pair(workload: str, mem: int, tracker: str = "vcpu") -> AsyncIterator[GuestPair]:
    """Launch both QEMUs with the fixture guest doing `workload`; remove everything on exit."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
    if mem % (1 << 20) or mem < (64 << 20):
        raise ValueError(f"guest memory {mem} must be a whole number of MiB, at least 64M")
    check_fixtures(tracker)
    ram_mib, append = mem >> 20, WORKLOADS[workload]
    log = VcpuDirtyLog.create(Path("/dev/shm") / f"orchestrator-vcpu-{uuid.uuid4().hex}", mem >> 12) if tracker == "vcpu" else None
    try:
        src_cfg = VmConfig("src", ram_mib, kernel=GUEST_ELF, append=append, plugin=log.plugin_args() if log else None)
        dst_cfg = VmConfig("dst", ram_mib, Role.DESTINATION, kernel=GUEST_ELF, append=append)
        async with launch(src_cfg) as src, launch(dst_cfg) as dst:
            await wait_progress(src, 1, 60)
            ep = await attach(src.qmp, dst.qmp, src.ram_path, dst.ram_path)
            try:
                yield GuestPair(src, dst, ep, log)
            finally:
                ep.sink.close()
    finally:
        if log is not None:
            log.close()
            log.unlink()


async def run_demo(workload: str, mem: int, tracker: str, options: MigrationOptions, on_round=None, on_event=None) -> DemoResult:
    async with guest_pair(workload, mem, tracker) as pair:
        report = await pair.migration(options, on_round=on_round, on_event=on_event).run()
        src_lines = parse_progress(pair.src.read_serial())
        dst_lines: list[Progress] = []
        if report.status == "completed":
            before = len(parse_progress(pair.dst.read_serial()))
            dst_lines = (await wait_progress(pair.dst, before + 1, 30))[before:]
        return DemoResult(report, src_lines, dst_lines)


def _source_view(path: Path) -> np.ndarray:
    return np.memmap(path, np.uint8, mode="r", shape=(os.path.getsize(path),))
