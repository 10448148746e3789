"""The Linux guest: its launcher configuration, its serial lines, and (slow) that it boots under
TCG, keeps working, leaves its DMA window alone, and catches a stale page or a bad disk block."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from orchestrator.lab import linux, workload
from orchestrator.lab.launcher import QemuVm, Role, VmPaths, launch, qemu_argv
from orchestrator.lab.linux import LinuxWorkload
from orchestrator.lab.workload import guest_rate, parse_progress

MEM_TAG = 0x9E3779B97F4A7C15  # workload.c: MEM_TAG
PAGE = 4096


@pytest.fixture
def fake_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Stand-in artefacts; the disk's name has a comma, which QEMU's options must escape."""
    for name in ("KERNEL", "INITRD", "DISK"):
        path = tmp_path / ("disk,1.img" if name == "DISK" else name.lower())
        path.write_bytes(b"")
        monkeypatch.setattr(linux, name, path)
    return tmp_path


def test_qemu_arguments(fake_build: Path) -> None:
    wl = LinuxWorkload(mem=128 << 20, rate=8 << 20)
    cfg = linux.vm_config(
        "dst", 512, Role.DESTINATION, wl, disk=fake_build / "disk,1.img", plugin="p.so", extra_args=("-S",)
    )
    argv = qemu_argv(cfg, VmPaths.inside(fake_build, fake_build / "ram"))

    def after(flag: str) -> str:
        return argv[argv.index(flag) + 1]

    assert after("-kernel") == str(fake_build / "kernel")
    assert after("-initrd") == str(fake_build / "initrd")
    assert after("-m") == "512M" and after("-plugin") == "p.so"
    assert after("-drive") == f"file={fake_build}/disk,,1.img,format=raw,if=none,id=disk0,readonly=on"
    assert after("-device") == "virtio-blk-pci,drive=disk0"
    assert argv.index("-incoming") < argv.index("-S") and argv[-1] == "-S"
    append = after("-append").split()
    assert append[0] == "console=ttyS0" and "loglevel=1" in append
    assert "memmap=16M$0x10000000" in append
    assert "workload.mem=134217728" in append and "workload.rate=8388608" in append


def test_no_dma_window_without_dma_mib(fake_build: Path) -> None:
    cfg = linux.vm_config("src", 256, dma_mib=None)
    assert "memmap" not in (cfg.append or "")
    assert linux.dma_window(256, 64) == (128 << 20, 64 << 20)
    with pytest.raises(ValueError, match="does not fit"):
        linux.dma_window(256, 65)


def test_missing_artefacts_name_the_make_target(fake_build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = fake_build / "gone" / "initrd.gz"
    monkeypatch.setattr(linux, "INITRD", missing)
    with pytest.raises(FileNotFoundError, match="make linux-guest") as err:
        linux.vm_config("src")
    assert str(missing) in str(err.value)


def test_serial_lines() -> None:
    text = (
        "SeaBIOS\r\nBooting from ROM...\r\n\x1b[2J\n"
        "A guest=linux pattern=sweep mem=4096 pages=1 dma=0x10000000-0x11000000 kernel=6.12.9\n"
        "P 0 1 100\nD 3 196608 100\nP 2 2 200\nD 7 458752 200\n"
        "E page 0 in sweep 3: got (9, 0x0), want (2, 0x1)\n"
    )
    assert [p.pages for p in parse_progress(text)] == [1, 2]
    assert linux.disk_progress(text) == [linux.DiskProgress(3, 196608, 100), linux.DiskProgress(7, 458752, 200)]
    assert linux.errors(text) == ["page 0 in sweep 3: got (9, 0x0), want (2, 0x1)"]
    assert linux.failed(text) and not linux.kernel_died(text)
    assert not linux.failed(text.replace("E page", "page"))
    assert linux.failed("[   12.5] Kernel panic - not syncing: Attempted to kill init!\n")
    fields = linux.announced(text)
    assert fields is not None and fields["kernel"] == "6.12.9" and fields["pages"] == "1"
    assert workload.dma_window(text) == (0x10000000, 0x1000000)
    assert linux.announced("A pattern=sweep base=0x00200000\n") is None, "the fixture guest's line"


async def wait_for(vm: QemuVm, ready: Callable[[str], bool], timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = vm.read_serial()
        if ready(text):
            return text
        vm.check_running()
        if time.monotonic() > deadline:
            raise AssertionError(f"{vm.name}: no {what} within {timeout:g}s:\n{text[-800:]}")
        await asyncio.sleep(0.1)


def sweeps_at_least(n: int) -> Callable[[str], bool]:
    return lambda text: bool(linux.errors(text)) or any(p.sweeps >= n for p in parse_progress(text))


@pytest.mark.slow
async def test_boots_works_and_leaves_dma_window_alone(linux_guest: None) -> None:
    started = time.monotonic()
    async with launch(linux.vm_config("guest", 512, workload=LinuxWorkload(mem=256 << 20))) as vm:
        text = await wait_for(vm, lambda t: bool(parse_progress(t)), 120, "progress")
        boot_s = time.monotonic() - started
        fields = linux.announced(text)
        assert fields is not None and fields["kernel"].startswith("6.12."), text[-800:]
        assert fields["mem"] == str(256 << 20) and fields["disk"] == str(linux.DISK.stat().st_size)

        # Sweep 2 is the first to check records: by then every page was checked once.
        text = await wait_for(vm, sweeps_at_least(2), 120, "second sweep")
        assert linux.errors(text) == []

        # Device DMA stand-in: the host fills the window; the guest must neither touch it
        # nor be disturbed by it.
        start, size = workload.dma_window(text)
        ram = np.memmap(vm.ram_path, np.uint8, mode="r+")
        window = ram[start : start + size]
        pattern = np.arange(size // 4, dtype=np.uint32).view(np.uint8)
        window[:] = pattern
        sweeps = parse_progress(text)[-1].sweeps
        text = await wait_for(vm, sweeps_at_least(sweeps + 2), 120, "two more sweeps")
        assert linux.errors(text) == []
        assert np.array_equal(window, pattern), "the guest wrote into its DMA window"
        del window, ram

        lines, reads = parse_progress(text), linux.disk_progress(text)
        assert all(b.pages >= a.pages and b.ms > a.ms for a, b in itertools.pairwise(lines))
        assert reads[-1].reads > reads[0].reads > 0 and reads[-1].bytes == reads[-1].reads * (64 << 10)
        # After the first sweep (page faults) the guest runs at its steady rate.
        steady = [p for p in lines if p.sweeps >= 1]
        steady_reads = [d for d in reads if d.ms >= steady[0].ms]
        read_rate = (steady_reads[-1].bytes - steady_reads[0].bytes) / (steady_reads[-1].ms - steady_reads[0].ms)
        print(
            f"\nLinux guest: first progress {boot_s:.1f} s after launch; "
            f"{guest_rate(steady):.0f} pages/s and {read_rate / 1e3:.0f} MB/s read (guest time)"
        )


@pytest.mark.slow
async def test_stale_page_is_reported(linux_guest: None) -> None:
    wl = LinuxWorkload(mem=64 << 20)
    npages = wl.mem // PAGE
    async with launch(linux.vm_config("guest", 512, workload=wl)) as vm:
        await wait_for(vm, sweeps_at_least(2), 120, "second sweep")
        await vm.qmp.execute("stop")
        ram = np.memmap(vm.ram_path, np.uint64, mode="r+").reshape(-1, PAGE // 8)
        gen, tag = ram[:, 0], ram[:, 1] ^ np.uint64(MEM_TAG)
        # Every page of the workload holds a record (a tag no other data matches by chance):
        # find them all, with any copies a huge-page collapse left behind.
        records = np.flatnonzero((tag < npages) & (gen >= 1))
        assert len(np.unique(tag[records])) == npages, "every workload page found in RAM"
        ram[records, 0] -= np.uint64(1)  # as if a migration had left each page one sweep behind
        ram.flush()
        del ram, gen, tag
        await vm.qmp.execute("cont")
        text = await wait_for(vm, lambda t: bool(linux.errors(t)), 30, "E line")
        assert linux.errors(text)[0].startswith("page "), text[-800:]


@pytest.mark.slow
async def test_bad_disk_block_is_reported(linux_guest: None, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    shutil.copyfile(linux.DISK, disk)
    with open(disk, "r+b") as f:
        f.seek(7 * PAGE + 3 * 8)
        f.write(b"\xff" * 8)
    async with launch(linux.vm_config("guest", 512, disk=disk)) as vm:
        text = await wait_for(vm, lambda t: bool(linux.errors(t)), 120, "E line")
        assert linux.errors(text)[0].startswith("disk block 7 word 3: got 0xffffffffffffffff"), text[-800:]
