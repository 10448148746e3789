"""`info mtree -f` parsing, on text captured from QEMU 7.2 (pc machine, TCG, -nodefaults,
RAM from memory-backend-file "ram0") and on variants other QEMU versions print."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.qemu.errors import LayoutError
from orchestrator.qemu.layout import RamBackend, ram_regions
from orchestrator.qemu.mtree import FlatRange, parse_flat_mtree, system_view

DATA = Path(__file__).parent / "data"
G, M = 1 << 30, 1 << 20


def backend(size: int) -> RamBackend:
    return RamBackend("ram0", "memory-backend-file", size, True, Path("/dev/shm/ram"))


def regions_of(capture: str, size: int) -> list[tuple[int, int, int]]:
    view = system_view(parse_flat_mtree((DATA / capture).read_text()))
    return [(r.gpa, r.length, r.offset) for r in ram_regions(view, (backend(size),))]


def test_views_and_address_spaces() -> None:
    views = parse_flat_mtree((DATA / "mtree-pc-256m.txt").read_text())
    # QEMU prints views in hash-table order, which differs between runs.
    assert [v.address_spaces for v in views] == [
        ("I/O",),
        ("cpu-smm-0",),
        ("i440FX", "PIIX3", "piix3-ide", "PIIX4_PM"),
        ("memory", "cpu-memory-0"),
    ]
    assert [v.root for v in views] == ["io", "memory", None, "system"]
    assert views[2].ranges == ()
    assert system_view(views) is views[3]


def test_system_view_ranges_after_bios() -> None:
    view = system_view(parse_flat_mtree((DATA / "mtree-pc-256m.txt").read_text()))
    assert view.ranges[1] == FlatRange(0xC3000, 0x25000, "rom", "ram0", 0xC3000, False)
    assert view.ranges[4] == FlatRange(0x100000, 256 * M - 0x100000, "ram", "ram0", 0x100000, False)
    assert view.ranges[-1] == FlatRange(0xFFFC0000, 0x40000, "rom", "pc.bios", 0, False)
    assert [r.region for r in view.ranges if r.kind == "i/o"] == ["ioapic", "hpet", "apic-msi"]


def test_256m_is_one_region_once_bios_shadowing_is_merged() -> None:
    # Read-only shadowed pieces are still ram0 at matching offsets: one region.
    assert regions_of("mtree-pc-256m.txt", 256 * M) == [(0, 256 * M, 0)]


def test_256m_at_reset_has_the_rom_hole() -> None:
    # Before firmware runs, 0xc0000-0xfffff shows pc.rom and the BIOS, not RAM.
    assert regions_of("mtree-pc-256m-reset.txt", 256 * M) == [
        (0, 0xC0000, 0),
        (0x100000, 256 * M - 0x100000, 0x100000),
    ]


def test_split_around_the_pci_hole() -> None:
    # -m 256M with max-ram-below-4g=128M: the upper half continues at 4 GiB.
    assert regions_of("mtree-pc-256m-split.txt", 256 * M) == [(0, 128 * M, 0), (4 * G, 128 * M, 128 * M)]


def test_4g_guest_splits_at_3g() -> None:
    assert regions_of("mtree-pc-4g.txt", 4 * G) == [(0, 3 * G, 0), (4 * G, 1 * G, 3 * G)]


def test_ranges_past_the_backend_size_are_rejected() -> None:
    view = system_view(parse_flat_mtree((DATA / "mtree-pc-4g.txt").read_text()))
    with pytest.raises(LayoutError, match="past its size"):
        ram_regions(view, (backend(2 * G),))


def test_other_qemu_formats() -> None:
    text = (
        "FlatView #0\n"
        ' AS "memory", root: system\n'
        " Root memory region: system\n"
        "  0000000000000000-000000000009ffff (ram): ram0 KVM\n"
        "  0000000000100000-000000007fffffff (ram): ram0 @0000000000100000 KVM KVM\n"
        "  00000000fe000000-00000000fe000fff (prio 1, ramd): 0000:00:04.0 BAR 0 mmaps[0]\n"
        "  0000000100000000-00000001000fffff (prio 0, nv-ram): pmem0\n"
    )
    (view,) = parse_flat_mtree(text)
    assert [(r.region, r.offset, r.kind, r.nonvolatile) for r in view.ranges] == [
        ("ram0", 0, "ram", False),
        ("ram0", 0x100000, "ram", False),
        ("0000:00:04.0 BAR 0 mmaps[0]", 0, "ramd", False),
        ("pmem0", 0, "ram", True),
    ]


def test_garbled_range_line_fails_loudly() -> None:
    text = 'FlatView #0\n AS "memory", root: system\n  0000000000000000-000000000009ffff (ram\n'
    with pytest.raises(LayoutError, match="line 3 is not a range"):
        parse_flat_mtree(text)


def test_text_without_flat_views_fails_loudly() -> None:
    with pytest.raises(LayoutError, match="no flat view"):
        parse_flat_mtree("unknown command: 'info mtre'\n")


def test_missing_system_address_space_fails_loudly() -> None:
    views = parse_flat_mtree('FlatView #0\n AS "I/O", root: io\n Root memory region: io\n')
    with pytest.raises(LayoutError, match='no flat view for address space "memory"'):
        system_view(views)
