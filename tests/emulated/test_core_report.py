"""DMA_LOGGING_REPORT: the core's table and the iova_bitmap write semantics (linux-uapi §2.3, §3)."""

import errno
import time

import numpy as np
import pytest

from orchestrator.emulated import Mlx5Like

from .util import (
    FEATURE,
    GET,
    PROBE,
    REPORT,
    SET,
    GuardedMem,
    UserMem,
    do_report,
    do_start,
    errno_of,
    expect_errno,
    feature,
    report_arg,
)

GIB, MIB = 1 << 30, 1 << 20


def tracker(kernel, granule=4096, ranges=((0, 4 * GIB),), **kw):
    """An mlx5-like device logging at exactly `granule`."""
    model = Mlx5Like(min_page_size=granule, max_page_size=granule, max_addr_space=1 << 48, **kw)
    fd = kernel.open_device(model)
    assert do_start(kernel, fd, list(ranges)) == granule
    return fd, model


# -- the core's table -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, want", [(PROBE, 0), (PROBE | GET, 0), (PROBE | SET, errno.EINVAL), (SET, errno.EINVAL), (0, errno.EINVAL)]
)
def test_report_probe_and_direction(kernel, mlx5, flags, want):
    fd, model = mlx5
    assert errno_of(lambda: kernel.ioctl(fd, FEATURE, feature(flags | REPORT))) == want
    assert model.report_calls == 0


def test_report_argsz(kernel):
    fd, _ = tracker(kernel)
    mem = UserMem(64)
    arg = report_arg(0, 4096, 4096, mem.addr)
    arg[0:4] = (39).to_bytes(4, "little")
    expect_errno(errno.EINVAL, lambda: kernel.ioctl(fd, FEATURE, arg))
    arg[0:4] = (40).to_bytes(4, "little")
    kernel.ioctl(fd, FEATURE, arg)


@pytest.mark.parametrize(
    "page_size, want",
    [
        (0, errno.EINVAL),
        (2048, errno.EINVAL),
        (12288, errno.EINVAL),
        (4097, errno.EINVAL),
        (4096, 0),
        (8192, 0),
        (1 << 30, 0),
    ],
)
def test_report_page_size(kernel, page_size, want):
    fd, _ = tracker(kernel)
    mem = UserMem(64)
    assert errno_of(lambda: kernel.ioctl(fd, FEATURE, report_arg(0, 1 << 30, page_size, mem.addr))) == want


@pytest.mark.parametrize("iova, length", [(2**64 - 4096, 4096), (1, 2**64 - 1), (2**63, 2**63)])
def test_report_overflow(kernel, iova, length):
    fd, _ = tracker(kernel)
    mem = UserMem(64)
    expect_errno(errno.EOVERFLOW, lambda: kernel.ioctl(fd, FEATURE, report_arg(iova, length, 4096, mem.addr)))


def test_report_needs_no_alignment_from_the_core(kernel):
    fd, model = tracker(kernel)
    model.dma_write(0x1000, 1)
    bits = do_report(kernel, fd, 0x800, 0x1801, 4096)  # unaligned iova and length
    assert bits.tolist() == [1, 1]  # unit [0x1000, 0x2000) touches bits (0x800>>12)=0 and (0x17ff>>12)=1


def test_report_payload_past_the_buffer_is_efault(kernel):
    fd, _ = tracker(kernel)
    expect_errno(errno.EFAULT, lambda: kernel.ioctl(fd, FEATURE, feature(GET | REPORT, bytes(16), argsz=40)))


# -- bit layout -----------------------------------------------------------------------------


def test_bits_are_relative_to_report_iova_lsb_first_little_endian(kernel):
    fd, model = tracker(kernel)
    base = GIB + 64 * 4096
    for page in (0, 5, 63, 64, 70):
        model.dma_write(base + page * 4096 + 100, 1)
    mem = UserMem(64)
    kernel.ioctl(fd, FEATURE, report_arg(base, 128 * 4096, 4096, mem.addr))
    words = np.frombuffer(mem.bytes(0, 16), dtype="<u8")
    assert int(words[0]) == (1 << 0) | (1 << 5) | (1 << 63)
    assert int(words[1]) == (1 << 0) | (1 << 6)
    assert mem.bytes(8, 1) == bytes([0b0100_0001])


def test_replication_when_tracker_is_coarser(kernel):
    fd, model = tracker(kernel, granule=MIB)
    model.dma_write(3 * MIB + 12345, 1)
    bits = do_report(kernel, fd, 0, 8 * MIB, 4096)
    assert np.flatnonzero(bits).tolist() == list(range(3 * 256, 4 * 256))


def test_merging_when_tracker_is_finer(kernel):
    fd, model = tracker(kernel, granule=4096)
    model.dma_write(65536 * 2 + 4096 * 7, 1)
    model.dma_write(65536 * 2 + 4096 * 9, 1)
    model.dma_write(65536 * 5, 4096 * 17)  # spills into the next 64K page
    bits = do_report(kernel, fd, 0, 16 * 65536, 65536)
    assert np.flatnonzero(bits).tolist() == [2, 5, 6]


def test_range_is_rounded_outward_when_report_iova_is_unaligned(kernel):
    fd, model = tracker(kernel, granule=8192)
    model.dma_write(8192, 1)  # unit [8192, 16384)
    bits = do_report(kernel, fd, 4096, 64 * 4096, 8192)  # bit n covers [4096 + n*8192, ...)
    assert np.flatnonzero(bits).tolist() == [0, 1]


def test_unit_starting_below_report_iova_is_dropped_and_cleared(kernel):
    fd, model = tracker(kernel, granule=MIB)
    model.dma_write(MIB + 600 * 1024, 1)  # unit [1M, 2M)
    assert not do_report(kernel, fd, MIB + 512 * 1024, MIB, 4096).any()
    assert not do_report(kernel, fd, MIB, MIB, 4096).any()  # the device forgot it


def test_bits_past_length_are_set_through_the_straddling_unit(kernel):
    """iova_bitmap_set is bounded by the pinned user pages, not by the length: the 1 MiB unit
    sets all its 256 bits although the bitmap has one byte."""
    fd, model = tracker(kernel, granule=MIB)
    model.dma_write(0, 1)
    mem = UserMem(64)
    kernel.ioctl(fd, FEATURE, report_arg(0, 3 * 4096, 4096, mem.addr))
    assert mem.bytes(0, 33) == b"\xff" * 32 + b"\x00"


@pytest.mark.parametrize("offset, end", [(4096, 2 * 4096), (4096 + 2048, 3 * 4096)])
def test_tail_bits_reach_the_end_of_the_last_pinned_page(kernel, offset, end):
    """A 1 GiB unit needs 32 KiB of bitmap; the pin for it (iova_bitmap_get) covers the one
    bitmap byte's page, plus one more page when the window starts mid-page, and every bit
    there is set. The page after that is never touched."""
    fd, model = tracker(kernel, granule=GIB)
    model.dma_write(0, 1)
    mem = UserMem(4 * 4096)
    kernel.ioctl(fd, FEATURE, report_arg(0, 3 * 4096, 4096, mem.addr + offset))
    assert mem.bytes(0, offset) == bytes(offset)
    assert mem.bytes(offset, end - offset) == b"\xff" * (end - offset)
    assert mem.bytes(end) == bytes(4 * 4096 - end)


def test_tail_bits_never_reach_a_guard_page(kernel):
    """The second page of the window is inaccessible: pinning stops before it, so the bits
    land in the bitmap's own page only and the ioctl succeeds."""
    fd, model = tracker(kernel, granule=GIB)
    model.dma_write(0, 1)
    mem = GuardedMem(8)
    kernel.ioctl(fd, FEATURE, report_arg(0, 3 * 4096, 4096, mem.start))
    head = mem.start - mem.addr
    assert mem.bytes(0, head) == bytes(head)
    assert mem.bytes(head, 8) == b"\xff" * 8


def test_read_clears_and_new_dma_shows_again(kernel):
    fd, model = tracker(kernel)
    model.dma_write(4096 * 3, 4096 * 2)
    assert np.flatnonzero(do_report(kernel, fd, 0, 64 * 4096)).tolist() == [3, 4]
    assert not do_report(kernel, fd, 0, 64 * 4096).any()
    model.dma_write(4096 * 4, 1)
    assert np.flatnonzero(do_report(kernel, fd, 0, 64 * 4096)).tolist() == [4]


def test_clear_is_limited_to_the_queried_range(kernel):
    fd, model = tracker(kernel)
    model.dma_write(0, 8 * 4096)
    assert np.flatnonzero(do_report(kernel, fd, 2 * 4096, 3 * 4096)).tolist() == [0, 1, 2]
    assert np.flatnonzero(do_report(kernel, fd, 0, 8 * 4096)).tolist() == [0, 1, 5, 6, 7]


def test_report_only_ors(kernel):
    fd, model = tracker(kernel)
    mem = UserMem(32)
    pattern = bytes([0xA5, 0x00, 0x0F, 0xF0]) * 8
    mem.put(0, pattern)
    model.dma_write(4096 * 1, 1)
    model.dma_write(4096 * 9, 1)
    kernel.ioctl(fd, FEATURE, report_arg(0, 256 * 4096, 4096, mem.addr))
    want = bytearray(pattern)
    want[0] |= 0b10
    want[1] |= 0b10
    assert mem.bytes(0, 32) == bytes(want)


@pytest.mark.parametrize("offset", [0, 2048, 0xFF1, 4095])
def test_any_bitmap_byte_alignment(kernel, offset):
    fd, model = tracker(kernel)
    pages = [0, 1, 7, 8, 63, 64, 4095, 4096, 9999]
    for p in pages:
        model.dma_write(p * 4096, 1)
    mem = UserMem(offset + 4096)
    mem.put(0, b"\x5a" * offset)
    bits = do_report(kernel, fd, 0, 10000 * 4096, 4096, mem=mem, offset=offset)
    assert np.flatnonzero(bits).tolist() == pages
    assert mem.bytes(0, offset) == b"\x5a" * offset  # nothing before the bitmap touched


def test_bad_bitmap_pointer_loses_bits_silently(kernel):
    """iova_bitmap_set returns void: an unpinnable page drops its bits, the ioctl succeeds."""
    fd, model = tracker(kernel)
    model.dma_write(0, 1)
    kernel.ioctl(fd, FEATURE, report_arg(0, 64 * 4096, 4096, 0))
    assert not do_report(kernel, fd, 0, 64 * 4096).any()  # read and cleared all the same


def test_bitmap_straddling_an_unmapped_page_keeps_the_good_part(kernel):
    fd, model = tracker(kernel)
    mem = GuardedMem(8)
    model.dma_write(0, 1)  # byte 0 of the bitmap: mapped
    model.dma_write(8 * 8 * 4096, 1)  # byte 8: on the guard page
    kernel.ioctl(fd, FEATURE, report_arg(0, 128 * 4096, 4096, mem.start))
    assert mem.bytes(mem.start - mem.addr, 8) == b"\x01" + bytes(7)


def test_untracked_and_idle_writes_are_invisible(kernel):
    model = Mlx5Like()
    fd = kernel.open_device(model)
    model.dma_write(0, 4096)  # logging off
    do_start(kernel, fd, [(1 << 20, 1 << 20)])
    model.dma_write(0, 4096)  # outside the tracked range
    model.dma_write((1 << 20) - 4096, 8192)  # straddles: only the tracked half counts
    bits = do_report(kernel, fd, 0, 4 << 20)
    assert np.flatnonzero(bits).tolist() == [256]


def test_large_reports_are_fast(kernel):
    fd, model = tracker(kernel)
    model.dma_write(0, GIB)
    t = time.perf_counter()
    bits = do_report(kernel, fd, 0, GIB)
    assert bits.all() and time.perf_counter() - t < 0.5
    for page in range(0, 262144, 2):
        model.dma_write(page * 4096, 1)
    t = time.perf_counter()
    bits = do_report(kernel, fd, 0, GIB)
    assert bits[::2].all() and not bits[1::2].any() and time.perf_counter() - t < 0.5
