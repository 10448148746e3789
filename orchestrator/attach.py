"""Attach to a source and a destination QEMU that are already running, and check that the
orchestrator can own their RAM data path — all before anything is changed.

This is the path a management stack uses (`python -m orchestrator migrate`), and the demo
goes through it too after launching its own QEMUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .memory import MemoryLayout, RamRegion
from .qemu.errors import LayoutError, MigrationError
from .qemu.layout import GuestLayout, check_migratable, discover_layout
from .qemu.qmp import QmpSession
from .transport import LocalSink


@dataclass
class Endpoints:
    src: QmpSession
    dst: QmpSession
    layout: MemoryLayout
    sink: LocalSink


def _one_file(layout: GuestLayout, side: str) -> Path:
    files = {r.path for r in layout.regions}
    if len(files) != 1:
        raise LayoutError(f"{side} guest RAM comes from {len(files)} files; one RAM file per side is supported")
    return next(iter(files))


def _same_file(given: Path, qemu_path: Path, side: str) -> None:
    try:
        same = os.path.samefile(given, qemu_path)
    except FileNotFoundError as exc:
        raise LayoutError(f"{side} RAM file {exc.filename} does not exist") from None
    if not same:
        raise LayoutError(f"{side} RAM file {given} is not the file QEMU maps ({qemu_path})")


def to_memory_layout(layout: GuestLayout, page_size: int = 4096) -> MemoryLayout:
    return MemoryLayout(tuple(RamRegion(r.gpa, r.size, str(r.path), r.offset) for r in layout.regions), page_size)


async def attach(src: QmpSession, dst: QmpSession, src_ram: Path, dst_ram: Path) -> Endpoints:
    """Validate both sides and open the page sink. Raises `LayoutError`/`MigrationError`
    naming what is wrong; nothing in either QEMU has been changed when it does."""
    src_status = (await src.execute("query-status"))["status"]
    if src_status not in ("running", "paused"):
        raise MigrationError(f"source QEMU is '{src_status}', not running")
    dst_status = (await dst.execute("query-status"))["status"]
    if dst_status != "inmigrate":
        raise MigrationError(
            f"destination QEMU is '{dst_status}': start it with '-incoming defer' so it waits for the migration"
        )
    src_layout, dst_layout = await discover_layout(src), await discover_layout(dst)
    check_migratable(src_layout)
    check_migratable(dst_layout)
    shape = [(r.gpa, r.size, r.offset) for r in src_layout.regions]
    if shape != [(r.gpa, r.size, r.offset) for r in dst_layout.regions]:
        raise LayoutError("source and destination guests have different RAM layouts (size or placement differ)")
    src_file, dst_file = _one_file(src_layout, "source"), _one_file(dst_layout, "destination")
    _same_file(src_ram, src_file, "source")
    _same_file(dst_ram, dst_file, "destination")
    if os.path.samefile(src_ram, dst_ram):
        raise LayoutError(f"source and destination RAM are the same file ({src_ram})")
    layout = to_memory_layout(src_layout)
    key = str(src_file)
    sink = LocalSink(layout, {key: str(src_ram)}, {key: str(dst_ram)})
    return Endpoints(src, dst, layout, sink)
