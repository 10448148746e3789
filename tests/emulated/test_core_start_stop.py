"""vfio_ioctl_device_feature dispatch and the DMA_LOGGING_START/STOP tables (linux-uapi §2.1-2.3)."""

import errno
import struct

import pytest

from orchestrator import uapi
from orchestrator.emulated import EmulatedKernel, Mlx5Like, MttyLike, NoDmaLogging, PdsLike

from .util import (
    FEATURE,
    GET,
    PROBE,
    SET,
    START,
    STOP,
    GuardedMem,
    UserMem,
    control,
    do_start,
    errno_of,
    expect_errno,
    feature,
    ranges_mem,
)

NO_SUCH_IOCTL = 0x5A7F  # _IO('Z', 0x7f): vfio-pci's ioctl falls through to ENOTTY for it


def start_arg(ranges, page_size=4096, num=None, ptr=None, argsz=None, flags=SET | START):
    mem = ranges_mem(ranges)
    num = len(ranges) if num is None else num
    arg = feature(flags, control(page_size, num, mem.addr if ptr is None else ptr), argsz)
    return arg, mem


# -- dispatch -------------------------------------------------------------------------------


def test_argsz_below_header_is_einval(kernel, mtty):
    fd, _ = mtty
    expect_errno(errno.EINVAL, lambda: kernel.ioctl(fd, FEATURE, feature(SET | STOP, argsz=7)))


@pytest.mark.parametrize("bit", [19, 20, 31])
def test_unknown_flag_bits_are_einval(kernel, mtty, bit):
    fd, _ = mtty
    expect_errno(errno.EINVAL, lambda: kernel.ioctl(fd, FEATURE, feature(SET | STOP | (1 << bit))))


def test_get_and_set_without_probe_is_einval(kernel, mtty):
    fd, _ = mtty
    expect_errno(errno.EINVAL, lambda: kernel.ioctl(fd, FEATURE, feature(GET | SET | STOP)))


@pytest.mark.parametrize("fid", [0, 3, 4, 5, 10, 11, 12, 0xFFFF])
def test_features_outside_the_core_are_enotty_on_mtty(kernel, mtty, fid):
    """mtty has no device_feature op."""
    fd, _ = mtty
    expect_errno(errno.ENOTTY, lambda: kernel.ioctl(fd, FEATURE, feature(GET | fid, bytes(64))))


@pytest.mark.parametrize("fid, minsz", [(3, 0), (4, 8), (5, 0)])
def test_low_power_features_on_vfio_pci_are_set_only(kernel, fid, minsz):
    """vfio_pci_core_pm_entry and friends: vfio_check_feature(flags, argsz, SET, minsz)."""
    fd = kernel.open_device(Mlx5Like())
    expect_errno(errno.EINVAL, lambda: kernel.ioctl(fd, FEATURE, feature(GET | fid, bytes(8))))
    kernel.ioctl(fd, FEATURE, feature(PROBE | SET | fid))
    if minsz:
        expect_errno(errno.EINVAL, lambda: kernel.ioctl(fd, FEATURE, feature(SET | fid, bytes(minsz - 1))))
    kernel.ioctl(fd, FEATURE, feature(SET | fid, bytes(minsz)))


@pytest.mark.parametrize("fid", [0, 10, 12, 0xFFFF])
def test_features_vfio_pci_does_not_know_are_enotty(kernel, fid):
    """PCI_VF_TOKEN (0) is ENOTTY on a VF: only a PF has a vf_token."""
    fd = kernel.open_device(PdsLike())
    expect_errno(errno.ENOTTY, lambda: kernel.ioctl(fd, FEATURE, feature(GET | fid, bytes(64))))


def test_header_past_the_buffer_is_efault(kernel, mtty):
    fd, _ = mtty
    expect_errno(errno.EFAULT, lambda: kernel.ioctl(fd, FEATURE, bytearray(4)))


def test_unknown_request_and_fd(kernel, mtty):
    fd, _ = mtty
    expect_errno(errno.ENOTTY, lambda: kernel.ioctl(fd, NO_SUCH_IOCTL, bytearray(32)))
    expect_errno(errno.EBADF, lambda: kernel.ioctl(999, FEATURE, feature(SET | STOP)))


# -- START ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fid", [START, STOP, uapi.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT])
@pytest.mark.parametrize("flags", [PROBE, PROBE | SET, PROBE | GET, SET, GET])
def test_no_log_ops_is_enotty_before_anything_else(kernel, fid, flags):
    fd = kernel.open_device(NoDmaLogging())
    expect_errno(errno.ENOTTY, lambda: kernel.ioctl(fd, FEATURE, feature(flags | fid, bytes(40))))


@pytest.mark.parametrize(
    "flags, want",
    [(PROBE, 0), (PROBE | SET, 0), (PROBE | GET, errno.EINVAL), (GET, errno.EINVAL), (0, errno.EINVAL)],
)
def test_start_probe_and_direction(kernel, mtty, flags, want):
    fd, model = mtty
    assert errno_of(lambda: kernel.ioctl(fd, FEATURE, feature(flags | START))) == want
    assert not model.logging_active and model.start_calls == 0


def test_start_argsz_31_is_einval(kernel, mtty):
    fd, _ = mtty
    arg, _mem = start_arg([(0, 4096)], argsz=31)
    expect_errno(errno.EINVAL, lambda: kernel.ioctl(fd, FEATURE, arg))
    arg, _mem = start_arg([(0, 4096)], argsz=32)
    kernel.ioctl(fd, FEATURE, arg)


def test_start_zero_ranges_is_einval(kernel, mtty):
    fd, _ = mtty
    arg, _mem = start_arg([(0, 4096)], num=0)
    expect_errno(errno.EINVAL, lambda: kernel.ioctl(fd, FEATURE, arg))


@pytest.mark.parametrize("kpage, limit", [(4096, 256), (16384, 1024), (65536, 4096)])
def test_start_log_max_ranges_is_one_kernel_page(kpage, limit):
    kernel = EmulatedKernel(page_size=kpage)
    fd = kernel.open_device(MttyLike())
    ranges = [(i * 2 * 4096, 4096) for i in range(limit + 1)]
    arg, _mem = start_arg(ranges)
    expect_errno(errno.E2BIG, lambda: kernel.ioctl(fd, FEATURE, arg))
    arg, _mem = start_arg(ranges[:limit])
    kernel.ioctl(fd, FEATURE, arg)


def test_start_e2big_is_checked_before_reading_ranges(kernel, mtty):
    fd, _ = mtty
    arg, _mem = start_arg([(0, 4096)], num=257, ptr=8)
    expect_errno(errno.E2BIG, lambda: kernel.ioctl(fd, FEATURE, arg))


@pytest.mark.parametrize("rng", [(4096 + 512, 4096), (0, 4096 + 1), (2048, 2048)])
def test_start_misaligned_is_einval(kernel, mtty, rng):
    fd, _ = mtty
    arg, _mem = start_arg([rng])
    expect_errno(errno.EINVAL, lambda: kernel.ioctl(fd, FEATURE, arg))


def test_start_alignment_is_a_mask_test(kernel, mtty):
    """IS_ALIGNED with a non-power-of-two page size masks with page_size-1; with 0, only 0 passes."""
    fd, _model = mtty
    assert do_start(kernel, fd, [(0x8000, 0x4000)], page_size=12288) == 12288  # 12287 & 0x8000 == 0
    kernel.ioctl(fd, FEATURE, feature(SET | STOP))
    arg, _mem = start_arg([(12288, 12288)], page_size=12288)
    expect_errno(errno.EINVAL, lambda: kernel.ioctl(fd, FEATURE, arg))
    arg, _mem = start_arg([(4096, 4096)], page_size=0)
    expect_errno(errno.EINVAL, lambda: kernel.ioctl(fd, FEATURE, arg))
    assert do_start(kernel, fd, [(0, 0)], page_size=0) == 0


@pytest.mark.parametrize("rng", [(2**64 - 4096, 4096), (2**64 - 4096, 8192), (4096, 2**64 - 4096)])
def test_start_overflow_is_eoverflow(kernel, mtty, rng):
    fd, _ = mtty
    arg, _mem = start_arg([rng])
    expect_errno(errno.EOVERFLOW, lambda: kernel.ioctl(fd, FEATURE, arg))


@pytest.mark.parametrize(
    "ranges",
    [
        [(0, 8192), (4096, 8192)],
        [(4096, 8192), (0, 8192)],
        [(0, 4096), (0, 4096)],
        [(0, 1 << 20), (8192, 4096)],
        [(8192, 4096), (0, 1 << 20)],
        [(0, 4096), (1 << 20, 4096), (0, 2 << 20)],
    ],
)
def test_start_overlap_is_einval(kernel, mtty, ranges):
    fd, _ = mtty
    arg, _mem = start_arg(ranges)
    expect_errno(errno.EINVAL, lambda: kernel.ioctl(fd, FEATURE, arg))


def test_start_adjacent_ranges_do_not_overlap(kernel, mtty):
    fd, model = mtty
    do_start(kernel, fd, [(4096, 4096), (0, 4096), (8192, 4096)])
    assert model.tracked_ranges == [(0, 4096), (4096, 4096), (8192, 4096)]  # by start, as the tree


def test_start_zero_length_nodes_keep_the_interval_tree_predicate(kernel, mtty):
    """[iova, iova-1] overlaps only a range strictly containing iova; (0, 0) is [0, U64_MAX]."""
    fd, _ = mtty
    do_start(kernel, fd, [(0, 8192), (8192, 0), (8192, 4096)])
    arg, _mem = start_arg([(0, 8192), (4096, 0)])
    expect_errno(errno.EINVAL, lambda: kernel.ioctl(fd, FEATURE, arg))
    arg, _mem = start_arg([(1 << 20, 4096), (0, 0)])
    expect_errno(errno.EINVAL, lambda: kernel.ioctl(fd, FEATURE, arg))


def test_start_errors_follow_array_order(kernel, mtty):
    """Each range is copied and checked in turn: the first bad one decides the errno."""
    fd, _ = mtty
    arg, _mem = start_arg([(0, 4096), (0, 4096), (2**64 - 4096, 8192)])
    expect_errno(errno.EINVAL, lambda: kernel.ioctl(fd, FEATURE, arg))
    arg, _mem = start_arg([(0, 4096), (2**64 - 4096, 8192), (0, 4096)])
    expect_errno(errno.EOVERFLOW, lambda: kernel.ioctl(fd, FEATURE, arg))
    mem = GuardedMem(32)
    ptr = mem.put_at_end(struct.pack("<QQQQ", 0, 4096, 123, 4096))  # third range unreadable
    expect_errno(errno.EINVAL, lambda: kernel.ioctl(fd, FEATURE, feature(SET | START, control(4096, 3, ptr))))
    ptr = mem.put_at_end(struct.pack("<QQQQ", 0, 4096, 8192, 4096))
    expect_errno(errno.EFAULT, lambda: kernel.ioctl(fd, FEATURE, feature(SET | START, control(4096, 3, ptr))))


def test_start_bad_ranges_pointer_is_efault(kernel, mtty):
    fd, model = mtty
    arg, _mem = start_arg([(0, 4096)], ptr=0)
    expect_errno(errno.EFAULT, lambda: kernel.ioctl(fd, FEATURE, arg))
    arg, _mem = start_arg([(0, 4096)], ptr=16)
    expect_errno(errno.EFAULT, lambda: kernel.ioctl(fd, FEATURE, arg))
    assert model.start_calls == 0


def test_start_control_past_the_buffer_is_efault(kernel, mtty):
    fd, _ = mtty
    arg = feature(SET | START, bytes(16), argsz=32)
    expect_errno(errno.EFAULT, lambda: kernel.ioctl(fd, FEATURE, arg))


def test_start_driver_errno_is_returned(kernel):
    model = Mlx5Like()
    fd = kernel.open_device(model)
    model.fail_start(errno.ENOMEM)
    arg, _mem = start_arg([(0, 4096)])
    expect_errno(errno.ENOMEM, lambda: kernel.ioctl(fd, FEATURE, arg))
    assert not model.logging_active


def test_start_writes_back_the_whole_control_with_the_chosen_page_size(kernel):
    fd = kernel.open_device(Mlx5Like(min_page_size=8192))
    arg, mem = start_arg([(0, 1 << 20)], page_size=4096)
    before = bytes(arg)
    kernel.ioctl(fd, FEATURE, arg)
    out = uapi.vfio_device_feature_dma_logging_control.unpack(arg, 8)
    assert (out.page_size, out.num_ranges, out.ranges) == (8192, 1, mem.addr)
    assert arg[:8] == before[:8] and arg[16:] == before[16:]


# -- STOP -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, want",
    [(SET, 0), (PROBE, 0), (PROBE | SET, 0), (GET, errno.EINVAL), (PROBE | GET, errno.EINVAL), (0, errno.EINVAL)],
)
def test_stop_table(kernel, mlx5, flags, want):
    fd, model = mlx5
    assert errno_of(lambda: kernel.ioctl(fd, FEATURE, feature(flags | STOP))) == want
    assert model.stop_calls == (1 if flags == SET else 0)


def test_stop_is_zero_even_if_never_started(kernel, mlx5):
    fd, model = mlx5
    kernel.ioctl(fd, FEATURE, feature(SET | STOP))
    kernel.ioctl(fd, FEATURE, feature(SET | STOP))
    assert not model.logging_active


def test_start_stop_start_cycle(kernel, mlx5):
    fd, model = mlx5
    do_start(kernel, fd, [(0, 4096)])
    assert model.logging_active
    kernel.ioctl(fd, FEATURE, feature(SET | STOP))
    assert not model.logging_active and model.tracked_ranges == []
    do_start(kernel, fd, [(0, 4096)])
    assert model.logging_active


def test_bitmap_pointer_alignment_does_not_matter_for_control(kernel, mtty):
    fd, _ = mtty
    mem = UserMem(64)
    mem.put(3, struct.pack("<QQ", 0, 4096))
    kernel.ioctl(fd, FEATURE, feature(SET | START, control(4096, 1, mem.addr + 3)))
