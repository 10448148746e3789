"""The fixture guest's working set above 4 GiB (PAE paging), and the checker finding it at
its RAM-file offset: a synthetic image, then real QEMU with RAM beyond the PCI hole."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from fixtures.guest import pattern
from fixtures.guest.pattern import PAGE_SIZE, PAGE_TAG, STATUS_ADDR, GuestStatus, check_guest_ram, pc_regions
from fixtures.guest.vm import GuestVM, qemu_binary

MiB, GiB = 1 << 20, 1 << 30
needs_qemu = pytest.mark.skipif(qemu_binary() is None, reason="qemu-system-x86_64 is not installed")


def sweep_image(below_4g: int, npages: int) -> np.ndarray:
    """A pc RAM file of a sweep guest with `npages` at 4 GiB, each written once."""
    ram = np.zeros(below_4g + npages * PAGE_SIZE, np.uint8)
    fields = dict(
        magic=pattern.STATUS_MAGIC,
        version=pattern.STATUS_VERSION,
        pattern=1,
        base=4 * GiB,
        npages=npages,
        hot_pages=npages,
        gen=npages,
    )
    words = [fields.get(name, 0) for name in pattern._STATUS_FIELDS]
    ram[STATUS_ADDR : STATUS_ADDR + 8 * len(words)] = np.array(words, "<u8").view(np.uint8)
    pages = ram[below_4g:].view("<u8").reshape(npages, PAGE_SIZE // 8)
    pages[:, 0] = np.arange(1, npages + 1)
    pages[:, 1] = (4 * GiB + np.arange(npages, dtype=np.uint64) * PAGE_SIZE) ^ np.uint64(PAGE_TAG)
    return ram


def test_checker_reads_ram_above_4g_at_its_file_offset() -> None:
    ram = sweep_image(4 * MiB, 16)
    regions = pc_regions(4 * MiB, ram.size)
    result = check_guest_ram(ram, regions=regions)
    assert result.ok, result.errors
    assert result.verified_pages == 16
    with pytest.raises(ValueError, match="not in this RAM image"):
        check_guest_ram(ram)  # flat: 4 GiB is past the end of the file
    shifted = pc_regions(4 * MiB - PAGE_SIZE, ram.size)  # one page off
    assert not check_guest_ram(ram, regions=shifted).ok


def test_checker_names_a_stale_high_page_by_its_guest_address() -> None:
    ram = sweep_image(4 * MiB, 16)
    ram[4 * MiB + 3 * PAGE_SIZE : 4 * MiB + 4 * PAGE_SIZE] = 0
    result = check_guest_ram(ram, regions=pc_regions(4 * MiB, ram.size))
    assert not result.ok and f"{4 * GiB + 3 * PAGE_SIZE:#x}" in " ".join(result.errors)


@pytest.mark.slow
@needs_qemu
@pytest.mark.parametrize(
    "append",
    [
        "pattern=sweep base=0x100000000 wss=16M",
        "pattern=random base=0x100101000 wss=16M fwcfg=16M",  # not 2 MiB aligned; with fw_cfg DMA
    ],
)
async def test_working_set_above_4g(built: None, append: str) -> None:
    """-m 4160M: 3 GiB below the PCI hole, the remaining 1088 MiB at 4 GiB, file offset 3 GiB."""
    base = int(append.split("base=")[1].split()[0], 16)
    async with GuestVM(append, mem_mib=4160) as vm:
        await vm.wait_progress(3)
        layout = await vm.layout()
        await vm.stop()
        assert vm.announce()["base"] == f"{base:#x}"
        ram = np.memmap(vm.ram_path, np.uint8, mode="r")  # 4 GiB: read in place, sparse
        below_4g = layout.locate(4 * GiB)[1]
        assert below_4g == 3 * GiB
        result = check_guest_ram(ram, regions=layout.regions)
        assert result.ok, result.errors
        assert check_guest_ram(ram, regions=pc_regions(below_4g, ram.size)).ok
        status = GuestStatus.from_ram(ram)
        assert status.base == base and result.gen > 2 * status.npages
        first = ram[below_4g + base - 4 * GiB :].view("<u8")[:2]
        assert first[0] != 0 and first[1] == PAGE_TAG ^ base
        # Read as if flat, the same addresses are other RAM: the mapping is what finds them.
        assert not check_guest_ram(ram).ok
        vm.progress()  # raises on an E line


@pytest.mark.slow
@needs_qemu
async def test_working_set_above_4g_must_be_ram(built: None) -> None:
    async with GuestVM("pattern=sweep base=0x100000000 wss=16M") as vm:  # 256M: none there
        deadline = asyncio.get_running_loop().time() + 30
        while "E working set above 4 GiB is not RAM in the memory map" not in vm.serial():
            assert asyncio.get_running_loop().time() < deadline, vm.serial()
            await asyncio.sleep(0.05)
