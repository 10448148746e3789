"""Guest RAM layout: discovery from a real QEMU, and the checks before a migration."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator.lab.launcher import VmConfig, launch
from orchestrator.qemu.errors import LayoutError
from orchestrator.qemu.layout import (
    BackendRegion,
    GuestLayout,
    RamBackend,
    check_migratable,
    discover_layout,
)

from .conftest import wait_serial

G, M = 1 << 30, 1 << 20


def layout_with(backend: RamBackend) -> GuestLayout:
    return GuestLayout((backend,), (BackendRegion(0, backend.size, backend, 0),))


def file_backend(path: Path, size: int = 2 * M, share: bool = True) -> RamBackend:
    return RamBackend("ram0", "memory-backend-file", size, share, path)


def test_a_shared_file_of_the_right_size_passes(tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    ram.write_bytes(b"\0" * (2 * M))
    check_migratable(layout_with(file_backend(ram)))


def test_anonymous_ram_is_refused() -> None:
    backend = RamBackend("pc.ram", "memory-backend-ram", 2 * M, False, None)
    with pytest.raises(
        LayoutError,
        match=r"RAM backend 'pc\.ram' is memory-backend-ram, not memory-backend-file: "
        "the orchestrator needs share=on file-backed RAM",
    ):
        check_migratable(layout_with(backend))


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match=f"RAM file {tmp_path}/gone of RAM backend 'ram0' does not exist"):
        check_migratable(layout_with(file_backend(tmp_path / "gone")))


def test_a_file_on_another_host_is_not_looked_for_here(tmp_path: Path) -> None:
    """The destination of a cross-host migration names a file of its own host: its type and
    sharing are checked here, the file itself by the receiver that serves it."""
    check_migratable(layout_with(file_backend(tmp_path / "gone")), on_this_host=False)
    with pytest.raises(LayoutError, match="is not shared"):
        check_migratable(layout_with(file_backend(tmp_path / "gone", share=False)), on_this_host=False)


def test_wrong_file_size_is_named(tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    ram.write_bytes(b"\0" * M)
    with pytest.raises(
        LayoutError,
        match=f"RAM file {ram} of RAM backend 'ram0' is 1048576 bytes but QEMU reports 2097152 bytes",
    ):
        check_migratable(layout_with(file_backend(ram)))


def test_directory_mem_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="is a directory"):
        check_migratable(layout_with(file_backend(tmp_path)))


def test_a_guest_without_backend_ram_is_refused() -> None:
    with pytest.raises(LayoutError, match="no guest RAM comes from a memory backend"):
        check_migratable(GuestLayout((), ()))


def test_locate_translates_above_the_split() -> None:
    b = file_backend(Path("/dev/shm/ram"), size=256 * M)
    layout = GuestLayout((b,), (BackendRegion(0, 128 * M, b, 0), BackendRegion(4 * G, 128 * M, b, 128 * M)))
    assert layout.locate(4 * G + 5) == (b, 128 * M + 5)
    with pytest.raises(LayoutError, match="0x8000000 is not backed"):
        layout.locate(128 * M)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ram_mib", "machine", "expected"),
    [
        (256, (), [(0, 256 * M, 0)]),
        # A real split with little RAM: the upper half goes above 4 GiB.
        (256, ("-machine", "max-ram-below-4g=128M"), [(0, 128 * M, 0), (4 * G, 128 * M, 128 * M)]),
        # The default pc split; the file is sparse, so this costs no memory.
        (4096, (), [(0, 3 * G, 0), (4 * G, 1 * G, 3 * G)]),
    ],
)
async def test_discovery_on_real_qemu(
    halting_guest: VmConfig, ram_mib: int, machine: tuple[str, ...], expected: list[tuple[int, int, int]]
) -> None:
    async with launch(replace(halting_guest, ram_mib=ram_mib, extra_args=machine)) as vm:
        # Firmware changes the flat view while it shadows itself; once the guest runs, it is final.
        await wait_serial(vm, "ready")
        layout = await discover_layout(vm.qmp)
        (backend,) = layout.backends
        assert backend == RamBackend("ram0", "memory-backend-file", ram_mib * M, True, vm.ram_path)
        assert [(r.gpa, r.length, r.offset) for r in layout.regions] == expected
        assert all(r.path == vm.ram_path for r in layout.regions)
        check_migratable(layout)


@pytest.mark.slow
async def test_private_file_ram_is_refused_on_real_qemu(qemu_available: None) -> None:
    async with launch(replace(VmConfig("private"), share=False)) as vm:
        layout = await discover_layout(vm.qmp)
        with pytest.raises(
            LayoutError,
            match=r"RAM backend 'ram0' is not shared \(share=off\): "
            "the orchestrator needs share=on file-backed RAM",
        ):
            check_migratable(layout)
