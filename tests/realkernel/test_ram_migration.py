"""A device DMA-ing into guest RAM, migrated by the orchestrator's tracking, inside the real
kernel: the RAM is a shared memfd mapped into dirtydev's IOAS, the device's writes go through
the kernel (vfio_dma_rw into the pinned pages), and only what real DMA logging reports is
copied to the destination after the bulk copy. The destination ends bit-exact, and each
round's harvest is exactly the pages the device wrote in it.

Real kernel only: the emulated IOAS has no memory behind it.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import random

import numpy as np
import pytest

from orchestrator.dirty.bitmap import DirtyBitmap
from orchestrator.dirty.memory import MemoryLayout, RamRegion
from orchestrator.trackers import TrackerSet, VfioDmaLogTracker
from orchestrator.vfio import VfioDevice

from .lab import Kind, RealLab, map_user

PAGE = 4096
RAM = 8 << 20
ROUNDS = 6
WRITES_PER_ROUND = 12


def guest_ram() -> np.ndarray:
    """A RAM file (memfd) mapped shared, as bytes; the array keeps the mapping alive."""
    fd = os.memfd_create("guest-ram")
    try:
        os.ftruncate(fd, RAM)
        return np.frombuffer(mmap.mmap(fd, RAM, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE), dtype=np.uint8)
    finally:
        os.close(fd)


async def migrate(lab: RealLab, seed: int) -> None:
    rng = random.Random(seed)
    src = guest_ram()
    dev = lab.device(Kind.DIRTYDEV)
    map_user(lab.sys, dev.iommufd, dev.ioas_id, src.ctypes.data, RAM, 0)
    layout = MemoryLayout((RamRegion(0, RAM),))
    bitmap = DirtyBitmap(layout.npages, PAGE)
    dst = np.zeros(RAM, dtype=np.uint8)
    tracker = VfioDmaLogTracker(VfioDevice(dev.fd, lab.sys, name="dirtydev"), name="dirtydev")
    async with TrackerSet([tracker], bitmap, layout) as tracker_set:
        dst[:] = src  # the bulk copy: everything written from here on is tracked
        for round_ in range(ROUNDS):
            written: set[int] = set()
            for _ in range(WRITES_PER_ROUND):
                iova, length = rng.randrange(RAM - 1), rng.randint(1, 3 * PAGE)
                length = min(length, RAM - iova)
                fill = rng.randrange(1, 256)
                dev.dma(iova, length, fill)
                assert (src[iova : iova + length] == fill).all(), "the device wrote the RAM file through the IOAS"
                written |= set(range(iova // PAGE, (iova + length - 1) // PAGE + 1))
            await tracker_set.collect(round_)
            dirty = bitmap.harvest()
            assert set(dirty.tolist()) == written, f"round {round_}: the harvest is exactly what the device wrote"
            for page in dirty.tolist():
                dst[page * PAGE : (page + 1) * PAGE] = src[page * PAGE : (page + 1) * PAGE]
        await tracker_set.collect(ROUNDS, final=True)
        assert bitmap.harvest().size == 0, "the device is quiet: nothing left"
    assert np.array_equal(dst, src), "the destination is bit-exact"


@pytest.mark.realkernel
@pytest.mark.parametrize("seed", [1, 2])
def test_device_dma_into_guest_ram_migrates_bit_exact(real: RealLab, seed: int) -> None:
    asyncio.run(migrate(real, seed))
