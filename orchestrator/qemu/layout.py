"""Guest RAM layout discovery and the checks that the RAM data path can serve it.

The orchestrator copies guest RAM itself by mapping the files behind QEMU's memory backends,
so it needs, per guest-physical range, which file and at which offset the bytes live. QEMU
splits that knowledge: backends (id, size, share) come from `query-memdev`, their type and
file from QOM, and the guest-physical placement (including the pc machine's split of RAM
around the 32-bit PCI hole) only from the `info mtree -f` flat view.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from orchestrator.qemu.errors import LayoutError
from orchestrator.qemu.mtree import FlatView, parse_flat_mtree, system_view
from orchestrator.qemu.peer import QmpPeer

FILE_BACKEND = "memory-backend-file"
_NEEDS = "the orchestrator needs share=on file-backed RAM"


@dataclass(frozen=True)
class RamBackend:
    """A QEMU host memory backend (`-object memory-backend-*`)."""

    id: str
    #: QOM type, e.g. "memory-backend-file" or "memory-backend-ram".
    type: str
    size: int
    share: bool
    #: The backing file of a memory-backend-file, else None.
    mem_path: Path | None


@dataclass(frozen=True)
class BackendRegion:
    """Guest-physical [gpa, gpa+length) is backend bytes [offset, offset+length): what QEMU
    says, before anyone knows the backend is a file the data path can map. `attach` turns
    the checked ones into the data path's `memory.RamRegion`s (same field names)."""

    gpa: int
    length: int
    backend: RamBackend
    #: Offset into the backend, which for a file backend is the offset into its file.
    offset: int

    @property
    def path(self) -> Path | None:
        return self.backend.mem_path

    @property
    def end(self) -> int:
        return self.gpa + self.length


@dataclass(frozen=True)
class GuestLayout:
    #: Every memory backend QEMU has, mapped or not.
    backends: tuple[RamBackend, ...]
    #: Backend-backed guest-physical ranges, sorted by gpa, adjacent pieces merged.
    regions: tuple[BackendRegion, ...]

    def locate(self, gpa: int) -> tuple[RamBackend, int]:
        """The backend and backend offset holding guest-physical address `gpa`."""
        for region in self.regions:
            if region.gpa <= gpa < region.end:
                return region.backend, region.offset + gpa - region.gpa
        raise LayoutError(f"guest-physical address {gpa:#x} is not backed by a RAM backend")


async def discover_layout(session: QmpPeer) -> GuestLayout:
    """Ask QEMU for its RAM backends and where the guest sees them.

    The flat view changes while firmware runs (e.g. read-only shadowing of the BIOS area), but
    only in which pieces are read-only, never in which file bytes back which addresses.
    """
    backends = await _query_backends(session)
    view = system_view(parse_flat_mtree(await session.hmp("info mtree -f")))
    return GuestLayout(backends, ram_regions(view, backends))


def check_migratable(layout: GuestLayout, *, on_this_host: bool = True) -> None:
    """Raise `LayoutError` unless every backend the guest sees is a shared file whose size on
    disk is the size QEMU uses: only then can the orchestrator map it and have QEMU skip it
    (x-ignore-shared). A QEMU on another host (`on_this_host=False`) names a file this host
    cannot see: only what QEMU says of it is checked here, the file by whoever serves it."""
    if not layout.regions:
        raise LayoutError(
            f"no guest RAM comes from a memory backend: {_NEEDS} "
            "(-object memory-backend-file,...,share=on and -machine memory-backend=ID)"
        )
    for backend in {r.backend.id: r.backend for r in layout.regions}.values():
        _check_backend(backend, on_this_host)


async def _query_backends(session: QmpPeer) -> tuple[RamBackend, ...]:
    types = {
        child["name"]: child["type"].removeprefix("child<").removesuffix(">")
        for child in await session.execute("qom-list", path="/objects")
        if child["type"].startswith("child<")
    }
    backends = []
    for memdev in await session.execute("query-memdev"):
        backend_id = memdev.get("id")
        if backend_id is None:
            continue  # only named backends can be mapped by name in the flat view
        qom_type = types.get(backend_id, "unknown")
        mem_path = None
        if qom_type == FILE_BACKEND:
            mem_path = Path(await session.execute("qom-get", path=f"/objects/{backend_id}", property="mem-path"))
        backends.append(RamBackend(backend_id, qom_type, int(memdev["size"]), bool(memdev["share"]), mem_path))
    return tuple(backends)


def ram_regions(view: FlatView, backends: tuple[RamBackend, ...]) -> tuple[BackendRegion, ...]:
    """The ranges of `view` that hit a backend, merged where both the guest-physical addresses
    and the backend offsets continue (pieces that differ only in being read-only, like the
    shadowed BIOS area, are the same bytes of the same file)."""
    # A backend's memory region is named after the backend id (QEMU 7.2 default).
    by_id = {b.id: b for b in backends}
    regions: list[BackendRegion] = []
    for r in sorted((r for r in view.ranges if r.region in by_id), key=lambda r: r.start):
        backend = by_id[r.region]
        if r.offset + r.size > backend.size:
            raise LayoutError(
                f"flat view maps {r.size:#x} bytes of backend '{backend.id}' at offset "
                f"{r.offset:#x}, past its size {backend.size:#x}"
            )
        prev = regions[-1] if regions else None
        if (
            prev is not None
            and prev.backend is backend
            and prev.end == r.start
            and prev.offset + prev.length == r.offset
        ):
            regions[-1] = BackendRegion(prev.gpa, prev.length + r.size, backend, prev.offset)
        else:
            regions.append(BackendRegion(r.start, r.size, backend, r.offset))
    return tuple(regions)


def _check_backend(backend: RamBackend, on_this_host: bool) -> None:
    name = f"RAM backend '{backend.id}'"
    if backend.type != FILE_BACKEND or backend.mem_path is None:
        raise LayoutError(f"{name} is {backend.type}, not {FILE_BACKEND}: {_NEEDS}")
    if not backend.share:
        raise LayoutError(f"{name} is not shared (share=off): {_NEEDS}")
    if not on_this_host:
        return
    path = backend.mem_path
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise LayoutError(f"RAM file {path} of {name} does not exist") from None
    if stat.S_ISDIR(st.st_mode):
        raise LayoutError(
            f"mem-path {path} of {name} is a directory, so QEMU keeps RAM in an unlinked file "
            "inside it that nobody else can open: give mem-path a file name"
        )
    if st.st_size != backend.size:
        raise LayoutError(f"RAM file {path} of {name} is {st.st_size} bytes but QEMU reports {backend.size} bytes")
