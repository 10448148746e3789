"""The vCPU tracker maps the plugin's log to guest pages with the RAM layout, for both kinds
of address QEMU reports (RAM-block addresses up to 8.1, guest-physical ones since 8.2)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.dirty.bitmap import DirtyBitmap
from orchestrator.dirty.memory import MemoryLayout, RamRegion
from orchestrator.trackers import VcpuTracker
from orchestrator.trackers.vcpulog import BITMAP_OFFSET, Addresses, VcpuDirtyLog, log_pages

GIB, PAGE = 1 << 30, 4096
RAM = "/dev/shm/guest.ram"
#: The pc machine's 5 GiB guest: 3 GiB below the PCI hole, the rest from 4 GiB on.
PC_5G = MemoryLayout((RamRegion(0, 3 * GIB, RAM, 0), RamRegion(4 * GIB, 2 * GIB, RAM, 3 * GIB)))


@contextmanager
def plugin_log(npages: int, addresses: Addresses) -> Iterator[VcpuDirtyLog]:
    """A log as a plugin leaves it after attaching with `addresses`."""
    with VcpuDirtyLog.create(Path("/dev/shm") / f"vcpu-tracker-test-{os.getpid()}-{uuid.uuid4().hex}", npages) as log:
        raw(log)[256:260].view("<u4")[0] = addresses
        yield log


def raw(log: VcpuDirtyLog) -> np.ndarray:
    return np.memmap(log.path, dtype=np.uint8, mode="r+")


def store(log: VcpuDirtyLog, *pages: int) -> None:
    """What the plugin does for stores logged at `pages`."""
    mem = raw(log)
    epoch = int(mem[64:68].view("<u4")[0])
    stride = int(mem[32:40].view("<u8")[0])
    words = mem[BITMAP_OFFSET + (epoch & 1) * stride :].view("<u8")
    for page in pages:
        words[page >> 6] |= np.uint64(1 << (page & 63))


def dirty_gpas(bitmap: DirtyBitmap) -> list[int]:
    return [int(p) * PAGE for p in bitmap.dirty_pages()]


def started(log: VcpuDirtyLog, layout: MemoryLayout) -> tuple[VcpuTracker, DirtyBitmap]:
    tracker = VcpuTracker(log)
    tracker.start(layout)
    return tracker, DirtyBitmap(layout.npages)


def test_guest_physical_addresses_are_guest_pages_and_the_hole_is_dropped() -> None:
    with plugin_log(log_pages(5 * GIB), Addresses.PHYSICAL) as log:
        tracker, bitmap = started(log, PC_5G)
        below, bios, above, top = 0x12345000, 0xFFFC0000, 4 * GIB + 0x1000, 6 * GIB - PAGE
        store(log, below // PAGE, bios // PAGE, above // PAGE, top // PAGE)
        tracker.collect(bitmap)
        assert dirty_gpas(bitmap) == [below, above, top]


def test_ram_block_addresses_are_file_offsets_and_other_blocks_are_dropped() -> None:
    with plugin_log(log_pages(5 * GIB), Addresses.RAM_BLOCK) as log:
        tracker, bitmap = started(log, PC_5G)
        # File offset 3 GiB is the first page above 4 GiB; pc.bios is the RAM block after ram0.
        below, high_start, high_last, bios_block = 0x1000, 3 * GIB, 5 * GIB - PAGE, 5 * GIB
        store(log, below // PAGE, high_start // PAGE, high_last // PAGE, bios_block // PAGE)
        tracker.collect(bitmap)
        assert dirty_gpas(bitmap) == [0x1000, 4 * GIB, 6 * GIB - PAGE]


def test_stores_before_start_are_dropped_and_the_final_collect_reads_both_buffers() -> None:
    with plugin_log(log_pages(5 * GIB), Addresses.PHYSICAL) as log:
        store(log, 1)
        tracker, bitmap = started(log, PC_5G)
        store(log, 2)
        tracker.collect(bitmap)  # flips: the next store goes to the other buffer
        store(log, 3)
        raw(log)[BITMAP_OFFSET:].view("<u8")[0] |= np.uint64(1 << 4)  # a straggler in the old one
        tracker.collect_final(bitmap)
        assert dirty_gpas(bitmap) == [2 * PAGE, 3 * PAGE, 4 * PAGE]


def test_start_refuses_what_it_cannot_map() -> None:
    with (
        plugin_log(log_pages(5 * GIB), Addresses.UNKNOWN) as log,
        pytest.raises(ValueError, match="no dirty-log plugin has attached"),
    ):
        VcpuTracker(log).start(PC_5G)
    with (
        plugin_log(5 * GIB // PAGE, Addresses.PHYSICAL) as log,  # sized for file offsets only
        pytest.raises(ValueError, match=r"has 1310720 pages; this layout needs 1572864 for physical"),
    ):
        VcpuTracker(log).start(PC_5G)
    two_files = MemoryLayout((RamRegion(0, GIB, RAM, 0), RamRegion(4 * GIB, GIB, "/dev/shm/other.ram", 0)))
    with (
        plugin_log(log_pages(2 * GIB), Addresses.RAM_BLOCK) as log,
        pytest.raises(ValueError, match="single RAM backend"),
    ):
        VcpuTracker(log).start(two_files)


@st.composite
def layouts(draw: st.DrawFn) -> tuple[MemoryLayout, list[tuple[int, int]]]:
    """1-3 regions at any page (not only whole bitmap words), each from its own part of one
    file, in any order; with the log pages each region is at in either numbering."""
    sizes = draw(st.lists(st.integers(1, 300), min_size=1, max_size=3))
    gaps = draw(st.lists(st.integers(0, 200), min_size=len(sizes), max_size=len(sizes)))
    file_gaps = draw(st.lists(st.integers(0, 200), min_size=len(sizes), max_size=len(sizes)))
    order = draw(st.permutations(range(len(sizes))))
    regions, gpa, offsets, offset = [], 0, {}, 0
    for i in order:
        offset += file_gaps[i]
        offsets[i] = offset
        offset += sizes[i]
    for i, (size, gap) in enumerate(zip(sizes, gaps, strict=False)):
        gpa += gap
        regions.append(RamRegion(gpa * PAGE, size * PAGE, RAM, offsets[i] * PAGE))
        gpa += size
    return MemoryLayout(tuple(regions)), [(r.gpa // PAGE, r.offset // PAGE) for r in regions]


@settings(max_examples=150, deadline=None)
@given(layouts(), st.sampled_from([Addresses.PHYSICAL, Addresses.RAM_BLOCK]), st.data())
def test_every_logged_page_lands_on_its_guest_page_and_nothing_else(case, kind, data) -> None:
    layout, starts = case
    npages = (
        max(layout.npages, max(o + r.length // PAGE for (_, o), r in zip(starts, layout.regions, strict=False))) + 70
    )
    logged = data.draw(st.sets(st.integers(0, npages - 1), max_size=200))
    expected = set()
    for (gpa_page, offset_page), region in zip(starts, layout.regions, strict=False):
        first = gpa_page if kind is Addresses.PHYSICAL else offset_page
        expected |= {gpa_page + p - first for p in logged if first <= p < first + region.length // PAGE}
    with plugin_log(npages, kind) as log:
        tracker, bitmap = started(log, layout)
        store(log, *logged)
        tracker.collect(bitmap)
        assert set(bitmap.dirty_pages().tolist()) == expected
