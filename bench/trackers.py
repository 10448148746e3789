"""Per-round cost of collecting N device trackers into the shared bitmap.

N emulated mlx5-like devices log DMA for a 64 GiB guest; one `TrackerSet.collect` is what every
precopy round pays before it can decide anything, so its cost is reported per collect, idle
(nothing written since the last round) and after each device wrote 64 scattered 64 KiB buffers.
The figure includes everything a real round runs: the worker-thread dispatch and watchdog, the
REPORT ioctl through the emulated kernel's byte-level seam, and the OR-merge. Its baseline,
`..._serial_ms`, is the same trackers' `collect` called one after another in one thread: the
difference is what running them concurrently costs or saves.
"""

from __future__ import annotations

import asyncio

import numpy as np

from bench import Case, Options, Result, median_seconds, ms, suite
from orchestrator.dirty.bitmap import DirtyBitmap
from orchestrator.dirty.memory import MemoryLayout
from orchestrator.emulated import EmulatedKernel, Mlx5Like
from orchestrator.trackers import TrackerSet, VfioDmaLogTracker
from orchestrator.vfio import VfioDevice

GUEST = 64 << 30
DEVICES = (1, 4, 16)
WRITES, WRITE_BYTES = 64, 64 << 10


def _devices(kernel: EmulatedKernel, n: int) -> tuple[list[Mlx5Like], list[VfioDmaLogTracker]]:
    models = [Mlx5Like() for _ in range(n)]
    trackers = [
        VfioDmaLogTracker(VfioDevice(kernel.open_device(m), kernel, name=f"mlx5-{i}"), name=f"mlx5-{i}")
        for i, m in enumerate(models)
    ]
    return models, trackers


def _collect_seconds(n: int, options: Options) -> dict[str, float]:
    """Seconds per collect for `n` devices: idle, after DMA, and after DMA collected serially."""
    layout = MemoryLayout.flat(GUEST)
    bitmap = DirtyBitmap(layout.npages, layout.page_size)
    models, trackers = _devices(EmulatedKernel(), n)
    rng = np.random.default_rng(n)
    loop = asyncio.new_event_loop()
    tset = TrackerSet(trackers, bitmap, layout)

    def dma() -> None:
        bitmap.harvest()
        for model in models:
            for iova in rng.integers(0, GUEST // WRITE_BYTES, WRITES).tolist():
                model.dma_write(iova * WRITE_BYTES, WRITE_BYTES)

    def collect() -> None:
        loop.run_until_complete(tset.collect(1))

    def serial() -> None:
        for tracker in trackers:
            tracker.collect(bitmap)

    try:
        loop.run_until_complete(tset.start())
        seconds = median_seconds(
            {"idle": Case(collect, bitmap.harvest), "dma": Case(collect, dma), "dma_serial": Case(serial, dma)},
            options.repeat,
        )
        loop.run_until_complete(tset.stop())
    finally:
        loop.close()
    return seconds


@suite("micro")
def collect(options: Options) -> Result:
    """Milliseconds per collect of 1, 4 and 16 devices, idle and after DMA."""
    out: Result = {"collect_guest_gib": GUEST >> 30}
    for n in DEVICES:
        for case, seconds in _collect_seconds(n, options).items():
            out[f"collect_{n}dev_{case}_ms"] = ms(seconds)
    return out
