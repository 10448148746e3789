"""Bad input to the client gets a clear error before any ioctl; good input is encoded
byte-exactly as a C caller would encode it."""

import ctypes
import struct

import numpy as np
import pytest

from orchestrator import uapi as U
from orchestrator.dirty.bits import page_words, report_words
from orchestrator.vfio import IommufdHwpt, State, VfioDevice, VfioUsageError


class NoSyscalls:
    """A seam that fails the test if the client reaches the kernel."""

    def ioctl(self, fd, request, arg):
        raise AssertionError(f"ioctl {request:#x} issued despite bad input")

    read = write = close = ioctl


class Recorder:
    """Captures the bytes of each ioctl, and the user memory its pointers reference."""

    def __init__(self):
        self.calls = []

    def ioctl(self, fd, request, arg):
        self.calls.append((fd, request, bytes(arg)))
        if request == U.VFIO_DEVICE_FEATURE and len(arg) >= 32:
            flags = struct.unpack_from("<I", arg, 4)[0]
            if flags & 0xFFFF == U.VFIO_DEVICE_FEATURE_DMA_LOGGING_START:
                n, ptr = struct.unpack_from("<I4xQ", arg, 16)
                self.ranges = [struct.unpack("<QQ", ctypes.string_at(ptr + 16 * i, 16)) for i in range(n)]
                struct.pack_into("<Q", arg, 8, 1 << 21)  # driver picks 2 MiB
        return 0


dev = VfioDevice(7, NoSyscalls(), name="dev0")
zeroed = report_words(1)


@pytest.mark.parametrize(
    "ranges,page,needle",
    [
        ([(0x1000, 0x1000)], 3000, "power of two"),
        ([(0x1000, 0x1000)], 2048, "power of two >= 4096"),
        ([], 4096, "at least one range"),
        ([(0x1000, 0)], 4096, "length > 0"),
        ([(0x1800, 0x1000)], 4096, "not aligned"),
        ([(0x1000, 0x1800)], 4096, "not aligned"),
        ([(0x0, 0x3000), (0x2000, 0x1000)], 4096, "overlap"),
        ([((1 << 64) - 0x1000, 0x2000)], 4096, "wraps"),
        ([(i * 0x2000, 0x1000) for i in range(257)], 4096, "at most 256"),
    ],
)
def test_start_bad_input(ranges, page, needle):
    with pytest.raises(VfioUsageError, match=needle):
        dev.start_dma_logging(ranges, page)


@pytest.mark.parametrize(
    "iova,length,page,out,needle",
    [
        (0, 0x1000, 1000, zeroed, "power of two"),
        (0, 0, 4096, zeroed, "length > 0"),
        ((1 << 64) - 0x1000, 0x2000, 4096, zeroed, "wraps"),
        (0, 1 << 30, 4096, zeroed, "may write 4608"),
        (0, 0x1000, 4096, np.zeros(4, np.uint32), "uint64"),
        (0, 0x1000, 4096, zeroed[::2], "contiguous"),
        (0, 0x1000, 4096, [0, 0], "uint64"),
    ],
)
def test_report_bad_input(iova, length, page, out, needle):
    with pytest.raises(VfioUsageError, match=needle):
        dev.report_dma_log(iova, length, page, out)


def test_report_bitmap_must_end_on_a_page():
    """A real kernel may set bits up to the end of the bitmap's last page."""
    with pytest.raises(VfioUsageError, match="end on a page boundary"):
        dev.report_dma_log(0, 0x1000, 4096, page_words(3 * 512)[8 : 8 + 1024])
    with pytest.raises(VfioUsageError, match="one more"):
        dev.report_dma_log(0, 0x1000, 4096, page_words(512))  # no spare page
    VfioDevice(7, Recorder()).report_dma_log(0, 0x1000, 4096, report_words(1))


def test_report_readonly_buffer_rejected():
    ro = np.zeros(8, np.uint64)
    ro.flags.writeable = False
    with pytest.raises(VfioUsageError, match="writable"):
        dev.report_dma_log(0, 0x1000, 4096, ro)


def test_error_state_cannot_be_requested():
    with pytest.raises(VfioUsageError, match="ERROR"):
        dev.set_state(State.VFIO_DEVICE_STATE_ERROR)


def test_hwpt_bad_input():
    hwpt = IommufdHwpt(3, 1, NoSyscalls())
    with pytest.raises(VfioUsageError, match="aligned"):
        hwpt.get_dirty_bitmap(0x800, 0x1000, 4096, zeroed)
    with pytest.raises(VfioUsageError, match="power of two"):
        hwpt.get_dirty_bitmap(0, 0x3000, 0x3000, zeroed)


def test_start_encoding_and_granted_page_size():
    rec = Recorder()
    d = VfioDevice(5, rec)
    granted = d.start_dma_logging([(0x200000, 0x200000), (0x0, 0x1000)], 4096)
    assert granted == 1 << 21
    fd, req, raw = rec.calls[0]
    assert (fd, req) == (5, 0x3B75)
    argsz, flags, page, n, reserved = struct.unpack_from("<IIQII", raw)
    assert argsz == 32 and flags == U.VFIO_DEVICE_FEATURE_SET | 6
    assert (page, n, reserved) == (4096, 2, 0)
    assert rec.ranges == [(0x0, 0x1000), (0x200000, 0x200000)], "ranges sorted, pointer followed"


def test_report_encoding_points_at_out():
    rec = Recorder()
    out = report_words(64)
    VfioDevice(5, rec).report_dma_log(0x100000, 0x40000, 4096, out)
    _, _, raw = rec.calls[0]
    argsz, flags, iova, length, page, ptr = struct.unpack("<IIQQQQ", raw)
    assert (argsz, flags) == (40, U.VFIO_DEVICE_FEATURE_GET | 8)
    assert (iova, length, page, ptr) == (0x100000, 0x40000, 4096, out.ctypes.data)


def test_probe_and_state_encoding():
    rec = Recorder()
    d = VfioDevice(5, rec)
    assert d.probe_dma_logging() is True
    assert struct.unpack("<II", rec.calls[0][2]) == (8, U.VFIO_DEVICE_FEATURE_PROBE | U.VFIO_DEVICE_FEATURE_SET | 6)
    assert d.set_state(State.VFIO_DEVICE_STATE_STOP_COPY) is None  # data_fd stays -1
    assert struct.unpack("<IIIi", rec.calls[1][2]) == (16, U.VFIO_DEVICE_FEATURE_SET | 2, 3, -1)
