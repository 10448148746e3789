"""The vCPU dirty log: file layout, harvest protocol, and the TCG plugin on real QEMU."""

from __future__ import annotations

import asyncio
import os
import stat
import struct
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fixtures.guest.vm import GuestVM, qemu_binary
from orchestrator.dirty.bits import words_for
from orchestrator.lab.launcher import qemu_version
from orchestrator.qemu.errors import QemuExitedError
from orchestrator.trackers.vcpulog import BITMAP_OFFSET, MAGIC, PLUGIN, Addresses, DrainTimeout, VcpuDirtyLog

ROOT = Path(__file__).resolve().parent.parent
HAMMER = ROOT / "fixtures" / "plugin" / "hammer.elf"
needs_qemu = pytest.mark.skipif(qemu_binary() is None, reason="qemu-system-x86_64 is not installed")


@pytest.fixture
def shm_path(request: pytest.FixtureRequest):
    path = Path(f"/dev/shm/vcpulog-test-{os.getpid()}-{request.node.name[:40]}")
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture
def log(shm_path: Path):
    with VcpuDirtyLog.create(shm_path, 1000) as log:
        yield log


def raw(path: Path) -> np.ndarray:
    """An independent writable view of the log file, as the plugin has."""
    return np.memmap(path, dtype=np.uint8, mode="r+")


def writer_mark(mem: np.ndarray, page: int) -> None:
    """What a writer does when it finds no harvest in progress."""
    epoch = int(mem[64:68].view("<u4")[0])
    stride = int(mem[32:40].view("<u8")[0])
    words = mem[BITMAP_OFFSET + (epoch & 1) * stride :].view("<u8")
    words[page >> 6] |= np.uint64(1 << (page & 63))


def pages_of(words: np.ndarray, npages: int) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little")[:npages])


def test_create_writes_header_and_bitmaps(shm_path: Path) -> None:
    with VcpuDirtyLog.create(shm_path, 70000, page_size=8192) as log:
        st = shm_path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600
        stride = -(-words_for(70000) * 8 // 4096) * 4096
        assert st.st_size == BITMAP_OFFSET + 2 * stride
        magic, version, shift, npages, offset, got_stride = struct.unpack_from("<QIIQQQ", shm_path.read_bytes())
        assert (magic, version, shift, npages, offset, got_stride) == (MAGIC, 2, 13, 70000, BITMAP_OFFSET, stride)
        assert log.plugin_args() == f"{PLUGIN},shm={shm_path},pages=70000"
        assert log.plugin_args(addresses=Addresses.PHYSICAL) == f"{PLUGIN},shm={shm_path},pages=70000,addr=gpa"
        assert log.attached == 0
        assert log.addresses is Addresses.UNKNOWN
    assert not shm_path.exists()


def test_create_refuses_existing_file_and_bad_sizes(shm_path: Path) -> None:
    shm_path.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        VcpuDirtyLog.create(shm_path, 10)
    assert shm_path.read_bytes() == b"keep"
    shm_path.unlink()
    for npages, page_size in ((0, 4096), (10, 2048), (10, 12288)):
        with pytest.raises(ValueError):
            VcpuDirtyLog.create(shm_path, npages, page_size)
    assert not shm_path.exists()


def test_harvest_flips_and_ors_only_the_old_bitmap(log: VcpuDirtyLog, shm_path: Path) -> None:
    mem = raw(shm_path)
    for page in (0, 63, 64, 999):
        writer_mark(mem, page)
    out = np.zeros(words_for(1000), np.uint64)
    out[0] = np.uint64(1 << 5)  # the caller's bits survive (OR)
    assert log.harvest(out) == 4
    assert list(pages_of(out, 1000)) == [0, 5, 63, 64, 999]
    assert int(mem[64:68].view("<u4")[0]) == 1  # epoch flipped

    writer_mark(mem, 7)  # lands in the new bitmap
    again = np.zeros_like(out)
    assert log.harvest(again) == 1
    assert list(pages_of(again, 1000)) == [7]
    assert log.harvest(again) == 0  # both bitmaps were zeroed
    assert not mem[BITMAP_OFFSET:].any()


def test_harvest_final_reads_both_bitmaps(log: VcpuDirtyLog, shm_path: Path) -> None:
    mem = raw(shm_path)
    writer_mark(mem, 1)
    log.harvest(np.zeros(words_for(1000), np.uint64))  # 1 harvested, epoch now 1
    writer_mark(mem, 2)  # bitmap 1
    stride = int(mem[32:40].view("<u8")[0])
    mem[BITMAP_OFFSET:].view("<u8")[0] |= np.uint64(1 << 3)  # a straggler in bitmap 0
    out = np.zeros(words_for(1000), np.uint64)
    assert log.harvest_final(out) == 2
    assert list(pages_of(out, 1000)) == [2, 3]
    assert not mem[BITMAP_OFFSET : BITMAP_OFFSET + 2 * stride].any()


def test_a_hung_writer_fails_the_harvest_in_bounded_time(log: VcpuDirtyLog, shm_path: Path) -> None:
    mem = raw(shm_path)
    mem[128:132].view("<u4")[0] = 1  # a writer stuck in bitmap 0
    start = time.monotonic()
    with pytest.raises(DrainTimeout, match="inflight=1"):
        log.harvest(np.zeros(words_for(1000), np.uint64), timeout=0.2)
    assert 0.2 <= time.monotonic() - start < 2
    with pytest.raises(DrainTimeout):  # the log stays failed
        log.harvest(np.zeros(words_for(1000), np.uint64))


def test_a_writer_that_leaves_in_time_is_waited_for(log: VcpuDirtyLog, shm_path: Path) -> None:
    mem = raw(shm_path)
    writer_mark(mem, 9)
    mem[128:132].view("<u4")[0] = 1  # a writer inside bitmap 0

    def finish_writer() -> None:
        time.sleep(0.1)
        mem[BITMAP_OFFSET:].view("<u8")[0] |= np.uint64(1 << 10)
        mem[128:132].view("<u4")[0] = 0

    writer = threading.Thread(target=finish_writer)
    writer.start()
    out = np.zeros(words_for(1000), np.uint64)
    log.harvest(out, timeout=5)
    writer.join()
    assert list(pages_of(out, 1000)) == [9, 10]  # its late bit is not lost


def test_unresolved_stores_make_everything_dirty(log: VcpuDirtyLog, shm_path: Path) -> None:
    mem = raw(shm_path)
    mem[48:56].view("<u8")[0] = 1
    out = np.zeros(words_for(1000) + 1, np.uint64)
    assert log.harvest(out) == 1000
    assert len(pages_of(out, 64 * out.size)) == 1000  # no bit past npages
    assert log.harvest(np.zeros_like(out)) == 0  # reported once per increase


def test_harvest_checks_the_output_bitmap(log: VcpuDirtyLog) -> None:
    with pytest.raises(ValueError):
        log.harvest(np.zeros(words_for(1000) - 1, np.uint64))
    with pytest.raises(ValueError):
        log.harvest(np.zeros(words_for(1000), np.int64))
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.harvest(np.zeros(words_for(1000), np.uint64))


def test_concurrent_writers_never_lose_a_bit(built: None, shm_path: Path) -> None:
    """Threaded C writers run the plugin's mark code while we harvest and copy.

    Every page the writers stored to must end up copied with its last value:
    a bit lost between a writer and a harvest leaves a stale copy.
    """
    npages, threads, writes = 1 << 14, 3, 4_000_000
    content_path = shm_path.with_name(shm_path.name + "-content")
    fd = os.open(content_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, npages * 8)
    os.close(fd)
    try:
        with VcpuDirtyLog.create(shm_path, npages) as log:
            content = np.memmap(content_path, dtype=np.uint64, mode="r")
            copy = np.zeros(npages, np.uint64)
            proc = subprocess.Popen([HAMMER, shm_path, content_path, str(threads), str(writes)])
            rounds = 0
            try:
                while proc.poll() is None:
                    out = np.zeros(words_for(npages), np.uint64)
                    log.harvest(out)
                    dirty = pages_of(out, npages)
                    copy[dirty] = content[dirty]
                    rounds += 1
            finally:
                proc.kill()
                proc.wait()
            assert proc.returncode == 0
            out = np.zeros(words_for(npages), np.uint64)
            log.harvest_final(out)
            dirty = pages_of(out, npages)
            copy[dirty] = content[dirty]
            assert rounds > 10
            assert np.count_nonzero(content) == npages
            stale = np.flatnonzero(copy != content)
            assert stale.size == 0, f"{stale.size} pages lost their dirty bit"
    finally:
        content_path.unlink(missing_ok=True)


# --- the plugin in QEMU ---------------------------------------------------

GUEST_PAGES = 256 << 20 >> 12


@pytest.mark.slow
@needs_qemu
async def test_plugin_catches_every_page_the_guest_wrote(built: None, shm_path: Path) -> None:
    """Pages whose bytes changed between a snapshot and `stop` all carry a bit,
    across harvests taken while the guest runs, at their guest-physical page."""
    with VcpuDirtyLog.create(shm_path, GUEST_PAGES) as log:
        async with GuestVM("pattern=random wss=32M base=4M", plugin_args=log.plugin_args()) as vm:
            await vm.wait_progress(2)
            assert log.attached == 1
            acc = np.zeros(words_for(GUEST_PAGES), np.uint64)
            log.harvest(acc)
            acc[:] = 0  # boot-time stores are not of interest
            before = vm.ram().reshape(GUEST_PAGES, 4096)
            for _ in range(5):
                await asyncio.sleep(0.2)
                assert log.harvest(acc) > 0
            await vm.stop()
            log.harvest_final(acc)
            after = vm.ram().reshape(GUEST_PAGES, 4096)

        changed = np.flatnonzero((before != after).any(axis=1))
        marked = pages_of(acc, GUEST_PAGES)
        missed = np.setdiff1d(changed, marked)
        assert changed.size > 1000
        assert missed.size == 0, f"unmarked pages: {[hex(p << 12) for p in missed[:10]]}"
        assert log.unresolved == 0
        # Bits are guest-physical: the working set [4M, 36M) plus the guest's
        # own low pages (status, stack), nothing else.
        wss = (marked >= (4 << 20) >> 12) & (marked < (36 << 20) >> 12)
        assert set(marked[~wss] << 12) <= {0x8000} | set(range(0x100000, 0x110000, 0x1000))


@pytest.mark.slow
@needs_qemu
async def test_the_plugin_loads_and_says_what_its_addresses_are(built: None, shm_path: Path) -> None:
    """QEMU up to 8.1 reports RAM-block addresses, later ones guest-physical addresses; a
    RAM-block address is the offset in the RAM file because the RAM backend is block 0."""
    expected = Addresses.RAM_BLOCK if qemu_version() < (8, 2, 0) else Addresses.PHYSICAL
    with VcpuDirtyLog.create(shm_path, GUEST_PAGES) as log:
        async with GuestVM("pattern=idle", plugin_args=log.plugin_args()) as vm:
            assert (log.attached, log.addresses) == (1, expected)
            blocks = await vm.vm.qmp.hmp("info ramblock")
            assert any(
                line.split()[:1] == ["ram0"] and int(line.split()[3], 16) == 0 for line in blocks.splitlines()
            ), blocks
    forced = Addresses.PHYSICAL if expected is Addresses.RAM_BLOCK else Addresses.RAM_BLOCK
    with VcpuDirtyLog.create(shm_path, GUEST_PAGES) as log:
        async with GuestVM("pattern=idle", plugin_args=log.plugin_args(addresses=forced)):
            assert log.addresses is forced


@pytest.mark.slow
@needs_qemu
async def test_an_idle_guest_never_blocks_a_harvest(built: None, shm_path: Path) -> None:
    with VcpuDirtyLog.create(shm_path, GUEST_PAGES) as log:
        async with GuestVM("pattern=idle", plugin_args=log.plugin_args()) as vm:
            await vm.wait_progress(2)
            out = np.zeros(words_for(GUEST_PAGES), np.uint64)
            log.harvest(out)
            await vm.stop()  # stopped vCPU: nothing in flight
            for _ in range(3):
                out[:] = 0
                start = time.monotonic()
                log.harvest(out, timeout=1)
                assert time.monotonic() - start < 0.5
            await vm.cont()
            await vm.wait_progress(2)
            out[:] = 0
            log.harvest(out)
            assert pages_of(out, GUEST_PAGES).size < 16  # stack and nothing more


@pytest.mark.slow
@needs_qemu
async def test_qemu_refuses_a_log_of_the_wrong_size(built: None, shm_path: Path) -> None:
    with VcpuDirtyLog.create(shm_path, 1000) as log:
        with pytest.raises(QemuExitedError, match="has 1000 pages, not 2000"):
            async with GuestVM("pattern=idle", plugin_args=f"{PLUGIN},shm={shm_path},pages=2000"):
                pass
        assert log.attached == 0
