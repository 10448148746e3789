"""Attach to a source and a destination QEMU that are already running, and check that the
orchestrator can own their RAM data path — all before anything is changed.

This is the path a management stack uses (`python -m orchestrator migrate`), and the demo
goes through it too after launching its own QEMUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from orchestrator.dirty.memory import MemoryLayout, RamRegion
from orchestrator.qemu.choreography import check_capabilities, check_waiting
from orchestrator.qemu.errors import LayoutError, MigrationError
from orchestrator.qemu.layout import GuestLayout, RamBackend, check_migratable, discover_layout
from orchestrator.qemu.peer import QmpPeer
from orchestrator.transport import LocalSink, PageSink
from orchestrator.transport.endpoint import Endpoint
from orchestrator.transport.tcp import ExpectedFile, TcpOptions, TcpSink


@dataclass
class Endpoints:
    src: QmpPeer
    dst: QmpPeer
    layout: MemoryLayout
    sink: PageSink


def _one_file(layout: GuestLayout, side: str) -> RamBackend:
    """The one file-backed backend behind all of the guest's RAM."""
    files = {r.path: r.backend for r in layout.regions}
    if len(files) != 1:
        raise LayoutError(f"{side} guest RAM comes from {len(files)} files; one RAM file per side is supported")
    return next(iter(files.values()))


def _mem_path(backend: RamBackend) -> Path:
    """The backend's file; `check_migratable` has already refused a backend without one."""
    if backend.mem_path is None:
        raise LayoutError(f"RAM backend '{backend.id}' has no mem-path")
    return backend.mem_path


def _same_file(given: Path, qemu_path: Path, side: str) -> None:
    try:
        same = os.path.samefile(given, qemu_path)
    except FileNotFoundError as exc:
        raise LayoutError(f"{side} RAM file {exc.filename} does not exist") from None
    if not same:
        raise LayoutError(f"{side} RAM file {given} is not the file QEMU maps ({qemu_path})")


def to_memory_layout(layout: GuestLayout, page_size: int = 4096) -> MemoryLayout:
    """The RAM the data path copies. Pieces of one backend at the same guest-to-file delta are
    joined across the holes between them: the pc machine shows its BIOS area as ROM until
    firmware switches it (PAM), and the guest can switch it back at any time, so those file
    bytes are guest RAM too. It also makes a fresh destination and a booted source agree."""
    regions: list[RamRegion] = []
    for r in layout.regions:
        prev = regions[-1] if regions else None
        if prev is not None and prev.path == str(r.path) and prev.gpa - prev.offset == r.gpa - r.offset:
            regions[-1] = RamRegion(prev.gpa, r.end - prev.gpa, prev.path, prev.offset)
        else:
            regions.append(RamRegion(r.gpa, r.length, str(r.path), r.offset))
    return MemoryLayout(tuple(regions), page_size)


def _describe(layout: MemoryLayout) -> str:
    return ", ".join(f"{r.gpa:#x}+{r.length:#x}" for r in layout.regions)


async def _validate(src: QmpPeer, dst: QmpPeer, src_ram: Path, *, dst_here: bool) -> tuple[MemoryLayout, RamBackend]:
    """Everything that can be checked from the source host: the RAM layout to copy and the
    destination QEMU's RAM backend (its file and size; the file itself only when the
    destination is on this host, `dst_here`). Raises `LayoutError`/`MigrationError` naming what is wrong;
    nothing in either QEMU has been changed when it does."""
    for session in (src, dst):
        await check_capabilities(session)
    src_status = (await src.execute("query-status"))["status"]
    if src_status not in ("running", "paused"):
        raise MigrationError(f"source QEMU is '{src_status}', not running")
    dst_status = (await dst.execute("query-status"))["status"]
    if dst_status != "inmigrate":
        raise MigrationError(
            f"destination QEMU is '{dst_status}': start it with '-incoming defer' so it waits for the migration"
        )
    await check_waiting(dst)
    src_layout, dst_layout = await discover_layout(src), await discover_layout(dst)
    check_migratable(src_layout)
    check_migratable(dst_layout, on_this_host=dst_here)
    layout, dst_shape = to_memory_layout(src_layout), to_memory_layout(dst_layout)
    if [(r.gpa, r.length, r.offset) for r in layout.regions] != [
        (r.gpa, r.length, r.offset) for r in dst_shape.regions
    ]:
        raise LayoutError(
            f"source and destination guests have different RAM layouts: {_describe(layout)} vs {_describe(dst_shape)}"
        )
    src_backend, dst_backend = _one_file(src_layout, "source"), _one_file(dst_layout, "destination")
    _same_file(src_ram, _mem_path(src_backend), "source")
    return layout, dst_backend


async def attach(src: QmpPeer, dst: QmpPeer, src_ram: Path, dst_ram: Path) -> Endpoints:
    """Validate both sides and open a local page sink (both RAM files on this host)."""
    layout, dst_backend = await _validate(src, dst, src_ram, dst_here=True)
    _same_file(dst_ram, _mem_path(dst_backend), "destination")
    if os.path.samefile(src_ram, dst_ram):
        raise LayoutError(f"source and destination RAM are the same file ({src_ram})")
    sink = LocalSink.flat(layout, str(src_ram), str(dst_ram))
    return Endpoints(src, dst, layout, sink)


async def attach_remote(
    src: QmpPeer, dst: QmpPeer, src_ram: Path, receiver: Endpoint, token: bytes, options: TcpOptions = TcpOptions()
) -> Endpoints:
    """Validate both sides and stream pages to a receiver on the destination host. Before
    anything changes in either QEMU, the receiver proves it serves the destination QEMU's RAM
    file: the mem-path QEMU reports, opened on the receiver's host, is the file (device and
    inode) the receiver has mapped, of the backend's size (`ExpectedFile`)."""
    layout, dst_backend = await _validate(src, dst, src_ram, dst_here=False)
    expect = ExpectedFile(_mem_path(dst_backend), dst_backend.size)
    sink = await TcpSink.connect(layout, str(src_ram), receiver, token, options, expect)
    return Endpoints(src, dst, layout, sink)
