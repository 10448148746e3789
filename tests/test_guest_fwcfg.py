"""The fixture guest's fw_cfg workload on real QEMU: the fw_cfg device copies 1 MiB of the
data file into the buffer, each copy from 4 KiB further into the file, and a stopped guest's
buffer holds exactly the file at the offset of the last copy."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fixtures.guest.pattern import (
    FWCFG_COPY,
    PAGE_SIZE,
    check_guest_ram,
    fwcfg_file,
    fwcfg_held,
    fwcfg_offset,
    fwcfg_words,
)
from fixtures.guest.vm import GuestVM, qemu_binary
from orchestrator.lab.workload import fwcfg_buffer, guest_rate

BUFFER = (0xEE00000, FWCFG_COPY)  # the MiB below the default 256M guest's DMA window

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(qemu_binary() is None, reason="qemu-system-x86_64 is not installed"),
    pytest.mark.usefixtures("built"),
]


def offset_held(ram: np.ndarray) -> int | None:
    """The file offset whose MiB the buffer holds exactly, or None."""
    start, length = BUFFER
    return fwcfg_held(ram[start : start + length])


@pytest.mark.parametrize(
    "append, vcpu_pages_per_s",
    [
        ("pattern=idle fwcfg=64M", 0),
        ("pattern=sweep wss=16M rate=16M fwcfg=64M", 4096),
    ],
)
async def test_buffer_holds_one_copy_and_different_offsets_appear_across_stops(
    append: str, vcpu_pages_per_s: int
) -> None:
    async with GuestVM(append) as vm:  # 64 DMA reads a second
        first = await vm.wait_progress(2)
        last = await vm.wait_progress(5)
        assert fwcfg_buffer(vm.serial()) == BUFFER
        seen: list[int] = []
        for attempt in range(40):
            await vm.stop()
            ram = vm.ram()
            result = check_guest_ram(ram)
            assert result.ok, result.errors
            offset = offset_held(ram)
            assert offset is not None, f"stop {attempt}: buffer holds the file at no copy offset"
            if vcpu_pages_per_s == 0:
                # An idle guest's progress lines count 256 pages a copy: the copy
                # stopped at is at most a few periods' worth past the last line's.
                copies = vm.progress()[-1].pages // (FWCFG_COPY // PAGE_SIZE)
                assert fwcfg_offset(copies - 1) <= offset <= fwcfg_offset(copies + 20), (offset, copies)
            seen.append(offset)
            if len(set(seen)) >= 4:
                break
            await vm.cont()
            await asyncio.sleep(0.003 * (attempt + 1))  # stop at another point of the cycle
        assert len(set(seen)) >= 4, seen
        # Offsets only move on: they wrap after 3841 copies, a minute of this guest's time.
        assert seen == sorted(seen) and seen[0] > 0, seen
        vm.progress()  # raises on an E line
    # A DMA read counts as the 256 pages it wrote.
    assert guest_rate([first, last]) == pytest.approx(64 * FWCFG_COPY // PAGE_SIZE + vcpu_pages_per_s, rel=0.15)
    # Negative controls: one page as the previous copy (4 KiB back) left it, which is the
    # page before it now, and one from a copy half the file away.
    for page, other in ((5, offset - PAGE_SIZE), (77, fwcfg_offset(offset // PAGE_SIZE + 1920))):
        at = BUFFER[0] + page * PAGE_SIZE
        stale = ram.copy()
        stale[at : at + PAGE_SIZE] = fwcfg_words(other + page * PAGE_SIZE, PAGE_SIZE)
        result = check_guest_ram(stale)
        assert not result.ok and result.errors[0].startswith("1 page(s) of the fw_cfg buffer"), result.errors
        assert f"{at:#x}" in result.errors[0]


async def test_guest_halts_on_a_copy_that_differs_from_the_file(tmp_path: Path) -> None:
    """Negative control for the guest's own check: one word of the page after the first MiB
    altered, which the first copy (offset 0) does not read and the second (offset 4 KiB) does,
    into the buffer's last page."""
    data = fwcfg_file().copy()
    word = 0x123
    data.view("<u4")[FWCFG_COPY // 4 + word] ^= 1
    altered = tmp_path / "altered.bin"
    data.tofile(altered)
    vm = GuestVM("pattern=idle fwcfg=8M")
    vm.config = replace(vm.config, extra_args=("-fw_cfg", f"name=opt/orchestrator/dma,file={altered}"))
    async with vm:
        await vm.wait_serial("\nE fw_cfg buffer holds")
        assert f" at {BUFFER[0] + FWCFG_COPY - PAGE_SIZE + 4 * word:#010x} " in vm.serial()
        assert "A pattern=idle" in vm.serial()  # the first copy went through


async def test_guest_with_a_file_of_another_size_reports_it(tmp_path: Path) -> None:
    short = tmp_path / "short.bin"
    fwcfg_file()[: 2 * FWCFG_COPY].tofile(short)
    vm = GuestVM("pattern=idle fwcfg=8M")
    vm.config = replace(vm.config, extra_args=("-fw_cfg", f"name=opt/orchestrator/dma,file={short}"))
    async with vm:
        await vm.wait_serial("E fw_cfg file opt/orchestrator/dma is not 16 MiB")


async def test_guest_without_the_file_reports_it() -> None:
    vm = GuestVM("pattern=idle fwcfg=8M")
    vm.config = replace(vm.config, extra_args=())
    async with vm:
        await vm.wait_serial("E no fw_cfg file opt/orchestrator/dma")


async def test_working_set_over_the_buffer_is_refused() -> None:
    async with GuestVM("pattern=sweep base=200M wss=39M fwcfg=8M") as vm:
        await vm.wait_serial("E working set overlaps the fw_cfg buffer")
