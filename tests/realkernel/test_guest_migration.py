"""A live migration of the fixture guest inside the lab's kernel, with a real-kernel device
DMA-ing into its RAM: the source QEMU's RAM file is mapped into dirtydev's IOAS, a thread has
the device write pages of the guest's DMA window through the kernel while precopy runs, and
the orchestrator tracks them by real DMA logging beside the vCPU plugin (which cannot see
them). The switchover comparison is bit-exact, and without the DMA-log tracker it is not.

Real kernel only (QEMU under TCG inside the lab's TCG VM).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import numpy as np
import pytest

from orchestrator.dirty.bitmap import DirtyBitmap
from orchestrator.dirty.memory import MemoryLayout
from orchestrator.lab.demo import guest_pair
from orchestrator.lab.workload import dma_window
from orchestrator.migration.driver import MigrationOptions
from orchestrator.trackers import QemuWrites, StartOutcome, VfioDmaLogTracker
from orchestrator.vfio import IovaRange, VfioDevice

from .lab import Device, Kind, RealLab, map_user

MEM = 64 << 20
PAGE = 4096


class DeviceDma:
    """The device's DMA: a thread writing random pages of a window until stopped."""

    def __init__(self, dev: Device, window: IovaRange, seed: int) -> None:
        self._dev, self._window, self._rng = dev, window, random.Random(seed)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.writes = 0

    def _run(self) -> None:
        pages = self._window.length // PAGE
        while not self._stopped.wait(0.02):
            page = self._rng.randrange(pages)
            self._dev.dma(self._window.iova + page * PAGE, self._rng.randint(1, 2 * PAGE), self._rng.randrange(1, 256))
            self.writes += 1

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


class Quiesced:
    """The device's DMA-log tracker, with the device quiesced once the source has stopped
    (a device's migration state goes to STOP with its VM; dirtydev has none): the first
    collect after the source's STOP event stops the DMA before reading the log, so the final
    collect has every write. `report=False` drops the log's bits: the negative control."""

    def __init__(
        self, tracker: VfioDmaLogTracker, dma: DeviceDma, source_stopped: Callable[[], bool], report: bool = True
    ) -> None:
        self._tracker, self._dma, self._source_stopped, self._report = tracker, dma, source_stopped, report
        self.name, self.kind = tracker.name, tracker.kind

    def covered(self, layout: MemoryLayout) -> list[IovaRange]:
        return self._tracker.covered(layout)

    def start(self, layout: MemoryLayout) -> StartOutcome:
        return self._tracker.start(layout)

    def collect(self, bitmap: DirtyBitmap) -> None:
        if self._source_stopped():
            self._dma.stop()
        scratch = bitmap if self._report else DirtyBitmap(bitmap.npages, bitmap.page_size)
        self._tracker.collect(scratch)

    def stop(self) -> None:
        self._dma.stop()
        self._tracker.stop()


async def migrate(lab: RealLab, report: bool):
    """(the migration report, how many DMA writes the device made)."""
    async with guest_pair("light", MEM, tracker=QemuWrites.VCPU) as pair:
        start, length = dma_window(pair.src.read_serial())
        ram = np.memmap(pair.src.ram_path, np.uint8, mode="r+")
        dev = lab.device(Kind.DIRTYDEV)
        map_user(lab.sys, dev.iommufd, dev.ioas_id, ram.ctypes.data, len(ram), 0)  # IOVA = RAM file offset = GPA
        window = IovaRange(start, length)
        dma = DeviceDma(dev, window, seed=7)
        device = VfioDmaLogTracker(VfioDevice(dev.fd, lab.sys, name="dirtydev"), reach=[window], name="dirtydev")
        tracker = Quiesced(device, dma, lambda: pair.src.qmp.last_event("STOP") is not None, report)
        dma.start()
        try:
            result = await pair.migration(MigrationOptions(verify=True), trackers=[*pair.trackers(), tracker]).run()
        finally:
            dma.stop()
        return result, dma.writes


@pytest.mark.realkernel
async def test_device_dma_tracked_by_real_dma_logging_migrates_bit_exact(real: RealLab) -> None:
    result, writes = await migrate(real, report=True)
    assert writes > 0
    assert result.status == "completed", result.error
    assert result.verified is True and result.mismatched_pages == []


@pytest.mark.realkernel
async def test_without_the_device_log_the_migration_is_not_bit_exact(real: RealLab) -> None:
    result, writes = await migrate(real, report=False)
    assert writes > 0
    assert result.verified is False and result.mismatched_pages, "the vCPU tracker alone misses the device's writes"
