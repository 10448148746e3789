"""The Linux guest that `make linux-guest` builds (fixtures/linux): where its artefacts are,
the launcher configuration that runs it, and parsers for what it prints.

Debian's Linux 6.12 boots an initramfs whose workload rewrites `mem` bytes of its own memory
page by page and reads the virtio disk with O_DIRECT (the device writes guest RAM by DMA),
checking both: a page a migration lost or left stale, and a disk block that did not land,
print an `E` line on the console. The check runs in the guest because the host cannot tell
where in guest RAM the workload's pages are. Progress lines are the fixture guest's, so
`orchestrator.lab.workload.parse_progress` reads them.

Both QEMUs of a migration open the same disk image read-only (shared storage): QEMU migrates
the device, not the disk.

QEMU's own precopy under TCG loses dirty pages in releases before 9.0: after a dirty-bitmap
sync it leaves the vCPU's cached TLB entries in place, so later stores through them mark
nothing (upstream commit 03bfc2188f, "physmem: Fix migration dirty bitmap coherency with TCG
memory access"). It is a race: on Debian 12's QEMU 7.2 this guest's kernel usually crashes
after a live migration, though a run can come through; QEMU 10.0 (`make qemu-10`) migrates it
right. The orchestrator's trackers do not depend on QEMU's
dirty log, so they are right on both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.lab.errors import LabError
from orchestrator.lab.launcher import Role, VmConfig
from orchestrator.lab.workload import guest_errors as errors  # the guest's E lines, as the fixture guest's

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "build" / "linux"
KERNEL = BUILD / "vmlinuz"
INITRD = BUILD / "initrd.gz"
DISK = BUILD / "disk.img"

# Quiet (only panics reach the console, so the workload's lines stay whole), a fixed kernel
# address (nokaslr) and no speculation mitigations, which only slow TCG down.
KERNEL_OPTIONS = "console=ttyS0 loglevel=1 nokaslr mitigations=off"

# What the kernel prints when it dies (only emergencies reach this quiet console).
_KERNEL_DIED = re.compile(r"Oops|Kernel panic|BUG:|general protection fault")
_DISK = re.compile(r"^D (\d+) (\d+) (\d+)$", re.M)
_ANNOUNCE = re.compile(r"^A (guest=linux .*)$", re.M)


@dataclass(frozen=True)
class LinuxWorkload:
    """The workload's parameters (bytes unless said otherwise; rates per second, 0 = as fast
    as the guest can)."""

    #: Memory rewritten page by page, each sweep checking the previous one's records.
    mem: int = 64 << 20
    rate: int = 0
    #: Bytes per O_DIRECT read (a multiple of 4 KiB; 0 = no disk reads). One read follows
    #: every 256 pages written, and reads go on while the memory rate holds writes back.
    io: int = 64 << 10
    iorate: int = 0
    #: The buffer the reads land in, one `io` slot after another.
    iobuf: int = 1 << 20
    period_ms: int = 100

    def cmdline(self) -> str:
        return " ".join(
            f"workload.{key}={value}"
            for key, value in (
                ("mem", self.mem),
                ("rate", self.rate),
                ("io", self.io),
                ("iorate", self.iorate),
                ("iobuf", self.iobuf),
                ("period", self.period_ms),
            )
        )


@dataclass(frozen=True)
class DiskProgress:
    """One `D <reads> <bytes_read> <guest_ms>` line (printed right after each `P` line)."""

    reads: int
    bytes: int
    ms: int


def check_built(disk: Path = DISK) -> None:
    """Raise FileNotFoundError naming `make linux-guest` unless the guest is built."""
    missing = [str(p) for p in (KERNEL, INITRD, disk) if not p.exists()]
    if missing:
        raise FileNotFoundError(f"Linux guest not built ({', '.join(missing)}): run `make linux-guest`")


def dma_window(ram_mib: int, dma_mib: int) -> tuple[int, int]:
    """(guest-physical start, length) of the RAM the kernel is told to leave alone for
    devices: `dma_mib` MiB (at most a quarter of RAM) from the middle of RAM, away from
    where QEMU loads the kernel (low) and the initramfs (top)."""
    if dma_mib <= 0 or dma_mib > ram_mib // 4:
        raise LabError(f"a DMA window of {dma_mib} MiB does not fit {ram_mib} MiB of RAM")
    return (ram_mib // 2) << 20, dma_mib << 20


def kernel_append(ram_mib: int, workload: LinuxWorkload, dma_mib: int | None = 16) -> str:
    """The kernel command line: quiet console on COM1, the workload's parameters and, unless
    `dma_mib` is None, a `memmap=` reservation the workload announces as `dma=START-END`."""
    words = [KERNEL_OPTIONS]
    if dma_mib is not None:
        start, size = dma_window(ram_mib, dma_mib)
        words.append(f"memmap={size >> 20}M${start:#x}")
    words.append(workload.cmdline())
    return " ".join(words)


def disk_args(disk: Path = DISK) -> tuple[str, ...]:
    """The disk as a read-only virtio-blk device (QEMU's option syntax doubles commas)."""
    path = str(disk).replace(",", ",,")
    return ("-drive", f"file={path},format=raw,if=none,id=disk0,readonly=on", "-device", "virtio-blk-pci,drive=disk0")


def vm_config(
    name: str,
    ram_mib: int = 512,
    role: Role = Role.SOURCE,
    workload: LinuxWorkload = LinuxWorkload(),
    *,
    dma_mib: int | None = 16,
    disk: Path = DISK,
    **config: Any,
) -> VmConfig:
    """A launcher configuration running the Linux guest; the rest of `config` goes to
    `VmConfig` (plugin, accel, ...), its `extra_args` after the disk's. Give a source and its
    destination the same arguments: the destination needs the same devices and disk."""
    check_built(disk)
    extra = disk_args(disk) + tuple(config.pop("extra_args", ()))
    return VmConfig(
        name,
        ram_mib,
        role,
        kernel=KERNEL,
        initrd=INITRD,
        append=kernel_append(ram_mib, workload, dma_mib),
        extra_args=extra,
        **config,
    )


def kernel_died(serial_text: str) -> bool:
    """Whether the guest's kernel printed an oops, a panic or a BUG."""
    return _KERNEL_DIED.search(serial_text) is not None


def failed(serial_text: str) -> bool:
    """Whether the guest said something went wrong: its checker's `E` line or a dead kernel."""
    return bool(errors(serial_text)) or kernel_died(serial_text)


def disk_progress(serial_text: str) -> list[DiskProgress]:
    return [DiskProgress(*map(int, m.groups())) for m in _DISK.finditer(serial_text)]


def announced(serial_text: str) -> dict[str, str] | None:
    """The fields of the workload's `A guest=linux ...` line; None before it is printed."""
    m = _ANNOUNCE.search(serial_text)
    return dict(kv.split("=", 1) for kv in m.group(1).split()) if m else None
