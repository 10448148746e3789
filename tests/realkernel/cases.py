"""The differential table: what the kernel answers, asserted the same against both kernels.

Each case drives a `Lab` (lab.py) with the raw bytes a C program would pass and returns an
outcome (errnos, granted page sizes, bitmap bits or bytes, stream lengths); `expect` is what
Linux 6.12 answers. test_differential.py runs every case against the emulated kernel on the
host and against the real one inside the lab's VM, with the same assertion.

Devices: mtty (the in-tree sample: the core's checks, no-op log ops, migration with flags
0x7, 2 ports) and dirtydev (our module: an mlx5-like or pds-like tracker whose REPORT goes
through the real iova_bitmap); IOMMU dirty tracking runs on the iommufd selftest's mock
domain. What the core, iova_bitmap, mtty and iommufd answer is the kernel's; dirtydev's own
choices (clamped page sizes, EOPNOTSUPP, region rules, the faults) are those of the Mlx5Like
and PdsLike models, which the module implements, so those cases check the path around them.
"""

from __future__ import annotations

import ctypes
import errno
import struct
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator import uapi
from orchestrator.emulated import Fault
from tests.emulated.util import (
    FEATURE,
    GET,
    MIG_DATA_SIZE,
    MIG_DEVICE_STATE,
    MIGRATION,
    PROBE,
    REPORT,
    SET,
    START,
    STOP,
    GuardedMem,
    UserMem,
    control,
    errno_of,
    feature,
    ranges_mem,
    report_arg,
)

from .lab import Caps, Device, HwptRig, Kind, Lab, Model, map_user

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
PAGE = 4096
NO_SUCH_IOCTL = 0x5A7F  # _IO('Z', 0x7f): no VFIO driver knows it
S = uapi.vfio_device_mig_state


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[Lab], Any]
    expect: Any


CASES: list[Case] = []


def case(expect: Any) -> Callable[[Callable[[Lab], Any]], Callable[[Lab], Any]]:
    def register(fn: Callable[[Lab], Any]) -> Callable[[Lab], Any]:
        CASES.append(Case(fn.__name__, fn, expect))
        return fn

    return register


# -- raw operations ---------------------------------------------------------------------------


def ioctl_errno(lab: Lab, fd: int, request: int, arg: bytearray) -> int:
    return errno_of(lambda: lab.sys.ioctl(fd, request, arg))


def start(lab: Lab, dev: Device, ranges: list[tuple[int, int]], page_size: int = PAGE) -> tuple[int, int]:
    """START; (errno, the page size the kernel wrote back or 0)."""
    mem = ranges_mem(ranges)
    arg = feature(SET | START, control(page_size, len(ranges), mem.addr))
    err = ioctl_errno(lab, dev.fd, FEATURE, arg)
    return err, 0 if err else uapi.vfio_device_feature_dma_logging_control.unpack(arg, 8).page_size


def start_ok(lab: Lab, dev: Device, ranges: list[tuple[int, int]], page_size: int = PAGE) -> int:
    err, granted = start(lab, dev, ranges, page_size)
    assert err == 0, f"START failed: {errno.errorcode[err]}"
    return granted


def stop(lab: Lab, dev: Device) -> int:
    return ioctl_errno(lab, dev.fd, FEATURE, feature(SET | STOP))


def report_into(lab: Lab, dev: Device, iova: int, length: int, page_size: int, addr: int) -> int:
    return ioctl_errno(lab, dev.fd, FEATURE, report_arg(iova, length, page_size, addr))


def report_bits(lab: Lab, dev: Device, iova: int, length: int, page_size: int = PAGE) -> list[int]:
    """REPORT into a fresh page-aligned buffer; the set bits (any the kernel wrote)."""
    nbits = -(-length // page_size)
    mem = UserMem((nbits + 7) // 8 + 2 * PAGE)
    err = report_into(lab, dev, iova, length, page_size, mem.addr)
    assert err == 0, f"REPORT failed: {errno.errorcode[err]}"
    return np.flatnonzero(mem.bits(0, mem.size * 8)).tolist()


def tracker(lab: Lab, granule: int = PAGE, ranges: tuple[tuple[int, int], ...] = ((0, 4 * GIB),)) -> Device:
    """dirtydev logging at exactly `granule` over `ranges`."""
    dev = lab.device(Kind.DIRTYDEV, Caps(min_page_size=granule, max_page_size=granule, max_addr_space=1 << 48))
    assert start_ok(lab, dev, list(ranges)) == granule
    return dev


def mig_set(lab: Lab, dev: Device, state: int) -> tuple[int, int]:
    """SET MIG_DEVICE_STATE; (errno, data fd or -1)."""
    arg = feature(SET | MIG_DEVICE_STATE, struct.pack("<Ii", state, -1))
    err = ioctl_errno(lab, dev.fd, FEATURE, arg)
    return err, struct.unpack_from("<i", arg, 12)[0]


def mig_get(lab: Lab, dev: Device) -> int:
    arg = feature(GET | MIG_DEVICE_STATE, struct.pack("<Ii", 0, 0))
    lab.sys.ioctl(dev.fd, FEATURE, arg)
    return struct.unpack_from("<I", arg, 8)[0]


@contextmanager
def data_fd(lab: Lab, dev: Device, state: int):
    """Move to `state`, which must open a data fd; closes it afterwards (a device with an
    open data fd cannot be removed)."""
    err, fd = mig_set(lab, dev, state)
    assert err == 0 and fd >= 0, (err, fd)
    try:
        yield fd
    finally:
        lab.sys.close(fd)


def read_all(lab: Lab, fd: int) -> bytes:
    out = b""
    while chunk := lab.sys.read(fd, 4096):
        out += chunk
    return out


def precopy_info(lab: Lab, fd: int, argsz: int = 24) -> tuple[int, int, int]:
    """(errno, initial_bytes, dirty_bytes)."""
    arg = bytearray(struct.pack("<IIQQ", argsz, 0, 0, 0))
    err = ioctl_errno(lab, fd, uapi.VFIO_MIG_GET_PRECOPY_INFO, arg)
    _, _, initial, dirty = struct.unpack("<IIQQ", arg)
    return err, initial, dirty


def mtty(lab: Lab) -> Device:
    return lab.device(Kind.MTTY)


def on_mtty(lab: Lab, flags: int, payload: bytes = b"", argsz: int | None = None) -> int:
    return ioctl_errno(lab, mtty(lab).fd, FEATURE, feature(flags, payload, argsz))


# -- VFIO_DEVICE_FEATURE dispatch -------------------------------------------------------------


@case(errno.EINVAL)
def feature_argsz_below_header(lab):
    return on_mtty(lab, SET | START, argsz=4)


@case(errno.EINVAL)
def feature_unknown_flag_bit(lab):
    return on_mtty(lab, SET | START | (1 << 19))


@case(errno.EINVAL)
def feature_get_and_set_without_probe(lab):
    return on_mtty(lab, GET | SET | START)


@case(errno.ENOTTY)
def feature_outside_the_core_on_mtty(lab):
    return on_mtty(lab, SET | uapi.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY)


@case(errno.ENOTTY)
def unknown_device_ioctl(lab):
    return ioctl_errno(lab, mtty(lab).fd, NO_SUCH_IOCTL, bytearray(32))


# -- the cdev: binding and attaching ------------------------------------------------------


def bind_arg(iommufd: int, flags: int = 0, argsz: int = 16) -> bytearray:
    return bytearray(bytes(uapi.vfio_device_bind_iommufd(argsz=argsz, flags=flags, iommufd=iommufd)))


@case([errno.EINVAL, errno.EINVAL, errno.EINVAL, errno.EBADF, 0, errno.EINVAL])
def cdev_bind_table(lab):
    """Nothing works before BIND; BIND wants argsz >= 16, an open fd >= 0, and binds once."""
    fd, iommufd = lab.unbound(Kind.MTTY), lab.iommufd()
    return [
        ioctl_errno(lab, fd, FEATURE, feature(PROBE | SET | START)),
        ioctl_errno(lab, fd, uapi.VFIO_DEVICE_BIND_IOMMUFD, bind_arg(iommufd, argsz=15)),
        ioctl_errno(lab, fd, uapi.VFIO_DEVICE_BIND_IOMMUFD, bind_arg(-1)),
        ioctl_errno(lab, fd, uapi.VFIO_DEVICE_BIND_IOMMUFD, bind_arg(1000)),
        ioctl_errno(lab, fd, uapi.VFIO_DEVICE_BIND_IOMMUFD, bind_arg(iommufd)),
        ioctl_errno(lab, fd, uapi.VFIO_DEVICE_BIND_IOMMUFD, bind_arg(iommufd)),
    ]


@case([errno.EINVAL, errno.EINVAL])
def cdev_a_second_fd_of_a_bound_device_cannot_bind(lab):
    """vfio_df_open: a cdev must be the device's only opener, so a process that did not bind
    the device (QEMU did) cannot use a cdev fd of its own: every ioctl on it is EINVAL."""
    dev = mtty(lab)
    second = lab.reopen(dev)
    return [
        ioctl_errno(lab, second, uapi.VFIO_DEVICE_BIND_IOMMUFD, bind_arg(lab.iommufd())),
        ioctl_errno(lab, second, FEATURE, feature(PROBE | SET | START)),
    ]


@case(errno.EBADFD)
def cdev_bind_to_a_file_that_is_not_an_iommufd(lab):
    fd, other = lab.unbound(Kind.MTTY), lab.unbound(Kind.MTTY)
    return ioctl_errno(lab, fd, uapi.VFIO_DEVICE_BIND_IOMMUFD, bind_arg(other))


@case([errno.EINVAL, errno.EINVAL, errno.EINVAL])
def cdev_flags_are_einval_on_6_12(lab):
    """Linux 6.12 has no BIND_FLAG_TOKEN and no PASID attach: every flag is EINVAL (newer
    kernels: TOKEN binds, PASID is EOPNOTSUPP on these devices)."""
    fd, iommufd = lab.unbound(Kind.MTTY), lab.iommufd()
    token = UserMem(16)
    bind = bytearray(
        bytes(
            uapi.vfio_device_bind_iommufd(
                argsz=24, flags=uapi.VFIO_DEVICE_BIND_FLAG_TOKEN, iommufd=iommufd, token_uuid_ptr=token.addr
            )
        )
    )
    dev = mtty(lab)
    attach = bytearray(
        bytes(uapi.vfio_device_attach_iommufd_pt(argsz=16, flags=uapi.VFIO_DEVICE_ATTACH_PASID, pt_id=dev.ioas_id))
    )
    detach = bytearray(bytes(uapi.vfio_device_detach_iommufd_pt(argsz=12, flags=uapi.VFIO_DEVICE_DETACH_PASID)))
    return [
        ioctl_errno(lab, fd, uapi.VFIO_DEVICE_BIND_IOMMUFD, bind),
        ioctl_errno(lab, dev.fd, uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, attach),
        ioctl_errno(lab, dev.fd, uapi.VFIO_DEVICE_DETACH_IOMMUFD_PT, detach),
    ]


@case([errno.EINVAL, errno.ENOENT, 0])
def cdev_attach_table(lab):
    dev = mtty(lab)

    def attach(pt_id: int, argsz: int = 12) -> int:
        arg = bytearray(bytes(uapi.vfio_device_attach_iommufd_pt(argsz=argsz, pt_id=pt_id)))
        return ioctl_errno(lab, dev.fd, uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, arg)

    return [attach(dev.ioas_id, argsz=11), attach(999), attach(dev.ioas_id)]


# -- PROBE ------------------------------------------------------------------------------------


@case([0, errno.EINVAL, 0, errno.EINVAL, 0, errno.EINVAL])
def probe_direction_table(lab):
    dev = lab.device(Kind.DIRTYDEV)
    flags = [
        PROBE | SET | START,
        PROBE | GET | START,
        PROBE | GET | REPORT,
        PROBE | SET | REPORT,
        PROBE | SET | STOP,
        PROBE | GET | STOP,
    ]
    return [ioctl_errno(lab, dev.fd, FEATURE, feature(f)) for f in flags]


@case((0, errno.EINVAL))
def probe_alone_succeeds_and_no_direction_is_einval(lab):
    return on_mtty(lab, PROBE | START), on_mtty(lab, START)


# -- DMA_LOGGING_START ------------------------------------------------------------------------


@case(errno.EINVAL)
def start_argsz_short(lab):
    mem = ranges_mem([(0, PAGE)])
    return on_mtty(lab, SET | START, control(PAGE, 1, mem.addr), argsz=8 + 23)


@case(errno.EINVAL)
def start_zero_ranges(lab):
    return start(lab, mtty(lab), [])[0]


@case((errno.E2BIG, 0))
def start_257_ranges_is_e2big_before_reading_them(lab):
    over = on_mtty(lab, SET | START, control(PAGE, 257, 0))  # the pointer is never read
    ranges = [(i * 2 * PAGE, PAGE) for i in range(256)]
    return over, start(lab, mtty(lab), ranges)[0]


@case([errno.EINVAL, errno.EINVAL, errno.EINVAL])
def start_misaligned(lab):
    return [
        start(lab, mtty(lab), [r], ps)[0]
        for r, ps in (((0x1800, PAGE), PAGE), ((0, 0x1800), PAGE), ((0, 12288), 12288))
    ]


@case([errno.EOVERFLOW, errno.EOVERFLOW])
def start_overflow(lab):
    return [start(lab, mtty(lab), [r])[0] for r in ((2**64 - PAGE, 2 * PAGE), (2**63, 2**63))]


@case([errno.EINVAL, errno.EINVAL, 0])
def start_overlap_and_adjacent(lab):
    cases = ([(0, 2 * PAGE), (PAGE, PAGE)], [(MIB, MIB), (0, MIB + PAGE)], [(0, MIB), (MIB, MIB)])
    return [start(lab, mtty(lab), rs)[0] for rs in cases]


@case((errno.EINVAL, errno.EOVERFLOW))
def start_errors_follow_array_order(lab):
    bad_align, bad_end = (0x1800, PAGE), (2**64 - PAGE, 2 * PAGE)
    return start(lab, mtty(lab), [bad_align, bad_end])[0], start(lab, mtty(lab), [bad_end, bad_align])[0]


@case(errno.EFAULT)
def start_bad_ranges_pointer(lab):
    return on_mtty(lab, SET | START, control(PAGE, 1, 8))


@case(((0, 8192), (0, 8192)))
def start_mtty_echoes_page_size_and_accepts_a_second_start(lab):
    dev = mtty(lab)
    return start(lab, dev, [(0, MIB)], 8192), start(lab, dev, [(0, MIB)], 8192)


@case([(0, 64 * KIB), (0, 2 * MIB)])
def start_page_size_clamped_to_the_tracker(lab):
    small = lab.device(Kind.DIRTYDEV, Caps(min_page_size=64 * KIB))
    large = lab.device(Kind.DIRTYDEV)
    return [start(lab, small, [(0, MIB)], PAGE), start(lab, large, [(0, GIB)], GIB)]


@case([(0, PAGE), errno.EINVAL])
def start_twice_on_a_tracker(lab):
    dev = lab.device(Kind.DIRTYDEV)
    return [start(lab, dev, [(0, MIB)]), start(lab, dev, [(0, MIB)])[0]]


@case([errno.EOPNOTSUPP, errno.EOPNOTSUPP, 0])
def start_address_space_outside_the_caps(lab):
    """Merged gaps count: two pages 1 GiB apart merged into one range span 1 GiB + 4 KiB."""
    far = [(0, PAGE), (GIB, PAGE)]
    return [
        start(lab, lab.device(Kind.DIRTYDEV, Caps(max_addr_space=MIB)), [(0, 2 * MIB)])[0],
        start(lab, lab.device(Kind.DIRTYDEV, Caps(max_ranges=1, max_addr_space=GIB)), far)[0],
        start(lab, lab.device(Kind.DIRTYDEV, Caps(max_ranges=1, max_addr_space=2 * GIB)), far)[0],
    ]


@case([errno.EBUSY, 0])
def start_injected_driver_errno(lab):
    dev = lab.device(Kind.DIRTYDEV)
    dev.fail_start(errno.EBUSY)
    return [start(lab, dev, [(0, MIB)])[0], start(lab, dev, [(0, MIB)])[0]]


@case([errno.ENOTCONN, errno.EINVAL, 0])
def start_and_report_after_detach(lab):
    dev = lab.device(Kind.DIRTYDEV)
    start_ok(lab, dev, [(0, MIB)])
    dev.inject(Fault.DETACH)  # the tracker is freed with the function
    mem = UserMem(PAGE)
    detached = [start(lab, dev, [(0, MIB)])[0], report_into(lab, dev, 0, MIB, PAGE, mem.addr)]
    dev.reattach()
    return [*detached, start(lab, dev, [(0, MIB)])[0]]


# -- DMA_LOGGING_STOP -------------------------------------------------------------------------


@case([errno.EINVAL, 0, 0, 0, 0, 0])
def stop_table_and_cycle(lab):
    dev = lab.device(Kind.DIRTYDEV)
    return [
        ioctl_errno(lab, dev.fd, FEATURE, feature(GET | STOP)),
        stop(lab, dev),  # never started
        start(lab, dev, [(0, MIB)])[0],
        stop(lab, dev),
        start(lab, dev, [(0, MIB)])[0],  # a new tracker after STOP
        stop(lab, dev),
    ]


# -- DMA_LOGGING_REPORT: the core -------------------------------------------------------------


@case([errno.EINVAL, 0])
def report_while_idle(lab):
    mem = UserMem(PAGE)
    return [
        report_into(lab, lab.device(Kind.DIRTYDEV), 0, MIB, PAGE, mem.addr),
        report_into(lab, mtty(lab), 0, MIB, PAGE, mem.addr),
    ]


@case([errno.EINVAL, errno.EINVAL, errno.EINVAL, errno.EINVAL, 0, 0])
def report_page_size(lab):
    dev = tracker(lab)
    mem = UserMem(PAGE)
    return [report_into(lab, dev, 0, GIB, ps, mem.addr) for ps in (0, 2048, 12288, 4097, 8192, GIB)]


@case([errno.EOVERFLOW, errno.EOVERFLOW, errno.EOVERFLOW])
def report_overflow(lab):
    dev = tracker(lab)
    mem = UserMem(PAGE)
    return [
        report_into(lab, dev, iova, length, PAGE, mem.addr)
        for iova, length in ((2**64 - PAGE, PAGE), (1, 2**64 - 1), (2**63, 2**63))
    ]


@case([errno.EINVAL, errno.EINVAL])
def report_set_and_short_argsz(lab):
    dev = tracker(lab)
    payload = bytes(uapi.vfio_device_feature_dma_logging_report(0, PAGE, PAGE, UserMem(PAGE).addr))
    return [
        ioctl_errno(lab, dev.fd, FEATURE, feature(SET | REPORT, payload)),
        ioctl_errno(lab, dev.fd, FEATURE, feature(GET | REPORT, payload, argsz=8 + 31)),
    ]


# -- DMA_LOGGING_REPORT: bits -----------------------------------------------------------------


@case([(1 << 0) | (1 << 5) | (1 << 63), (1 << 0) | (1 << 6)])
def bits_lsb_first_little_endian_relative_to_iova(lab):
    dev = tracker(lab)
    base = GIB + 64 * PAGE
    for page in (0, 5, 63, 64, 70):
        dev.dma(base + page * PAGE + 100, 1)
    mem = UserMem(PAGE)
    assert report_into(lab, dev, base, 128 * PAGE, PAGE, mem.addr) == 0
    return [int(w) for w in np.frombuffer(mem.bytes(0, 16), dtype="<u8")]


@case([1, 2])
def bits_of_a_write_straddling_two_pages(lab):
    dev = tracker(lab)
    dev.dma(2 * PAGE - 1, 2)
    return report_bits(lab, dev, 0, 64 * PAGE)


@case(list(range(3 * 256, 4 * 256)))
def bits_replicated_when_the_tracker_is_coarser(lab):
    dev = tracker(lab, granule=MIB)
    dev.dma(3 * MIB + 12345, 1)
    return report_bits(lab, dev, 0, 8 * MIB)


@case([2, 5, 6])
def bits_merged_when_the_tracker_is_finer(lab):
    dev = tracker(lab)
    dev.dma(2 * 64 * KIB + 7 * PAGE, 1)
    dev.dma(2 * 64 * KIB + 9 * PAGE, 1)
    dev.dma(5 * 64 * KIB, 17 * PAGE)  # spills into the next 64 KiB page
    return report_bits(lab, dev, 0, 16 * 64 * KIB, 64 * KIB)


@case([[0, 1], [0, 1]])
def bits_of_an_unaligned_report_round_outward(lab):
    dev = tracker(lab)
    dev.dma(PAGE, 1)
    unaligned_both = report_bits(lab, dev, 0x800, 0x1801)  # bits 0 and 1 both touch [0x1000, 0x2000)
    coarse = tracker(lab, granule=8192)
    coarse.dma(8192, 1)
    return [unaligned_both, report_bits(lab, coarse, PAGE, 64 * PAGE, 8192)]


@case([[], []])
def bits_unit_starting_below_the_report_iova_is_dropped_and_cleared(lab):
    dev = tracker(lab, granule=MIB)
    dev.dma(MIB + 600 * KIB, 1)  # unit [1M, 2M)
    return [report_bits(lab, dev, MIB + 512 * KIB, MIB), report_bits(lab, dev, MIB, MIB)]


@case(b"\xff" * 32 + b"\x00")
def bits_past_length_set_through_the_straddling_unit(lab):
    dev = tracker(lab, granule=MIB)
    dev.dma(0, 1)
    mem = UserMem(PAGE)
    assert report_into(lab, dev, 0, 3 * PAGE, PAGE, mem.addr) == 0
    return mem.bytes(0, 33)


def _tail_case(offset: int) -> Callable[[Lab], tuple[int, int, int]]:
    def run(lab: Lab) -> tuple[int, int, int]:
        """(untouched bytes before, 0xff bytes from the bitmap on, untouched bytes after)."""
        dev = tracker(lab, granule=GIB)
        dev.dma(0, 1)
        mem = UserMem(4 * PAGE)
        assert report_into(lab, dev, 0, 3 * PAGE, PAGE, mem.addr + offset) == 0
        raw = mem.bytes()
        ones = len(raw[offset:]) - len(raw[offset:].lstrip(b"\xff"))
        return len(raw) - len(raw.lstrip(b"\0")), ones, len(raw) - len(raw.rstrip(b"\0"))

    return run


# A 1 GiB unit on a 3-bit report: bits to the end of the bitmap's page, and of one page more
# when the pinned window starts mid-page; nothing beyond.
CASES.append(Case("bits_tail_to_the_end_of_the_pinned_page", _tail_case(PAGE), (PAGE, PAGE, 2 * PAGE)))
CASES.append(
    Case(
        "bits_tail_one_page_further_when_the_window_starts_mid_page",
        _tail_case(PAGE + 2048),
        (PAGE + 2048, 2 * PAGE - 2048, PAGE),
    )
)


@case(b"\xff" * 8)
def bits_tail_never_reach_a_guard_page(lab):
    dev = tracker(lab, granule=GIB)
    dev.dma(0, 1)
    mem = GuardedMem(8)
    assert report_into(lab, dev, 0, 3 * PAGE, PAGE, mem.start) == 0
    return mem.bytes(mem.start - mem.addr, 8)


@case(b"\x01" + bytes(7))
def bits_on_an_unmapped_bitmap_page_are_lost_silently(lab):
    dev = tracker(lab)
    mem = GuardedMem(8)
    dev.dma(0, 1)  # bitmap byte 0: mapped
    dev.dma(8 * 8 * PAGE, 1)  # bitmap byte 8: on the guard page
    assert report_into(lab, dev, 0, 128 * PAGE, PAGE, mem.start) == 0
    return mem.bytes(mem.start - mem.addr, 8)


@case([0, []])
def bits_for_a_bad_bitmap_pointer_are_lost_and_the_report_succeeds(lab):
    """iova_bitmap_set returns void: unpinnable pages drop their bits; the unit is cleared."""
    dev = tracker(lab)
    dev.dma(0, 1)
    return [report_into(lab, dev, 0, 64 * PAGE, PAGE, 0), report_bits(lab, dev, 0, 64 * PAGE)]


@case([b"\x5a" * 0xFF1, [0, 1, 7, 8, 63, 64, 4095, 4096, 9999]])
def bits_at_any_bitmap_byte_alignment(lab):
    dev = tracker(lab)
    pages = [0, 1, 7, 8, 63, 64, 4095, 4096, 9999]
    for p in pages:
        dev.dma(p * PAGE, 1)
    offset = 0xFF1
    mem = UserMem(offset + 2 * PAGE)
    mem.put(0, b"\x5a" * offset)
    assert report_into(lab, dev, 0, 10000 * PAGE, PAGE, mem.addr + offset) == 0
    return [mem.bytes(0, offset), np.flatnonzero(mem.bits(offset, 10000)).tolist()]


@case([3, (100 * GIB) // PAGE + 5, (127 * GIB) // PAGE])
def bits_of_a_report_wider_than_one_pinned_window(lab):
    """128 GiB at 4 KiB: a 4 MiB bitmap, more than the 2 MiB iova_bitmap pins at a time."""
    dev = tracker(lab, ranges=((0, 1 << 40),))
    for iova in (3 * PAGE, 100 * GIB + 5 * PAGE, 127 * GIB):
        dev.dma(iova, 1)
    return report_bits(lab, dev, 0, 128 * GIB)


@case([[3, 4], [], [4]])
def bits_read_clears(lab):
    dev = tracker(lab)
    dev.dma(3 * PAGE, 2 * PAGE)
    first, again = report_bits(lab, dev, 0, 64 * PAGE), report_bits(lab, dev, 0, 64 * PAGE)
    dev.dma(4 * PAGE, 1)
    return [first, again, report_bits(lab, dev, 0, 64 * PAGE)]


@case([[0, 1, 2], [0, 1, 5, 6, 7]])
def bits_clear_only_the_queried_range(lab):
    dev = tracker(lab)
    dev.dma(0, 8 * PAGE)
    return [report_bits(lab, dev, 2 * PAGE, 3 * PAGE), report_bits(lab, dev, 0, 8 * PAGE)]


@case(bytes([0xA7, 0x02, 0x0F, 0xF0]) + bytes([0xA5, 0x00, 0x0F, 0xF0]) * 7)
def bits_are_only_ored_in(lab):
    dev = tracker(lab)
    mem = UserMem(PAGE)
    mem.put(0, bytes([0xA5, 0x00, 0x0F, 0xF0]) * 8)
    dev.dma(PAGE, 1)
    dev.dma(9 * PAGE, 1)
    assert report_into(lab, dev, 0, 256 * PAGE, PAGE, mem.addr) == 0
    return mem.bytes(0, 32)


@case([256])
def bits_untracked_and_idle_writes_are_invisible(lab):
    dev = lab.device(Kind.DIRTYDEV)
    dev.dma(MIB, PAGE)  # logging off
    start_ok(lab, dev, [(MIB, MIB)])
    dev.dma(0, PAGE)  # outside the tracked range
    dev.dma(MIB - PAGE, 2 * PAGE)  # straddles: only the tracked half counts
    return report_bits(lab, dev, 0, 4 * MIB)


@case([1, 2])
def bits_in_a_gap_the_driver_merged_are_tracked(lab):
    """Three ranges on a two-range tracker: vfio_combine_iova_ranges closes the smallest gap
    ([4K, 8K)), so a write there is logged; the large gap stays untracked."""
    dev = lab.device(Kind.DIRTYDEV, Caps(max_ranges=2))
    start_ok(lab, dev, [(0, PAGE), (2 * PAGE, PAGE), (MIB, PAGE)])
    for iova in (PAGE, 2 * PAGE, MIB // 2):
        dev.dma(iova, 1)
    return report_bits(lab, dev, 0, 2 * MIB)


@case([errno.EIO, []])
def fault_eio_once_consumes_the_queried_range(lab):
    dev = tracker(lab)
    dev.dma(3 * PAGE, 1)
    dev.inject(Fault.REPORT_EIO_ONCE)
    mem = UserMem(PAGE)
    return [report_into(lab, dev, 0, 64 * PAGE, PAGE, mem.addr), report_bits(lab, dev, 0, 64 * PAGE)]


@case([errno.EIO, errno.EIO, [3]])
def fault_sticky_eio_until_a_new_tracker(lab):
    dev = tracker(lab)
    dev.inject(Fault.REPORT_EIO_STICKY)
    mem = UserMem(PAGE)
    failed = [report_into(lab, dev, 0, 64 * PAGE, PAGE, mem.addr) for _ in range(2)]
    stop(lab, dev)
    start_ok(lab, dev, [(0, MIB)])
    dev.dma(3 * PAGE, 1)
    return [*failed, report_bits(lab, dev, 0, 64 * PAGE)]


# -- the pds-like tracker ------------------------------------------------------------------

PDS = Caps(model=Model.PDS)


@case([(0, PAGE), (errno.EINVAL, 0), (errno.EINVAL, 0), (0, 4 * MIB)])
def pds_start_regions_of_64_pages_and_the_page_size_kept(lab):
    """Every running sum of bitmap bytes (pages / 8) must be a multiple of 8; the page size
    is not clamped (mlx5's caps would make 4 MiB 2 MiB)."""
    return [
        start(lab, lab.device(Kind.DIRTYDEV, PDS), [(0, 64 * PAGE)]),
        start(lab, lab.device(Kind.DIRTYDEV, PDS), [(0, 32 * PAGE)]),
        start(lab, lab.device(Kind.DIRTYDEV, PDS), [(0, 64 * PAGE), (MIB, 8 * PAGE)]),
        start(lab, lab.device(Kind.DIRTYDEV, PDS), [(0, 64 * 4 * MIB)], 4 * MIB),
    ]


@case([errno.EINVAL, errno.EINVAL, errno.EINVAL])
def pds_report_outside_a_region_or_larger_than_it(lab):
    dev = lab.device(Kind.DIRTYDEV, PDS)
    start_ok(lab, dev, [(MIB, 64 * PAGE)])
    mem = UserMem(PAGE)
    return [
        report_into(lab, dev, 0, 64 * PAGE, PAGE, mem.addr),
        report_into(lab, dev, MIB, 128 * PAGE, PAGE, mem.addr),
        report_into(lab, dev, MIB, 0, PAGE, mem.addr),
    ]


@case([[8], [1]])
def pds_report_off_the_byte_grid_skips_then_overreaches(lab):
    """From page 1 the driver reads (and acks) its bitmap from byte 1 (page 8) for 64 pages:
    page 1 stays dirty for a later report; page 70 is read into a bit past the bitmap's last
    byte, which iova_bitmap drops, so it is lost."""
    dev = lab.device(Kind.DIRTYDEV, PDS)
    start_ok(lab, dev, [(0, 128 * PAGE)])
    for page in (1, 9, 70):
        dev.dma(page * PAGE, 1)
    return [report_bits(lab, dev, PAGE, 64 * PAGE), report_bits(lab, dev, 0, 128 * PAGE)]


@case([errno.EIO, [], [5]])
def pds_eio_once_consumes_the_window(lab):
    dev = lab.device(Kind.DIRTYDEV, PDS)
    start_ok(lab, dev, [(0, 64 * PAGE)])
    dev.dma(3 * PAGE, 1)
    dev.inject(Fault.REPORT_EIO_ONCE)
    mem = UserMem(PAGE)
    failed = report_into(lab, dev, 0, 64 * PAGE, PAGE, mem.addr)
    after = report_bits(lab, dev, 0, 64 * PAGE)
    dev.dma(5 * PAGE, 1)
    return [failed, after, report_bits(lab, dev, 0, 64 * PAGE)]


# -- migration (mtty) -------------------------------------------------------------------------


@case([0x7, errno.EINVAL, errno.ENOTTY])
def migration_flags(lab):
    dev = mtty(lab)
    arg = feature(GET | MIGRATION, bytes(8))
    lab.sys.ioctl(dev.fd, FEATURE, arg)
    flags = struct.unpack_from("<Q", arg, 8)[0]
    return [
        flags,
        ioctl_errno(lab, dev.fd, FEATURE, feature(SET | MIGRATION, bytes(8))),
        ioctl_errno(lab, lab.device(Kind.DIRTYDEV).fd, FEATURE, feature(GET | MIGRATION, bytes(8))),
    ]


@case([S.VFIO_DEVICE_STATE_RUNNING, (errno.EINVAL, -1), (errno.EINVAL, -1), S.VFIO_DEVICE_STATE_RUNNING])
def mig_state_get_and_invalid_targets(lab):
    dev = mtty(lab)
    return [mig_get(lab, dev), mig_set(lab, dev, S.VFIO_DEVICE_STATE_ERROR), mig_set(lab, dev, 99), mig_get(lab, dev)]


@case([errno.EINVAL, errno.EINVAL, errno.ENOTTY])
def mig_state_feature_table(lab):
    dev = mtty(lab)
    return [
        ioctl_errno(lab, dev.fd, FEATURE, feature(GET | MIG_DEVICE_STATE, bytes(8), argsz=8 + 7)),
        ioctl_errno(lab, dev.fd, FEATURE, feature(PROBE | GET | MIG_DATA_SIZE | SET)),
        ioctl_errno(lab, lab.device(Kind.DIRTYDEV).fd, FEATURE, feature(GET | MIG_DEVICE_STATE, bytes(8))),
    ]


@case([96, errno.EINVAL])
def mig_data_size(lab):
    dev = mtty(lab)
    arg = feature(GET | MIG_DATA_SIZE, bytes(8))
    lab.sys.ioctl(dev.fd, FEATURE, arg)
    return [
        struct.unpack_from("<Q", arg, 8)[0],
        ioctl_errno(lab, dev.fd, FEATURE, feature(SET | MIG_DATA_SIZE, bytes(8))),
    ]


@case([(0, 24, 0), 24, (0, 0, 0), 0, (0, -1), errno.EINVAL, 72, 0, (0, -1), (0, -1), S.VFIO_DEVICE_STATE_RUNNING])
def mig_precopy_then_stop_copy(lab):
    """RUNNING -> PRE_COPY (a data fd) -> STOP_COPY (the same fd gets the rest) -> STOP -> RUNNING."""
    dev = mtty(lab)
    with data_fd(lab, dev, S.VFIO_DEVICE_STATE_PRE_COPY) as fd:
        out: list[Any] = [
            precopy_info(lab, fd),
            len(lab.sys.read(fd, 4096)),
            precopy_info(lab, fd),
            len(lab.sys.read(fd, 4096)),
            mig_set(lab, dev, S.VFIO_DEVICE_STATE_STOP_COPY),
            precopy_info(lab, fd)[0],
            len(read_all(lab, fd)),
            len(lab.sys.read(fd, 4096)),
        ]
    return [
        *out,
        mig_set(lab, dev, S.VFIO_DEVICE_STATE_STOP),
        mig_set(lab, dev, S.VFIO_DEVICE_STATE_RUNNING),
        mig_get(lab, dev),
    ]


MIG_STATES = (
    S.VFIO_DEVICE_STATE_STOP,
    S.VFIO_DEVICE_STATE_RUNNING,
    S.VFIO_DEVICE_STATE_STOP_COPY,
    S.VFIO_DEVICE_STATE_RESUMING,
    S.VFIO_DEVICE_STATE_RUNNING_P2P,
    S.VFIO_DEVICE_STATE_PRE_COPY,
    S.VFIO_DEVICE_STATE_PRE_COPY_P2P,
)
PRECOPY = (S.VFIO_DEVICE_STATE_PRE_COPY, S.VFIO_DEVICE_STATE_PRE_COPY_P2P)
# STOP_COPY -> PRE_COPY*: the FSM table says ERROR, and Linux 6.12's vfio_mig_get_next_state
# then loops forever (ERROR's required flags, ~0U, are never all supported, so it keeps
# stepping ERROR -> ERROR) with the driver's state mutex held: the CPU spins in the kernel.
# The emulation answers EINVAL there (tests/emulated checks it). Not asked of the real kernel.
KERNEL_HANGS = {(S.VFIO_DEVICE_STATE_STOP_COPY, target) for target in PRECOPY}
ARCS = [(cur, target) for cur in MIG_STATES for target in MIG_STATES if (cur, target) not in KERNEL_HANGS]


def fsm_arc(cur: S, target: S) -> tuple[S, S, int, bool, S]:
    """What mtty (flags 0x7) answers to `target` from `cur`: (cur, target, errno, a data fd
    opened, the state after). vfio_mig_get_next_state walks one arc at a time; leaving
    RESUMING loads the state (EINVAL for an empty stream, the device stays); the last arc
    opens a data fd when it starts a stream: into PRE_COPY* from outside them, into
    RESUMING, or into STOP_COPY unless a precopy stream goes on."""
    if cur == target:
        return cur, target, 0, False, cur
    if cur == S.VFIO_DEVICE_STATE_RESUMING:
        return cur, target, errno.EINVAL, False, cur
    opens = (
        (target in PRECOPY and cur not in PRECOPY)
        or target == S.VFIO_DEVICE_STATE_RESUMING
        or (target == S.VFIO_DEVICE_STATE_STOP_COPY and cur not in PRECOPY)
    )
    return cur, target, 0, opens, target


@case([fsm_arc(cur, target) for cur, target in ARCS])
def mig_every_arc_of_the_fsm(lab):
    """Every (state, target) pair of mtty-2, each on a fresh device, but KERNEL_HANGS."""
    out = []
    for cur, target in ARCS:
        with lab.scope():
            dev = mtty(lab)
            reached, first_fd = mig_set(lab, dev, cur)
            assert reached == 0, (cur, reached)
            err, fd = mig_set(lab, dev, target)
            out.append((cur, target, err, fd >= 0, S(mig_get(lab, dev))))
            for opened in (first_fd, fd):
                if opened >= 0:
                    lab.sys.close(opened)
    return out


@case([errno.EINVAL, errno.ENOTTY, errno.ENODEV])
def mig_precopy_info_errors_and_a_disabled_stream(lab):
    dev = mtty(lab)
    with data_fd(lab, dev, S.VFIO_DEVICE_STATE_PRE_COPY) as fd:
        short = precopy_info(lab, fd, argsz=23)[0]
        unknown = ioctl_errno(lab, fd, NO_SUCH_IOCTL, bytearray(24))
        mig_set(lab, dev, S.VFIO_DEVICE_STATE_RUNNING)  # PRE_COPY -> RUNNING drops the stream
        return [short, unknown, errno_of(lambda: lab.sys.read(fd, 4096))]


@case([(0, -1), (96, 0), (96, (0, -1), (0, -1), S.VFIO_DEVICE_STATE_RUNNING)])
def mig_stop_copy_and_resume_round_trip(lab):
    src, dst = mtty(lab), mtty(lab)
    stopped = mig_set(lab, src, S.VFIO_DEVICE_STATE_STOP)
    with data_fd(lab, src, S.VFIO_DEVICE_STATE_STOP_COPY) as fd:
        saved = read_all(lab, fd)
        saved_then = (len(saved), len(lab.sys.read(fd, 4096)))
    mig_set(lab, src, S.VFIO_DEVICE_STATE_STOP)
    mig_set(lab, dst, S.VFIO_DEVICE_STATE_STOP)
    with data_fd(lab, dst, S.VFIO_DEVICE_STATE_RESUMING) as fd:
        written = lab.sys.write(fd, saved)
        loaded = mig_set(lab, dst, S.VFIO_DEVICE_STATE_STOP)
    return [stopped, saved_then, (written, loaded, mig_set(lab, dst, S.VFIO_DEVICE_STATE_RUNNING), mig_get(lab, dst))]


def mtty_header(nr_ports: int) -> bytes:
    """struct mtty_data's head: magic, major 1, minor 0, nr_ports, flags."""
    return struct.pack("<QIIII", 0x7E9D09898C3E2C4E, 1, 0, nr_ports, 0)


@case([mtty_header(2), errno.EFAULT])
def mig_stream_header_and_a_foreign_one(lab):
    """The saving stream starts with mtty-2's header; a resume refuses another port count."""
    src, dst = mtty(lab), mtty(lab)
    mig_set(lab, src, S.VFIO_DEVICE_STATE_STOP)
    with data_fd(lab, src, S.VFIO_DEVICE_STATE_STOP_COPY) as fd:
        header = read_all(lab, fd)[:24]
    mig_set(lab, dst, S.VFIO_DEVICE_STATE_STOP)
    with data_fd(lab, dst, S.VFIO_DEVICE_STATE_RESUMING) as fd:
        return [header, errno_of(lambda: lab.sys.write(fd, mtty_header(1)))]


@case([errno.EFAULT, errno.ENOMEM, (errno.EINVAL, -1), S.VFIO_DEVICE_STATE_RESUMING])
def mig_resume_errors(lab):
    """A bad header, more than the device's state, and a stream too short to load."""
    dev = mtty(lab)
    mig_set(lab, dev, S.VFIO_DEVICE_STATE_STOP)
    with data_fd(lab, dev, S.VFIO_DEVICE_STATE_RESUMING) as fd:
        bad_header = errno_of(lambda: lab.sys.write(fd, bytes(24)))
    mig_set(lab, dev, S.VFIO_DEVICE_STATE_STOP)  # an empty stream: EINVAL, stays RESUMING
    good = mtty(lab)
    mig_set(lab, good, S.VFIO_DEVICE_STATE_STOP)
    with data_fd(lab, good, S.VFIO_DEVICE_STATE_STOP_COPY) as fd:
        header = read_all(lab, fd)[:24]
    target = mtty(lab)
    mig_set(lab, target, S.VFIO_DEVICE_STATE_STOP)
    with data_fd(lab, target, S.VFIO_DEVICE_STATE_RESUMING) as fd:
        too_much = errno_of(lambda: lab.sys.write(fd, header + bytes(73)))
        lab.sys.write(fd, header)
        short = mig_set(lab, target, S.VFIO_DEVICE_STATE_STOP)
    return [bad_header, too_much, short, mig_get(lab, target)]


@case([(0, -1), S.VFIO_DEVICE_STATE_RUNNING_P2P, (0, -1), (0, -1), True, (0, -1), S.VFIO_DEVICE_STATE_RUNNING])
def mig_p2p_arcs(lab):
    """RUNNING -> RUNNING_P2P -> STOP -> PRE_COPY_P2P (through RUNNING_P2P: a data fd) -> RUNNING."""
    dev = mtty(lab)
    out: list[Any] = [
        mig_set(lab, dev, S.VFIO_DEVICE_STATE_RUNNING_P2P),
        mig_get(lab, dev),
        mig_set(lab, dev, S.VFIO_DEVICE_STATE_STOP),
        mig_set(lab, dev, S.VFIO_DEVICE_STATE_RUNNING_P2P),
    ]
    with data_fd(lab, dev, S.VFIO_DEVICE_STATE_PRE_COPY_P2P):
        out.append(mig_get(lab, dev) == S.VFIO_DEVICE_STATE_PRE_COPY_P2P)
    return [*out, mig_set(lab, dev, S.VFIO_DEVICE_STATE_RUNNING), mig_get(lab, dev)]


# -- IOMMUFD dirty tracking (the selftest's mock domain on the real side) ---------------------

APERTURE = 1 << 24  # MOCK_APERTURE_START: where the mock domain maps
NO_CLEAR = uapi.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR


def hwpt_mapped(lab: Lab, areas: tuple[tuple[int, int], ...] = ((0, 128 * PAGE),)) -> HwptRig:
    """A rig with user memory mapped at APERTURE + offset for each (offset, length)."""
    rig = lab.hwpt()
    for offset, length in areas:
        mem = UserMem(length)
        map_user(lab.sys, rig.iommufd, rig.ioas_id, mem.addr, length, APERTURE + offset)
        rig.memory.append(mem)
    return rig


def set_tracking(lab: Lab, rig: HwptRig, enable: bool, hwpt_id: int | None = None, flags: int | None = None) -> int:
    f = (uapi.IOMMU_HWPT_DIRTY_TRACKING_ENABLE if enable else 0) if flags is None else flags
    cmd = uapi.iommu_hwpt_set_dirty_tracking(
        size=ctypes.sizeof(uapi.iommu_hwpt_set_dirty_tracking),
        flags=f,
        hwpt_id=rig.hwpt_id if hwpt_id is None else hwpt_id,
    )
    return ioctl_errno(lab, rig.iommufd, uapi.IOMMU_HWPT_SET_DIRTY_TRACKING, bytearray(bytes(cmd)))


def get_dirty(
    lab: Lab, rig: HwptRig, offset: int, length: int, page_size: int = PAGE, flags: int = 0, hwpt_id: int | None = None
) -> int | list[int]:
    """GET_DIRTY_BITMAP of [APERTURE + offset, +length): the set bits, or the errno."""
    mem = UserMem(-(-length // max(page_size, PAGE)) // 8 + 2 * PAGE)
    cmd = uapi.iommu_hwpt_get_dirty_bitmap(
        size=ctypes.sizeof(uapi.iommu_hwpt_get_dirty_bitmap),
        hwpt_id=rig.hwpt_id if hwpt_id is None else hwpt_id,
        flags=flags,
        iova=(APERTURE + offset) & (2**64 - 1),
        length=length,
        page_size=page_size,
        data=mem.addr,
    )
    err = ioctl_errno(lab, rig.iommufd, uapi.IOMMU_HWPT_GET_DIRTY_BITMAP, bytearray(bytes(cmd)))
    return err or np.flatnonzero(mem.bits(0, mem.size * 8)).tolist()


def tracking_rig(lab: Lab, areas: tuple[tuple[int, int], ...] = ((0, 128 * PAGE),)) -> HwptRig:
    rig = hwpt_mapped(lab, areas)
    assert set_tracking(lab, rig, True) == 0
    return rig


@case([[0, 5, 6, 63], []])
def hwpt_bits_and_read_clears(lab):
    rig = tracking_rig(lab)
    for iova, length in ((0, 1), (5 * PAGE + 2048, 2049), (63 * PAGE + 4095, 1)):
        rig.dirty(APERTURE + iova, length)
    return [get_dirty(lab, rig, 0, 128 * PAGE), get_dirty(lab, rig, 0, 128 * PAGE)]


@case([[3, 9], [3, 9], [3, 9], []])
def hwpt_no_clear_reads_without_clearing(lab):
    rig = tracking_rig(lab)
    rig.dirty(APERTURE + 3 * PAGE, 1)
    rig.dirty(APERTURE + 9 * PAGE, PAGE)
    return [
        get_dirty(lab, rig, 0, 64 * PAGE, flags=NO_CLEAR),
        get_dirty(lab, rig, 0, 64 * PAGE, flags=NO_CLEAR),
        get_dirty(lab, rig, 0, 64 * PAGE),
        get_dirty(lab, rig, 0, 64 * PAGE),
    ]


@case([[0, 1], [1]])
def hwpt_walk_stops_at_an_unmapped_gap(lab):
    """Two areas with a 64 KiB hole: a query across it reports the first area only (the walk
    ends at the hole and the ioctl still succeeds); the second is reported by its own query."""
    rig = tracking_rig(lab, ((0, 16 * PAGE), (32 * PAGE, 16 * PAGE)))
    rig.dirty(APERTURE + PAGE, 1)
    rig.dirty(APERTURE + 33 * PAGE, 1)
    rig.dirty(APERTURE, 1)
    return [get_dirty(lab, rig, 0, 48 * PAGE), get_dirty(lab, rig, 32 * PAGE, 16 * PAGE)]


@case([[2, 5], []])
def hwpt_bits_merged_at_a_larger_page_size(lab):
    rig = tracking_rig(lab)
    rig.dirty(APERTURE + 2 * 16 * PAGE + 7 * PAGE, 1)
    rig.dirty(APERTURE + 5 * 16 * PAGE, 1)
    return [get_dirty(lab, rig, 0, 8 * 16 * PAGE, page_size=16 * PAGE), get_dirty(lab, rig, 0, 128 * PAGE)]


@case([0, [], 0, []])
def hwpt_tracking_off_reports_nothing_and_enabling_clears(lab):
    rig = tracking_rig(lab)
    rig.dirty(APERTURE + 4 * PAGE, 1)
    off = set_tracking(lab, rig, False)
    while_off = get_dirty(lab, rig, 0, 64 * PAGE)
    return [off, while_off, set_tracking(lab, rig, True), get_dirty(lab, rig, 0, 64 * PAGE)]


@case([errno.EOPNOTSUPP, errno.EINVAL, errno.EINVAL, errno.EINVAL, errno.EOVERFLOW, errno.ENOENT, errno.EOPNOTSUPP])
def hwpt_get_dirty_bitmap_errors(lab):
    rig = tracking_rig(lab)
    return [
        get_dirty(lab, rig, 0, 64 * PAGE, flags=2),
        get_dirty(lab, rig, 1024, 64 * PAGE),  # iova off the IOAS alignment
        get_dirty(lab, rig, 0, 64 * PAGE, page_size=0),
        get_dirty(lab, rig, 0, 3 * PAGE, page_size=2 * PAGE),  # end off the page size
        get_dirty(lab, rig, 2**64 - APERTURE - PAGE, 2 * PAGE),
        get_dirty(lab, rig, 0, 64 * PAGE, hwpt_id=999),
        get_dirty(lab, rig, 0, 64 * PAGE, hwpt_id=rig.plain_hwpt_id),  # no dirty ops
    ]


@case([errno.EOPNOTSUPP, errno.ENOENT, errno.EOPNOTSUPP])
def hwpt_set_dirty_tracking_errors(lab):
    rig = hwpt_mapped(lab)
    return [
        set_tracking(lab, rig, True, flags=2),
        set_tracking(lab, rig, True, hwpt_id=999),
        set_tracking(lab, rig, True, hwpt_id=rig.plain_hwpt_id),
    ]


# -- /dev/iommu: the command core, IOAS_MAP, HWPT_ALLOC ----------------------------------------


def iommu_cmd(
    lab: Lab, iommufd: int, request: int, obj: ctypes.Structure, size: int | None = None, tail: bytes = b""
) -> tuple[int, ctypes.Structure]:
    """One command with `size` (default: the struct's) and `tail` after the struct; (errno,
    the struct as the kernel left it)."""
    raw = bytes(obj)
    buf = bytearray(raw + tail)
    struct.pack_into("<I", buf, 0, len(buf) if size is None else size)
    err = ioctl_errno(lab, iommufd, request, buf)
    return err, type(obj).from_buffer_copy(bytes(buf[: len(raw)]))


@case([errno.EINVAL, errno.E2BIG, 0, errno.EOPNOTSUPP, errno.ENOTTY])
def iommufd_command_size_and_flags(lab):
    fd = lab.iommufd()
    alloc = uapi.iommu_ioas_alloc()
    return [
        iommu_cmd(lab, fd, uapi.IOMMU_IOAS_ALLOC, alloc, size=8)[0],  # below offsetofend(out_ioas_id)
        iommu_cmd(lab, fd, uapi.IOMMU_IOAS_ALLOC, alloc, tail=b"\0\0\0\1")[0],  # unknown non-zero bytes
        iommu_cmd(lab, fd, uapi.IOMMU_IOAS_ALLOC, alloc, tail=bytes(4))[0],  # zero bytes past it are fine
        iommu_cmd(lab, fd, uapi.IOMMU_IOAS_ALLOC, uapi.iommu_ioas_alloc(flags=1))[0],
        ioctl_errno(lab, fd, uapi._IO(";", 0x80 + 0x40), bytearray(16)),  # past every command
    ]


def ioas_map(
    lab: Lab,
    dev: Device,
    mem: UserMem | int,
    length: int,
    iova: int | None = None,
    flags: int = uapi.IOMMU_IOAS_MAP_READABLE | uapi.IOMMU_IOAS_MAP_WRITEABLE,
    ioas_id: int | None = None,
    **extra: int,
) -> int | tuple[int, int]:
    """IOAS_MAP of user memory; the errno, or (0, the iova the kernel chose)."""
    addr = mem if isinstance(mem, int) else mem.addr
    cmd = uapi.iommu_ioas_map(
        flags=flags | (0 if iova is None else uapi.IOMMU_IOAS_MAP_FIXED_IOVA),
        ioas_id=dev.ioas_id if ioas_id is None else ioas_id,
        user_va=addr,
        length=length,
        iova=iova or 0,
        **extra,
    )
    err, out = iommu_cmd(lab, dev.iommufd, uapi.IOMMU_IOAS_MAP, cmd)
    return err or (0, out.iova)


@case(
    [
        errno.EOPNOTSUPP,
        errno.EOPNOTSUPP,
        errno.EOVERFLOW,
        errno.EINVAL,
        errno.ENOENT,
        errno.EINVAL,
        errno.EINVAL,
        errno.EINVAL,
        (0, MIB),
        errno.EEXIST,
    ]
)
def ioas_map_table(lab):
    dev = mtty(lab)
    mem = UserMem(16 * PAGE)
    rw = uapi.IOMMU_IOAS_MAP_READABLE | uapi.IOMMU_IOAS_MAP_WRITEABLE
    return [
        ioas_map(lab, dev, mem, 16 * PAGE, MIB, flags=rw | 8),
        ioas_map(lab, dev, mem, 16 * PAGE, MIB, **{"__reserved": 1}),
        ioas_map(lab, dev, mem, 16 * PAGE, 2**64 - 1),
        ioas_map(lab, dev, mem, 16 * PAGE, MIB, flags=0),  # neither readable nor writable
        ioas_map(lab, dev, mem, 16 * PAGE, MIB, ioas_id=999),
        ioas_map(lab, dev, mem, 0, MIB),
        ioas_map(lab, dev, mem.addr + 512, 8 * PAGE, MIB),  # user address off the page
        ioas_map(lab, dev, mem, 8 * PAGE, MIB + 512),  # iova off the page
        ioas_map(lab, dev, mem, 16 * PAGE, MIB),
        ioas_map(lab, dev, mem, PAGE, MIB + 15 * PAGE),  # overlaps the first
    ]


@case([(0, PAGE), (0, 5 * PAGE), (0, 9 * PAGE)])
def ioas_map_chooses_iovas_above_the_first_page(lab):
    """Without FIXED_IOVA the kernel allocates first-fit from PAGE_SIZE up, aligned to the
    smallest of the length's power of two, the user address's alignment, and the largest
    page it could map (PAGE_SIZE without THP, as in the lab's kernel: a 64 KiB-aligned user
    address still gets a 4 KiB-aligned IOVA)."""
    dev = mtty(lab)
    mem = UserMem(64 * KIB + 32 * PAGE)
    page_aligned = mem.addr + (PAGE if mem.addr & PAGE == 0 else 0)  # aligned to 4 KiB, not 8 KiB
    aligned_64k = -(-mem.addr // (64 * KIB)) * 64 * KIB
    assert aligned_64k + 16 * PAGE <= mem.addr + mem.size
    return [
        ioas_map(lab, dev, page_aligned, 4 * PAGE),
        ioas_map(lab, dev, page_aligned, 4 * PAGE),
        ioas_map(lab, dev, aligned_64k, 16 * PAGE),
    ]


@case([errno.EOPNOTSUPP, errno.EINVAL, errno.ENOENT, errno.EINVAL, errno.EOPNOTSUPP])
def hwpt_alloc_table(lab):
    rig = lab.hwpt()

    def alloc(**fields: int) -> int:
        cmd = uapi.iommu_hwpt_alloc(**{"dev_id": rig.dev_id, "pt_id": rig.ioas_id, **fields})
        return iommu_cmd(lab, rig.iommufd, uapi.IOMMU_HWPT_ALLOC, cmd)[0]

    return [alloc(**{"__reserved": 1}), alloc(data_len=8), alloc(dev_id=999), alloc(pt_id=999), alloc(flags=1 << 7)]
