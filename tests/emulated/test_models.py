"""Driver-specific behaviour: mlx5-like, pds-like, mtty-like, no-logging; and fault injection."""

import errno
import threading
import time

import numpy as np
import pytest

from orchestrator.emulated import Fault, Mlx5Like, MttyLike, NoDmaLogging, PdsLike

from .util import (
    FEATURE,
    PROBE,
    SET,
    START,
    UserMem,
    do_report,
    do_start,
    do_stop,
    errno_of,
    expect_errno,
    feature,
    report_arg,
)

MIB, GIB = 1 << 20, 1 << 30


# -- mlx5 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hint, granted",
    [(4096, 4096), (8192, 8192), (12288, 8192), (1, 4096), (1 << 30, 1 << 21), (3 << 20, 1 << 21)],
)
def test_mlx5_page_size_floor_log2_then_clamp_and_written_back(kernel, hint, granted):
    model = Mlx5Like(min_page_size=4096, max_page_size=1 << 21)
    fd = kernel.open_device(model)
    ranges = [(0, 1 << 22)] if (1 << 22) % hint == 0 else [(0, hint * 4)]
    assert do_start(kernel, fd, ranges, page_size=hint) == granted == model.granted_page_size


def test_mlx5_page_size_zero(kernel):
    """The core lets only (0, 0) through with page_size 0: node [0, U64_MAX], whose u64 length
    wraps to 0, and no address space fits that."""
    fd = kernel.open_device(Mlx5Like())
    expect_errno(errno.EOPNOTSUPP, lambda: do_start(kernel, fd, [(0, 0)], page_size=0))


def test_mlx5_combines_above_max_ranges(kernel):
    model = Mlx5Like(max_ranges=2)
    fd = kernel.open_device(model)
    do_start(kernel, fd, [(0, 4096), (3 * 4096, 4096), (10 * 4096, 4096)])
    assert model.tracked_ranges == [(0, 4 * 4096), (10 * 4096, 4096)]
    model.dma_write(4096, 1)  # in the merged gap: tracked now
    assert do_report(kernel, fd, 0, 16 * 4096)[1]


def test_mlx5_address_space_limits(kernel):
    model = Mlx5Like(max_ranges=1, min_addr_space=1 << 16, max_addr_space=1 << 30)
    fd = kernel.open_device(model)
    expect_errno(errno.EOPNOTSUPP, lambda: do_start(kernel, fd, [(0, 4096)]))  # 4K < 64K
    # one range after combining spans the gap: 1 GiB + 4 KiB rounds up to 2 GiB > 1 GiB
    expect_errno(errno.EOPNOTSUPP, lambda: do_start(kernel, fd, [(0, 4096), (GIB, 4096)]))
    do_start(kernel, fd, [(0, 4096), (GIB - 4096, 4096)])  # exactly 1 GiB
    assert model.tracked_ranges == [(0, GIB)]


def test_mlx5_double_start_report_before_start_and_stop(kernel):
    model = Mlx5Like()
    fd = kernel.open_device(model)
    expect_errno(errno.EINVAL, lambda: do_report(kernel, fd, 0, 4096))
    do_start(kernel, fd, [(0, MIB)])
    expect_errno(errno.EINVAL, lambda: do_start(kernel, fd, [(0, MIB)]))
    assert model.tracked_ranges == [(0, MIB)]
    do_stop(kernel, fd)
    expect_errno(errno.EINVAL, lambda: do_report(kernel, fd, 0, 4096))


def test_mlx5_sticky_eio_until_stop_and_start(kernel):
    model = Mlx5Like()
    fd = kernel.open_device(model)
    do_start(kernel, fd, [(0, MIB)])
    model.inject(Fault.REPORT_EIO_STICKY)
    for _ in range(3):
        expect_errno(errno.EIO, lambda: do_report(kernel, fd, 0, MIB))
    do_stop(kernel, fd)
    do_start(kernel, fd, [(0, MIB)])
    model.dma_write(0, 1)
    assert do_report(kernel, fd, 0, MIB)[0]


def test_eio_once(kernel):
    model = Mlx5Like()
    fd = kernel.open_device(model)
    do_start(kernel, fd, [(0, MIB)])
    model.dma_write(4096, 1)
    model.inject(Fault.REPORT_EIO_ONCE)
    expect_errno(errno.EIO, lambda: do_report(kernel, fd, 0, MIB))
    assert np.flatnonzero(do_report(kernel, fd, 0, MIB)).tolist() == [1]


def test_detach_is_enotconn_until_reattached(kernel):
    model = Mlx5Like()
    fd = kernel.open_device(model)
    model.inject(Fault.DETACH)
    expect_errno(errno.ENOTCONN, lambda: do_start(kernel, fd, [(0, MIB)]))
    model.reattach()
    do_start(kernel, fd, [(0, MIB)])
    model.inject(Fault.DETACH)
    expect_errno(errno.ENOTCONN, lambda: do_report(kernel, fd, 0, MIB))
    do_stop(kernel, fd)  # STOP still succeeds
    model.reattach()
    do_start(kernel, fd, [(0, MIB)])


def test_fail_start_walks_a_fallback_ladder(kernel):
    model = Mlx5Like()
    fd = kernel.open_device(model)
    model.fail_start(errno.E2BIG)
    model.fail_start(errno.EOPNOTSUPP, count=2)
    codes = [errno_of(lambda: do_start(kernel, fd, [(0, MIB)])) for _ in range(4)]
    assert codes == [errno.E2BIG, errno.EOPNOTSUPP, errno.EOPNOTSUPP, 0]
    assert model.start_calls == 4 and model.logging_active


def test_report_hang_blocks_until_released_then_eio(kernel):
    model = Mlx5Like()
    fd = kernel.open_device(model)
    do_start(kernel, fd, [(0, MIB)])
    model.inject(Fault.REPORT_HANG)
    result = {}

    def worker():
        result["errno"] = errno_of(lambda: do_report(kernel, fd, 0, MIB))

    t = threading.Thread(target=worker)
    t.start()
    deadline = time.monotonic() + 5
    while not model.report_hanging and time.monotonic() < deadline:
        time.sleep(0.001)
    assert model.report_hanging
    do_stop(kernel, fd)  # other ioctls are not stuck behind the hung REPORT
    model.release_hang()
    t.join(5)
    assert result == {"errno": errno.EIO} and not model.report_hanging


def test_report_hang_times_out(kernel):
    model = Mlx5Like(hang_timeout=0.05)
    fd = kernel.open_device(model)
    do_start(kernel, fd, [(0, MIB)])
    model.inject(Fault.REPORT_HANG)
    t = time.monotonic()
    expect_errno(errno.EIO, lambda: do_report(kernel, fd, 0, MIB))
    assert 0.04 < time.monotonic() - t < 2
    model.inject(Fault.REPORT_HANG, hang_timeout=0.01)
    expect_errno(errno.EIO, lambda: do_report(kernel, fd, 0, MIB))
    do_report(kernel, fd, 0, MIB)


# -- pds ------------------------------------------------------------------------------------


def test_pds_start_errors(kernel):
    fd = kernel.open_device(PdsLike(preexisting_regions=1))
    expect_errno(errno.EEXIST, lambda: do_start(kernel, fd, [(0, MIB)]))
    fd = kernel.open_device(PdsLike(max_regions=0))
    expect_errno(errno.EOPNOTSUPP, lambda: do_start(kernel, fd, [(0, MIB)]))
    fd = kernel.open_device(PdsLike())
    do_start(kernel, fd, [(0, MIB)])
    expect_errno(errno.EINVAL, lambda: do_start(kernel, fd, [(0, MIB)]))


def test_pds_page_size_is_used_as_given(kernel):
    model = PdsLike()
    fd = kernel.open_device(model)
    assert do_start(kernel, fd, [(0, MIB)], page_size=65536) == 65536 == model.granted_page_size


def test_pds_combines_above_max_regions(kernel):
    model = PdsLike(max_regions=1)
    fd = kernel.open_device(model)
    do_start(kernel, fd, [(0, 64 * 4096), (GIB, 64 * 4096)])
    assert model.tracked_ranges == [(0, GIB + 64 * 4096)]


def test_pds_device_bitmap_offset_alignment(kernel):
    """Every region but the last must start at a multiple of 8 bytes of device bitmap."""
    fd = kernel.open_device(PdsLike())
    expect_errno(errno.EINVAL, lambda: do_start(kernel, fd, [(0, 8 * 4096), (MIB, 4096)]))
    do_start(kernel, fd, [(0, 64 * 4096), (MIB, 8 * 4096)])


def test_pds_report_must_fit_one_region(kernel):
    model = PdsLike()
    fd = kernel.open_device(model)
    do_start(kernel, fd, [(0, 64 * 4096), (MIB, 64 * 4096)])
    expect_errno(errno.EINVAL, lambda: do_report(kernel, fd, 0, MIB + 64 * 4096))  # spans both
    expect_errno(errno.EINVAL, lambda: do_report(kernel, fd, 64 * 4096, 4096))  # in no region
    expect_errno(errno.EINVAL, lambda: do_report(kernel, fd, 0, 0))  # length 0
    model.dma_write(MIB + 4096, 1)
    assert np.flatnonzero(do_report(kernel, fd, MIB, 64 * 4096)).tolist() == [1]


def test_pds_report_page_size_may_differ(kernel):
    model = PdsLike()
    fd = kernel.open_device(model)
    do_start(kernel, fd, [(0, 128 * 4096)])
    model.dma_write(70 * 4096, 1)
    assert np.flatnonzero(do_report(kernel, fd, 0, 128 * 4096, page_size=65536)).tolist() == [4]


def test_pds_report_at_64_page_offsets_is_exact(kernel):
    model = PdsLike()
    fd = kernel.open_device(model)
    do_start(kernel, fd, [(0, 256 * 4096)])
    model.dma_write(0, 256 * 4096)
    assert do_report(kernel, fd, 64 * 4096, 64 * 4096).all()
    assert np.flatnonzero(do_report(kernel, fd, 0, 256 * 4096)).tolist() == list(range(64)) + list(range(128, 256))


def test_pds_misaligned_report_skips_the_head_and_acks_past_the_end(kernel):
    """Report at page 3 for 64 pages: bmp_offset rounds up to byte 1, so the window is pages
    8..71. Pages 3..7 are skipped (still dirty); pages 67..71 map to bits 64..68, past the
    8-byte bitmap, so they are dropped, yet acked: lost."""
    model = PdsLike()
    fd = kernel.open_device(model)
    do_start(kernel, fd, [(0, 256 * 4096)])
    model.dma_write(0, 256 * 4096)
    mem = UserMem(64)
    kernel.ioctl(fd, FEATURE, report_arg(3 * 4096, 64 * 4096, 4096, mem.addr))
    bits = mem.bits(0, 128)
    assert np.flatnonzero(bits).tolist() == list(range(5, 64))  # page 8 is bit 5
    left = np.flatnonzero(do_report(kernel, fd, 0, 256 * 4096)).tolist()
    assert left == list(range(8)) + list(range(72, 256))


# -- mtty and no-logging ----------------------------------------------------------------------


def test_mtty_logging_is_a_no_op(kernel):
    model = MttyLike()
    fd = kernel.open_device(model)
    assert do_start(kernel, fd, [(0, 12288 * 4)], page_size=12288) == 12288
    do_start(kernel, fd, [(0, MIB)])  # a second START is fine
    model.dma_write(0, MIB)
    assert not do_report(kernel, fd, 0, MIB).any()
    do_stop(kernel, fd)
    do_report(kernel, fd, 0, MIB)  # even when "stopped"


def test_no_dma_logging_probe_is_enotty_but_migrates(kernel):
    model = NoDmaLogging()
    fd = kernel.open_device(model)
    expect_errno(errno.ENOTTY, lambda: kernel.ioctl(fd, FEATURE, feature(PROBE | SET | START)))
    assert model.migration_flags and model.mig_state is not None


@pytest.mark.parametrize("cls", [Mlx5Like, PdsLike, MttyLike])
def test_close_stops_logging(kernel, cls):
    model = cls()
    fd = kernel.open_device(model)
    fd2 = kernel.open_device(model)
    do_start(kernel, fd, [(0, MIB)])
    kernel.close(fd2)
    assert model.logging_active
    kernel.close(fd)
    assert not model.logging_active and model.tracked_ranges == []
    expect_errno(errno.EBADF, lambda: kernel.close(fd))


def test_bad_model_arguments():
    with pytest.raises(ValueError):
        Mlx5Like(min_page_size=3000)
    with pytest.raises(ValueError):
        MttyLike(iommu_page_size=0)
    with pytest.raises(ValueError):
        MttyLike(device_data=b"x" * 10, max_data_size=4)
