"""The dirty-memory guest under QEMU TCG, and its RAM consistency checker."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from fixtures.guest.pattern import PAGE_SIZE, GuestStatus, Pattern, check_guest_ram
from fixtures.guest.vm import GuestVM, qemu_binary

MiB = 1 << 20

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(qemu_binary() is None, reason="qemu-system-x86_64 is not installed"),
    pytest.mark.usefixtures("built"),
]


def page_view(ram: np.ndarray) -> np.ndarray:
    return ram.reshape(-1, PAGE_SIZE)


async def test_guest_boots_and_reports_progress_several_times_a_second() -> None:
    async with GuestVM("pattern=sweep wss=16M") as vm:
        first = await vm.wait_progress(2)
        last = await vm.wait_progress(10)
        info = vm.announce()
        assert info["pattern"] == "sweep" and info["base"] == "0x00200000"
        assert info["pages"] == str(16 * MiB // PAGE_SIZE)
        assert info["dma"] == "0x0ef00000-0x0ff00000"  # last 16 MiB of usable RAM
        assert int(info["tsc_khz"]) > 0
        assert last.pages > first.pages and last.sweeps > first.sweeps
        # 10 lines at the default 100 ms period: at least several per second.
        assert 0 < last.ms - first.ms <= 1500


async def test_rate_limit_holds_in_guest_and_host_time() -> None:
    async with GuestVM("pattern=sweep wss=16M rate=8M") as vm:  # 2048 pages/s
        first = await vm.wait_progress(2)
        wall = time.monotonic()
        last = await vm.wait_progress(15)
        wall = time.monotonic() - wall
    rate = (last.pages - first.pages) * 1000 / (last.ms - first.ms)
    assert rate == pytest.approx(2048, rel=0.1)
    assert (last.ms - first.ms) / 1000 == pytest.approx(wall, rel=0.3)


async def test_unknown_parameter_is_reported() -> None:
    async with GuestVM("pattern=sweep bogus=1") as vm:
        deadline = time.monotonic() + 30
        while "E unknown parameter bogus" not in vm.serial():
            assert time.monotonic() < deadline, vm.serial()
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("pattern", ["sweep", "random", "hotcold", "idle"])
async def test_each_pattern_writes_its_working_set_only(pattern: str) -> None:
    base, wss = 8 * MiB, 24 * MiB
    async with GuestVM(f"pattern={pattern} base=8M wss=24M") as vm:
        await vm.wait_progress(5)
        await vm.stop()
        ram = vm.ram()
    status = GuestStatus.from_ram(ram)
    assert status.pattern == Pattern[pattern.upper()]
    assert (status.base, status.wss_end) == (base, base + wss)
    assert (status.dma_start, status.dma_end) == (0xEF00000, 0xFF00000)
    result = check_guest_ram(ram)
    assert result.ok, result.errors
    pages = page_view(ram)
    first, end = base // PAGE_SIZE, (base + wss) // PAGE_SIZE
    written = pages[first:end].any(axis=1)
    if pattern == "idle":
        assert not written.any()
    elif pattern == "hotcold":
        hot = status.hot_pages
        assert written[:hot].all() and status.gen > 10 * status.npages
    else:
        assert written.mean() > 0.99
    # Nothing between the kernel and the working set, nothing after it, and
    # nothing in the DMA window.
    assert not pages[2 * MiB // PAGE_SIZE : first].any()
    assert not pages[end : status.dma_end // PAGE_SIZE].any()
    assert result.verified_pages >= 0.9 * status.npages


async def test_dma_window_size_is_configurable() -> None:
    async with GuestVM("pattern=sweep wss=8M dma=64M") as vm:
        await vm.wait_progress(2)
        assert vm.announce()["dma"] == "0x0bf00000-0x0ff00000"


@pytest.mark.parametrize("pattern", ["sweep", "random", "hotcold"])
async def test_checker_rejects_a_page_reverted_to_an_older_copy(pattern: str) -> None:
    """Negative control: a page that is stale by one write must be flagged."""
    async with GuestVM(f"pattern={pattern} wss=8M rate=64M") as vm:
        await vm.wait_progress(3)
        await vm.stop()
        older = vm.ram()
        await vm.cont()
        await vm.wait_progress(2)
        await vm.stop()
        newer = vm.ram()
    assert check_guest_ram(older).ok and check_guest_ram(newer).ok
    status = GuestStatus.from_ram(newer)
    first = status.base // PAGE_SIZE
    changed = np.flatnonzero(
        (page_view(older)[first : first + status.npages] != page_view(newer)[first : first + status.npages]).any(axis=1)
    )
    assert changed.size > 10
    for index in (changed[0], changed[changed.size // 2], changed[-1]):
        stale = newer.copy()
        page = first + int(index)
        page_view(stale)[page] = page_view(older)[page]
        result = check_guest_ram(stale)
        assert not result.ok, f"reverted page {page * PAGE_SIZE:#x} went unnoticed"
        assert f"{page * PAGE_SIZE:#x}" in " ".join(result.errors)


async def test_checker_rejects_misplaced_and_corrupted_pages() -> None:
    async with GuestVM("pattern=sweep wss=8M") as vm:
        await vm.wait_progress(3)
        await vm.stop()
        ram = vm.ram()
    status = GuestStatus.from_ram(ram)
    pages = page_view(ram)
    first = status.base // PAGE_SIZE
    swapped = ram.copy()
    page_view(swapped)[first + 1] = pages[first + 2]
    assert not check_guest_ram(swapped).ok
    scribbled = ram.copy()
    page_view(scribbled)[first + 5, 100] = 1
    assert not check_guest_ram(scribbled).ok
    zeroed = ram.copy()
    page_view(zeroed)[first + 7] = 0
    assert not check_guest_ram(zeroed).ok
