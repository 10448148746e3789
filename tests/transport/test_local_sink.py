"""The local sink moves exactly the pages asked for, maps regions to file offsets, skips zero
pages in round 0, and finds every mismatching page."""

import asyncio
import os

import numpy as np
import pytest

from orchestrator.dirty.memory import MemoryLayout, RamRegion
from orchestrator.transport import LocalSink, SinkError

PAGE = 4096


def ram_file(path, npages, fill=None, seed=0):
    data = np.zeros(npages * PAGE, np.uint8) if fill is None else fill
    data.tofile(path)
    return str(path)


def test_send_copies_only_requested_pages(tmp_path):
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, 64 * PAGE, dtype=np.uint8)
    s, d = ram_file(tmp_path / "s", 64, src), ram_file(tmp_path / "d", 64)
    layout = MemoryLayout.flat(64 * PAGE)
    seen = []
    with LocalSink.flat(layout, s, d) as sink:
        moved = sink.send(np.array([1, 2, 40]), on_sent=lambda p, data: seen.append((p.tolist(), data.shape)))
        assert moved == 3 * PAGE
        assert sink.mismatched_pages().tolist() == [p for p in range(64) if p not in (1, 2, 40)]
    dst = np.fromfile(d, np.uint8).reshape(64, PAGE)
    assert np.array_equal(dst[[1, 2, 40]], src.reshape(64, PAGE)[[1, 2, 40]])
    assert not dst[0].any() and seen == [([1, 2, 40], (3, PAGE))]


def test_round0_skips_zero_pages(tmp_path):
    src = np.zeros(100 * PAGE, np.uint8)
    src[5 * PAGE + 17] = 1
    src[99 * PAGE + PAGE - 1] = 7
    s, d = ram_file(tmp_path / "s", 100, src), ram_file(tmp_path / "d", 100)
    with LocalSink.flat(MemoryLayout.flat(100 * PAGE), s, d) as sink:
        assert sink.send_nonzero() == (2, 2 * PAGE)
        assert sink.mismatched_pages().size == 0


def test_regions_map_gpa_to_file_offsets(tmp_path):
    # guest pages 0..3 live at file pages 0..3; guest pages 100..103 at file pages 4..7
    src = np.repeat(np.arange(1, 9, dtype=np.uint8), PAGE)
    s, d = ram_file(tmp_path / "s", 8, src), ram_file(tmp_path / "d", 8)
    layout = MemoryLayout((RamRegion(0, 4 * PAGE, "ram", 0), RamRegion(100 * PAGE, 4 * PAGE, "ram", 4 * PAGE)))
    with LocalSink(layout, {"ram": s}, {"ram": d}) as sink:
        sink.send(np.array([2, 101]))
        assert sink.mismatched_pages().tolist() == [0, 1, 3, 100, 102, 103]
    dst = np.fromfile(d, np.uint8).reshape(8, PAGE)[:, 0].tolist()
    assert dst == [0, 0, 3, 0, 0, 6, 0, 0]


def test_short_ram_file_is_a_clear_error(tmp_path):
    s, d = ram_file(tmp_path / "s", 8), ram_file(tmp_path / "d", 4)
    with pytest.raises(SinkError, match=r"has 16384 bytes, the guest layout needs 32768"):
        LocalSink.flat(MemoryLayout.flat(8 * PAGE), s, d)
    with pytest.raises(SinkError, match="cannot open RAM file"):
        LocalSink.flat(MemoryLayout.flat(8 * PAGE), s, str(tmp_path / "missing"))


@pytest.fixture
def shm_files():
    """Sparse RAM files on tmpfs, like QEMU's: untouched guest memory is a hole."""
    paths = [f"/dev/shm/sink-test-{os.getpid()}-{name}" for name in ("src", "dst")]
    for p in paths:
        with open(p, "wb") as f:
            f.truncate(1024 * PAGE)
    yield paths
    for p in paths:
        os.unlink(p)


def allocated_pages(path):
    return os.stat(path).st_blocks * 512 // PAGE


def test_round0_reads_only_where_the_source_holds_data(shm_files):
    src, dst = shm_files
    with open(src, "r+b") as f:
        for page in (3, 500, 1023):
            f.seek(page * PAGE + 7)
            f.write(b"x")
    with LocalSink.flat(MemoryLayout.flat(1024 * PAGE), src, dst) as sink:
        assert sink.send_nonzero() == (3, 3 * PAGE)
        assert allocated_pages(src) == 3, "holes were neither read nor allocated"
        assert allocated_pages(dst) == 3
        assert sink.mismatched_pages().size == 0
        assert allocated_pages(src) == 3 and allocated_pages(dst) == 3


def test_verification_sees_data_that_only_the_destination_holds(shm_files):
    src, dst = shm_files
    with open(dst, "r+b") as f:
        f.seek(77 * PAGE)
        f.write(b"stale")
    with LocalSink.flat(MemoryLayout.flat(1024 * PAGE), src, dst) as sink:
        assert sink.mismatched_pages().tolist() == [77]


@pytest.mark.parametrize("pages", [[2, 1], [3, 3], [[1, 2]]])
def test_pages_out_of_order_are_refused_and_nothing_copied(tmp_path, pages):
    s, d = ram_file(tmp_path / "s", 8, np.ones(8 * PAGE, np.uint8)), ram_file(tmp_path / "d", 8)
    with (
        LocalSink.flat(MemoryLayout.flat(8 * PAGE), s, d) as sink,
        pytest.raises(ValueError, match="strictly increasing"),
    ):
        sink.send(np.array(pages))
    assert not np.fromfile(d, np.uint8).any()


def stale(path, pages, value=0xAA):
    """Old data in a destination RAM file: a previous guest's bytes, not zeros."""
    with open(path, "r+b") as f:
        for p in pages:
            f.seek(p * PAGE)
            f.write(bytes([value]) * PAGE)


def test_round0_makes_a_stale_destination_equal_to_the_source(shm_files):
    """Round 0 assumes nothing about the destination: old data where the source is a hole,
    where it holds zero pages, and where it holds data all end up as the source's bytes; the
    cleared pages are holes again (no memory kept for them)."""
    src, dst = shm_files
    stale(src, range(100, 110), value=0)  # the source holds zero pages here (data, not a hole)
    stale(src, [5, 300])
    stale(dst, [*range(0, 50), *range(100, 110), 300, 1023])
    with LocalSink.flat(MemoryLayout.flat(1024 * PAGE), src, dst) as sink:
        assert sink.send_nonzero() == (2, 2 * PAGE)
        assert allocated_pages(dst) == 2
        assert sink.mismatched_pages().size == 0
    assert np.array_equal(np.fromfile(src, np.uint8), np.fromfile(dst, np.uint8))


def test_round0_writes_zeros_where_the_file_cannot_punch_holes(shm_files, monkeypatch):
    import errno

    import orchestrator.transport.ramfile as ramfile

    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(ramfile, "punch_hole", unsupported)
    src, dst = shm_files
    stale(src, [7])
    stale(dst, [0, 7, 512, 1023])
    with LocalSink.flat(MemoryLayout.flat(1024 * PAGE), src, dst) as sink:
        sink.send_nonzero()
    assert np.array_equal(np.fromfile(src, np.uint8), np.fromfile(dst, np.uint8))


async def test_lifting_the_cap_rescues_a_copy_waiting_on_the_old_one(tmp_path, monkeypatch):
    from orchestrator.transport import bucket as bucket_module
    from orchestrator.transport.local import PACE_PAGES

    npages = 2 * PACE_PAGES
    src = np.random.default_rng(3).integers(0, 256, npages * PAGE, dtype=np.uint8)
    s, d = ram_file(tmp_path / "s", npages, src), ram_file(tmp_path / "d", npages)
    takes: list[int] = []
    take = bucket_module.TokenBucket.take

    async def counted(self, nbytes):
        takes.append(nbytes)
        await take(self, nbytes)

    monkeypatch.setattr(bucket_module.TokenBucket, "take", counted)
    with LocalSink.flat(MemoryLayout.flat(npages * PAGE), s, d) as sink:
        sink.set_max_bandwidth(1)  # the second slice would wait off a mebibyte at 1 B/s
        copy = asyncio.create_task(sink.send_pages(np.arange(npages)))
        while len(takes) < 2:
            await asyncio.sleep(0.001)
        sink.set_max_bandwidth(None)
        async with asyncio.timeout(60):  # a hang guard only: without the fix this waits for days
            assert await copy == npages * PAGE
        assert sink.max_bandwidth is None and sink.mismatched_pages().size == 0
