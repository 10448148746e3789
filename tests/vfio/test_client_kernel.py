"""The typed client against the emulated kernel: what a real kernel answers becomes typed
results and errors, and migration v2 and IOMMUFD tracking work through the client."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from orchestrator.dirty.bitmap import DirtyBitmap
from orchestrator.dirty.bits import report_words
from orchestrator.dirty.memory import MemoryLayout, RamRegion
from orchestrator.emulated import EmulatedKernel, Fault, Mlx5Like, MttyLike, NoDmaLogging, PdsLike
from orchestrator.trackers import IommufdHwptTracker
from orchestrator.vfio import (
    AlreadyExists,
    EndOfStream,
    InvalidArgument,
    IommufdHwpt,
    IovaRange,
    NotSupported,
    State,
    TrackerLost,
    VfioDevice,
    VfioError,
)
from tests.emulated.test_iommufd import APERTURE, Setup

PAGE = 4096


def dev(model, kernel=None):
    k = kernel or EmulatedKernel()
    return VfioDevice(k.open_device(model), k, name=type(model).__name__), model


def test_probe():
    assert dev(Mlx5Like())[0].probe_dma_logging() is True
    assert dev(MttyLike())[0].probe_dma_logging() is True
    assert dev(NoDmaLogging())[0].probe_dma_logging() is False


def test_start_report_stop_roundtrip_and_granted_size():
    d, m = dev(Mlx5Like(min_page_size=1 << 16, max_page_size=1 << 16))
    assert d.start_dma_logging([(0, 1 << 20)], PAGE) == 1 << 16  # clamped up and written back
    m.dma_write(0x12345, 1)
    out = report_words(256)
    d.report_dma_log(0, 1 << 20, PAGE, out)
    bits = np.flatnonzero(np.unpackbits(out.view(np.uint8), bitorder="little"))
    assert bits.tolist() == list(range(16, 32)), "one 64 KiB unit replicated into sixteen 4 KiB bits"
    out[:] = 0
    d.report_dma_log(0, 1 << 20, PAGE, out)
    assert not out.any(), "read-and-clear"
    d.stop_dma_logging()
    assert not m.logging_active


def test_kernel_errors_become_typed_errors():
    d, m = dev(Mlx5Like())
    out = report_words(256)
    with pytest.raises(InvalidArgument) as e:
        d.report_dma_log(0, PAGE, PAGE, out)  # REPORT before START
    assert e.value.errno == errno.EINVAL and "DMA_LOGGING_REPORT" in str(e.value)
    d.start_dma_logging([(0, 1 << 20)], PAGE)
    with pytest.raises(InvalidArgument):
        d.start_dma_logging([(0, 1 << 20)], PAGE)  # second START
    m.inject(Fault.REPORT_EIO_STICKY)
    for _ in range(2):
        with pytest.raises(TrackerLost) as e:
            d.report_dma_log(0, PAGE, PAGE, out)
        assert e.value.errno == errno.EIO
    d.stop_dma_logging()
    d.start_dma_logging([(0, 1 << 20)], PAGE)
    d.report_dma_log(0, PAGE, PAGE, out)  # a new tracker clears the sticky error
    m.inject(Fault.DETACH)  # VF disabled: the tracker is freed with it
    with pytest.raises(InvalidArgument):
        d.report_dma_log(0, PAGE, PAGE, out)
    with pytest.raises(TrackerLost) as e:
        d.start_dma_logging([(0, 1 << 20)], PAGE)
    assert e.value.errno == errno.ENOTCONN
    nolog, _ = dev(NoDmaLogging())
    with pytest.raises(NotSupported) as e:
        nolog.start_dma_logging([(0, PAGE)], PAGE)
    assert e.value.errno == errno.ENOTTY


def test_driver_refusals():
    d, _ = dev(Mlx5Like(max_addr_space=1 << 20))
    with pytest.raises(NotSupported) as e:
        d.start_dma_logging([(0, 1 << 30)], PAGE)
    assert e.value.errno == errno.EOPNOTSUPP
    d, _ = dev(PdsLike(preexisting_regions=1))
    with pytest.raises(AlreadyExists):
        d.start_dma_logging([(0, PAGE)], PAGE)
    d, _ = dev(PdsLike(max_regions=0))
    with pytest.raises(NotSupported):
        d.start_dma_logging([(0, PAGE)], PAGE)


def test_migration_v2_through_the_client():
    kernel = EmulatedKernel()
    src, sm = dev(Mlx5Like(), kernel)
    dst, dm = dev(Mlx5Like(), kernel)
    sm.device_data = b"engine position 42".ljust(64, b".")
    assert src.migration_flags() & 0x7 == 0x7
    assert src.get_state() == State.VFIO_DEVICE_STATE_RUNNING
    fd = src.set_state(State.VFIO_DEVICE_STATE_PRE_COPY)
    assert fd is not None
    initial, _dirty = src.precopy_info(fd)
    assert initial > 0
    chunks = []
    while True:
        try:
            chunk = src.read_data(fd, 4096)
        except EndOfStream:
            break  # the temporary end of precopy data
        chunks.append(chunk)
    assert src.precopy_info(fd)[0] == 0
    assert src.stop_copy_size() > 0
    assert src.set_state(State.VFIO_DEVICE_STATE_STOP_COPY) is None  # same fd goes on
    while chunk := src.read_data(fd, 4096):
        chunks.append(chunk)
    src.close_data(fd)
    assert src.set_state(State.VFIO_DEVICE_STATE_STOP) is None
    rfd = dst.set_state(State.VFIO_DEVICE_STATE_RESUMING)
    dst.write_data(rfd, b"".join(chunks))
    dst.set_state(State.VFIO_DEVICE_STATE_STOP)
    dst.close_data(rfd)
    dst.set_state(State.VFIO_DEVICE_STATE_RUNNING)
    assert dm.device_data == sm.device_data


def test_failed_transition_names_the_real_state():
    d, m = dev(Mlx5Like())
    m.fail_transition(State.VFIO_DEVICE_STATE_STOP_COPY)
    d.set_state(State.VFIO_DEVICE_STATE_PRE_COPY)
    with pytest.raises(TrackerLost, match="device is now VFIO_DEVICE_STATE_PRE_COPY_P2P"):
        d.set_state(State.VFIO_DEVICE_STATE_STOP_COPY)  # path PRE_COPY -> PRE_COPY_P2P -> STOP_COPY
    with pytest.raises(VfioError) as e:
        d.precopy_info(12345)  # not an open fd: the kernel says so
    assert e.value.errno == errno.EBADF


def hwpt_setup(length=1 << 20):
    kernel = EmulatedKernel()
    model = Mlx5Like()
    s = Setup(kernel, model, length)
    assert IommufdHwpt.dirty_capable(s.iommufd, s.dev_id, kernel)
    hwpt = IommufdHwpt.alloc(s.iommufd, s.dev_id, s.ioas, kernel)
    s.attach(hwpt.hwpt_id)
    return model, hwpt


def test_iommufd_hwpt_tracker():
    model, hwpt = hwpt_setup()
    layout = MemoryLayout((RamRegion(APERTURE, 1 << 20),))
    tracker = IommufdHwptTracker(hwpt)
    bm = DirtyBitmap(layout.npages, PAGE)
    tracker.start(layout)
    model.dma_write(APERTURE + 3 * PAGE, 2 * PAGE)
    tracker.collect(bm)
    assert bm.harvest().tolist() == [APERTURE // PAGE + 3, APERTURE // PAGE + 4]
    out, second = report_words(64), report_words(64)
    model.dma_write(APERTURE, 1)
    hwpt.get_dirty_bitmap(APERTURE, 64 * PAGE, PAGE, out, no_clear=True)
    hwpt.get_dirty_bitmap(APERTURE, 64 * PAGE, PAGE, second, no_clear=False)
    assert out[0] == second[0] == 1, "NO_CLEAR leaves the bit for the next read"
    tracker.stop()


def test_iommufd_tracker_queries_mapped_areas_and_marks_the_rest():
    """RAM the IOAS does not map is dirty every round; what it maps is queried area by area,
    so a gap never hides the pages after it."""
    model, hwpt = hwpt_setup(1 << 20)  # the IOAS maps [APERTURE, +1 MiB)
    ram = RamRegion(APERTURE - (1 << 20), 2 << 20)  # RAM starts 1 MiB below the mapping
    layout = MemoryLayout((ram,))
    tracker = IommufdHwptTracker(hwpt, mapped=[IovaRange(APERTURE, 1 << 20)])
    bm = DirtyBitmap(layout.npages, PAGE)
    outcome = tracker.start(layout)
    assert outcome.untracked == [IovaRange(APERTURE - (1 << 20), 1 << 20)]
    model.dma_write(APERTURE + 5 * PAGE, 1)
    tracker.collect(bm)
    low = list(range((APERTURE - (1 << 20)) // PAGE, APERTURE // PAGE))
    assert bm.harvest().tolist() == [*low, APERTURE // PAGE + 5]


def test_hwpt_on_a_device_without_iommu_dirty_support():
    kernel = EmulatedKernel()
    s = Setup(kernel, Mlx5Like(iommu_dirty=False), 1 << 20)
    assert not IommufdHwpt.dirty_capable(s.iommufd, s.dev_id, kernel)
    with pytest.raises(NotSupported):
        IommufdHwpt.alloc(s.iommufd, s.dev_id, s.ioas, kernel)
