"""Driver-specific behaviour: mlx5-like, pds-like, mtty-like, no-logging; and fault injection."""

import errno
import threading
import time

import numpy as np
import pytest

from orchestrator import uapi
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
    mig_set,
    report_arg,
)

MIB, GIB = 1 << 20, 1 << 30
S = uapi.vfio_device_mig_state
STOP_STATE, RUNNING_STATE, PRE_COPY = (
    S.VFIO_DEVICE_STATE_STOP,
    S.VFIO_DEVICE_STATE_RUNNING,
    S.VFIO_DEVICE_STATE_PRE_COPY,
)


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


def test_eio_once_loses_the_queried_bits(kernel):
    """A failed REPORT leaves the log corrupted: the firmware consumed the queried range, so a
    client that merely retries gets nothing; outside that range the log is intact."""
    model = Mlx5Like()
    fd = kernel.open_device(model)
    do_start(kernel, fd, [(0, MIB)])
    model.dma_write(4096, 1)
    model.dma_write(MIB - 4096, 1)
    model.inject(Fault.REPORT_EIO_ONCE)
    expect_errno(errno.EIO, lambda: do_report(kernel, fd, 0, MIB // 2))
    assert not do_report(kernel, fd, 0, MIB // 2).any()
    assert np.flatnonzero(do_report(kernel, fd, 0, MIB)).tolist() == [255]


def test_eio_once_on_pds_acks_what_it_read(kernel):
    model = PdsLike()
    fd = kernel.open_device(model)
    do_start(kernel, fd, [(0, 128 * 4096)])
    model.dma_write(0, 128 * 4096)
    model.inject(Fault.REPORT_EIO_ONCE)
    expect_errno(errno.EIO, lambda: do_report(kernel, fd, 0, 64 * 4096))
    assert np.flatnonzero(do_report(kernel, fd, 0, 128 * 4096)).tolist() == list(range(64, 128))


def test_detach_frees_the_tracker_and_reattach_needs_a_new_start(kernel):
    """VF disable (mlx5vf_cmd_close_migratable): the tracker and the data fds are gone. While
    detached START is ENOTCONN and REPORT is EINVAL (nothing active); after reattach the old
    log does not come back, only a new START tracks again."""
    model = Mlx5Like()
    fd = kernel.open_device(model)
    do_start(kernel, fd, [(0, MIB)])
    model.dma_write(0, 1)
    data_fd = mig_set(kernel, fd, PRE_COPY)
    model.inject(Fault.DETACH)
    assert not model.logging_active and model.tracked_ranges == []
    expect_errno(errno.ENODEV, lambda: kernel.read(data_fd, 1))
    expect_errno(errno.EINVAL, lambda: do_report(kernel, fd, 0, MIB))
    expect_errno(errno.ENOTCONN, lambda: do_start(kernel, fd, [(0, MIB)]))
    do_stop(kernel, fd)  # STOP still succeeds
    model.reattach()
    expect_errno(errno.EINVAL, lambda: do_report(kernel, fd, 0, MIB))
    do_start(kernel, fd, [(0, MIB)])
    assert not do_report(kernel, fd, 0, MIB).any()
    model.dma_write(4096, 1)
    assert np.flatnonzero(do_report(kernel, fd, 0, MIB)).tolist() == [1]


def hung_report(kernel):
    """An mlx5-like device tracking 1 MiB, with a REPORT blocked in the (emulated) firmware."""
    model = Mlx5Like()
    fd = kernel.open_device(model)
    do_start(kernel, fd, [(0, MIB)])
    model.inject(Fault.REPORT_HANG)
    reporter = Background(lambda: do_report(kernel, fd, 0, MIB))
    wait_for(lambda: model.report_hanging)
    return model, fd, reporter


def test_detach_wakes_a_hung_report_with_eio(kernel):
    """set_tracker_error completes the firmware wait before the teardown takes the mutex."""
    model, _fd, reporter = hung_report(kernel)
    model.inject(Fault.DETACH)
    assert reporter.result(5) == errno.EIO and not model.logging_active


def test_fail_start_walks_a_fallback_ladder(kernel):
    model = Mlx5Like()
    fd = kernel.open_device(model)
    model.fail_start(errno.E2BIG)
    model.fail_start(errno.EOPNOTSUPP, count=2)
    codes = [errno_of(lambda: do_start(kernel, fd, [(0, MIB)])) for _ in range(4)]
    assert codes == [errno.E2BIG, errno.EOPNOTSUPP, errno.EOPNOTSUPP, 0]
    assert model.start_calls == 4 and model.logging_active


class Background:
    """Run an ioctl sequence on another thread; `result` joins it and gives its errno."""

    def __init__(self, fn):
        self._errno = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn):
        self._errno = errno_of(fn)

    def blocked(self, seconds=0.2):
        self._thread.join(seconds)
        return self._thread.is_alive()

    def result(self, timeout):
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "still blocked"
        return self._errno


def wait_for(cond, timeout=5):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_report_hang_holds_the_state_mutex_until_released_then_eio(kernel):
    """mlx5 waits for the firmware under state_mutex: STOP and a migration state change issued
    meanwhile queue behind it; DMA, being hardware, goes on. Released, the REPORT fails with
    EIO and the queued calls complete."""
    model, fd, reporter = hung_report(kernel)
    stopper = Background(lambda: do_stop(kernel, fd))
    mover = Background(lambda: mig_set(kernel, fd, STOP_STATE))
    assert stopper.blocked() and mover.blocked()
    assert model.stop_calls == 0 and model.mig_state == RUNNING_STATE
    assert model.dma(lambda: [(0, 4096)])  # the DMA path never waits for the driver
    model.release_hang()
    assert reporter.result(5) == errno.EIO
    assert stopper.result(5) == 0 and mover.result(5) == 0
    assert not model.report_hanging and model.mig_state == STOP_STATE and not model.logging_active


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
    assert do_start(kernel, fd, [(0, 64 * 65536)], page_size=65536) == 65536 == model.granted_page_size


def test_pds_page_size_that_is_not_a_power_of_two(kernel):
    """12288: the driver counts regions and reads bits in 12 KiB pages; the device, told only
    ilog2(12288) = 13, tracks 8 KiB pages. Device page 1 (8K..16K) shows as IOVA 12K..24K."""
    model = PdsLike()
    fd = kernel.open_device(model)
    assert do_start(kernel, fd, [(0, 64 * 12288)], page_size=12288) == 12288
    assert model.tracked_ranges == [(0, 64 * 8192)]  # what the device covers
    model.dma_write(8192, 1)
    model.dma_write(64 * 8192, 1)  # past the device's pages: not tracked
    assert np.flatnonzero(do_report(kernel, fd, 0, 16 * 12288, 4096)).tolist() == [3, 4, 5]
    assert not do_report(kernel, fd, 0, 64 * 12288, 4096).any()


def test_pds_page_size_zero(kernel):
    """Only (0, 0) passes the core with page size 0; the driver would divide by it."""
    fd = kernel.open_device(PdsLike())
    expect_errno(errno.EINVAL, lambda: do_start(kernel, fd, [(0, 0)], page_size=0))


def test_pds_combines_above_max_regions(kernel):
    model = PdsLike(max_regions=1)
    fd = kernel.open_device(model)
    do_start(kernel, fd, [(0, 64 * 4096), (GIB, 64 * 4096)])
    assert model.tracked_ranges == [(0, GIB + 64 * 4096)]


@pytest.mark.parametrize(
    "ranges, ok",
    [
        ([(0, 8 * 4096)], False),  # a lone 8-page region: 1 byte, checked after the last too
        ([(0, 64 * 4096), (MIB, 8 * 4096)], False),
        ([(0, 8 * 4096), (MIB, 64 * 4096)], False),
        ([(0, 64 * 4096), (MIB, 128 * 4096)], True),
        ([(0, 71 * 4096)], True),  # bmp_bytes rounds down: 8 bytes
        ([(0, 63 * 4096)], False),
    ],
)
def test_pds_device_bitmap_offset_alignment(kernel, ranges, ok):
    """Each region adds page_count / 8 bytes of device bitmap; after every one of them the
    running offset must be a multiple of 8 bytes."""
    fd = kernel.open_device(PdsLike())
    assert errno_of(lambda: do_start(kernel, fd, ranges)) == (0 if ok else errno.EINVAL)


def test_pds_bmp_bytes_round_down_bounds_a_report(kernel):
    """71 pages: bmp_bytes is 8, so a REPORT needing 16 bytes of bitmap is EINVAL although
    the range fits the region."""
    model = PdsLike()
    fd = kernel.open_device(model)
    do_start(kernel, fd, [(0, 71 * 4096)])
    expect_errno(errno.EINVAL, lambda: do_report(kernel, fd, 0, 71 * 4096))
    model.dma_write(63 * 4096, 1)
    assert np.flatnonzero(do_report(kernel, fd, 0, 64 * 4096)).tolist() == [63]


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
