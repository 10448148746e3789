"""The fixture guest's fw_cfg workload on real QEMU: the fw_cfg device copies alternate
halves of the data file into the buffer, and a stopped guest's buffer holds exactly one."""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fixtures.guest.pattern import FWCFG_HALF, PAGE_SIZE, check_guest_ram, fwcfg_file
from fixtures.guest.vm import GUEST_ELF, GuestVM, qemu_binary
from orchestrator.workload import FWCFG_FILE, fwcfg_buffer, guest_rate

ROOT = Path(__file__).resolve().parent.parent
BUFFER = (0xEE00000, FWCFG_HALF)        # the MiB below the default 256M guest's DMA window

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(qemu_binary() is None, reason="qemu-system-x86_64 is not installed"),
]


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    subprocess.run(["make", "-s", "fixtures"], cwd=ROOT, check=True)
    assert GUEST_ELF.exists() and FWCFG_FILE.exists()


def half_held(ram: np.ndarray) -> int | None:
    """Which half of the file the buffer holds exactly, or None."""
    start, length = BUFFER
    buf = ram[start:start + length]
    halves = fwcfg_file().reshape(2, -1)
    return next((i for i in (0, 1) if np.array_equal(buf, halves[i])), None)


@pytest.mark.parametrize("append, vcpu_pages_per_s", [
    ("pattern=idle fwcfg=64M", 0),
    ("pattern=sweep wss=16M rate=16M fwcfg=64M", 4096),
])
async def test_buffer_holds_one_file_half_and_alternates(append: str, vcpu_pages_per_s: int) -> None:
    async with GuestVM(append) as vm:                           # 64 DMA reads a second
        first = await vm.wait_progress(2)
        last = await vm.wait_progress(5)
        assert fwcfg_buffer(vm.serial()) == BUFFER
        seen = set()
        for attempt in range(40):
            await vm.stop()
            ram = vm.ram()
            result = check_guest_ram(ram)
            assert result.ok, result.errors
            half = half_held(ram)
            assert half is not None, f"stop {attempt}: buffer holds neither half"
            seen.add(half)
            if seen == {0, 1}:
                break
            await vm.cont()
            await asyncio.sleep(0.003 * (attempt + 1))          # stop at another point of the cycle
        assert seen == {0, 1}
        vm.progress()                                           # raises on an E line
    # A DMA read counts as the 256 pages it wrote.
    assert guest_rate([first, last]) == pytest.approx(64 * FWCFG_HALF // PAGE_SIZE + vcpu_pages_per_s, rel=0.15)
    # Negative control: one page of the other half, as a stale copy would leave it.
    page = BUFFER[0] + 5 * PAGE_SIZE
    other = fwcfg_file()[(1 - half) * FWCFG_HALF:][5 * PAGE_SIZE:6 * PAGE_SIZE]
    ram[page:page + PAGE_SIZE] = other
    result = check_guest_ram(ram)
    assert not result.ok and f"{page:#x}" in " ".join(result.errors)


async def test_guest_halts_on_a_copy_that_differs_from_the_file(tmp_path: Path) -> None:
    """Negative control for the guest's own check: one word of the second half altered."""
    data = fwcfg_file().copy()
    word = 0x1234
    data.view("<u4")[FWCFG_HALF // 4 + word] ^= 1
    altered = tmp_path / "altered.bin"
    data.tofile(altered)
    vm = GuestVM("pattern=idle fwcfg=8M")
    vm.config = replace(vm.config, extra_args=("-fw_cfg", f"name=opt/orchestrator/dma,file={altered}"))
    async with vm:
        deadline = asyncio.get_running_loop().time() + 30
        while "\nE fw_cfg buffer holds" not in vm.serial():
            assert asyncio.get_running_loop().time() < deadline, vm.serial()
            await asyncio.sleep(0.05)
        assert f" at {BUFFER[0] + 4 * word:#010x} " in vm.serial()
        assert "A pattern=idle" in vm.serial()                  # the first half went through


async def test_guest_without_the_file_reports_it() -> None:
    vm = GuestVM("pattern=idle fwcfg=8M")
    vm.config = replace(vm.config, extra_args=())
    async with vm:
        deadline = asyncio.get_running_loop().time() + 30
        while "E no fw_cfg file opt/orchestrator/dma" not in vm.serial():
            assert asyncio.get_running_loop().time() < deadline, vm.serial()
            await asyncio.sleep(0.05)


async def test_working_set_over_the_buffer_is_refused() -> None:
    async with GuestVM("pattern=sweep base=200M wss=39M fwcfg=8M") as vm:
        deadline = asyncio.get_running_loop().time() + 30
        while "E working set overlaps the fw_cfg buffer" not in vm.serial():
            assert asyncio.get_running_loop().time() < deadline, vm.serial()
            await asyncio.sleep(0.05)
