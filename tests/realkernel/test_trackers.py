"""The orchestrator's own DMA-logging trackers and `TrackerSet` against dirtydev devices, on
both kernels: the no-lost-bit property (every page written since a harvest is in the next
one) under injected faults, the exact harvest without them, the START fallback ladder, and
perma-dirty. Operation lists come from fixed seeds, so both sides run the same sequences.
"""

from __future__ import annotations

import asyncio
import errno
import random
from dataclasses import dataclass
from functools import partial

import pytest

from orchestrator.dirty.bitmap import DirtyBitmap
from orchestrator.dirty.memory import MemoryLayout, RamRegion
from orchestrator.emulated import Fault
from orchestrator.trackers import RecoveryPolicy, TrackerSet, TrackerState, VfioDmaLogTracker
from orchestrator.vfio import IovaRange, VfioDevice
from tests.trackers.test_no_lost_bit import Clock, runs

from .lab import Caps, Device, Kind, Lab, Model

PAGE = 4096
MIB = 1 << 20
LAYOUT = MemoryLayout((RamRegion(0, 1 * MIB), RamRegion(2 * MIB, 4 * MIB)))
RAM_PAGES = {p for r in LAYOUT.regions for p in range(r.gpa // PAGE, r.end // PAGE)}
SEEDS = range(4)


@dataclass(frozen=True)
class Spec:
    name: str
    caps: Caps
    reach: tuple[IovaRange, ...] | None = None


EXACT_FLEET = (
    Spec("4k-4ranges", Caps(max_ranges=4, max_page_size=1 << 16)),
    Spec("4k-1range", Caps(max_ranges=1), (IovaRange(2 * MIB, 2 * MIB),)),
    Spec("pds-2regions", Caps(model=Model.PDS, max_ranges=2)),
)
# Granted 2 MiB for a window that is not 2 MiB aligned: reports must be widened, and the
# harvest has every page of a written unit, so it is no longer exact.
FLEET = (*EXACT_FLEET, Spec("2m", Caps(max_ranges=1, min_page_size=2 * MIB), (IovaRange(3 * MIB, MIB // 2),)))
FAULTS = ("eio-once", "eio-sticky", "detach", "reattach", "start-e2big", "start-eopnotsupp", "start-enomem")
START_ERRNO = {"start-e2big": errno.E2BIG, "start-eopnotsupp": errno.EOPNOTSUPP, "start-enomem": errno.ENOMEM}
FAULT_OF = {"eio-once": Fault.REPORT_EIO_ONCE, "eio-sticky": Fault.REPORT_EIO_STICKY, "detach": Fault.DETACH}


def reach_pages(reach: tuple[IovaRange, ...] | None) -> set[int]:
    if reach is None:
        return RAM_PAGES
    return {p for r in reach for p in range(r.iova // PAGE, r.end // PAGE)} & RAM_PAGES


def ops_for(seed: int, fleet: tuple[Spec, ...], faults: bool, n: int = 40) -> list[tuple]:
    rng = random.Random(seed)
    kinds = ["write", "write", "write", "collect", "harvest"] + (["fault"] if faults else [])
    out: list[tuple] = []
    for _ in range(n):
        kind = rng.choice(kinds)
        if kind == "write":
            out.append(("write", rng.randrange(len(fleet)), rng.randrange(6 * MIB), rng.randint(1, 64 * 1024)))
        elif kind == "fault":
            out.append(("fault", rng.randrange(len(fleet)), rng.choice(FAULTS)))
        else:
            out.append((kind,))
    return out


def inject(dev: Device, what: str) -> None:
    if what == "reattach":
        dev.reattach()
    elif what in START_ERRNO:
        dev.fail_start(START_ERRNO[what])
    else:
        dev.inject(FAULT_OF[what])


async def run_ops(lab: Lab, fleet: tuple[Spec, ...], ops: list[tuple], exact: bool) -> None:
    devices = [lab.device(Kind.DIRTYDEV, spec.caps) for spec in fleet]
    trackers = [
        VfioDmaLogTracker(
            VfioDevice(dev.fd, lab.sys, name=spec.name), reach=list(spec.reach) if spec.reach else None, name=spec.name
        )
        for dev, spec in zip(devices, fleet, strict=False)
    ]
    bitmap = DirtyBitmap(LAYOUT.npages, PAGE)
    policy = RecoveryPolicy(timeout=30.0, max_restarts=2, backoff_initial=0.5, backoff_max=2.0)
    tracker_set = TrackerSet(trackers, bitmap, LAYOUT, policy, clock=Clock())
    written: set[int] = set()

    def check(got: set[int]) -> None:
        assert written <= got, f"lost pages {sorted(written - got)[:10]}"
        if exact:
            assert got == written, f"extra pages {sorted(got - written)[:10]}"

    async with tracker_set:
        for op in ops:
            if op[0] == "write":
                _, i, iova, length = op
                pages = set(range(iova // PAGE, (iova + length - 1) // PAGE + 1)) & reach_pages(fleet[i].reach)
                for lo, hi in runs(sorted(pages)):  # a device writes only memory it can reach
                    devices[i].dma(lo * PAGE, (hi - lo) * PAGE)
                written |= pages
            elif op[0] == "collect":
                await tracker_set.collect(1)
            elif op[0] == "harvest":
                await tracker_set.collect(1)
                check(set(bitmap.harvest().tolist()))
                written = set()
            else:
                inject(devices[op[1]], op[2])
        await tracker_set.collect(1, final=True)
        check(set(bitmap.harvest().tolist()))


def no_lost_bit_under_faults(lab: Lab, seed: int) -> None:
    asyncio.run(run_ops(lab, FLEET, ops_for(seed, FLEET, faults=True), exact=False))


def exact_without_faults(lab: Lab, seed: int) -> None:
    asyncio.run(run_ops(lab, EXACT_FLEET, ops_for(100 + seed, EXACT_FLEET, faults=False), exact=True))


def one_tracker(lab: Lab, dev: Device) -> tuple[DirtyBitmap, TrackerSet]:
    bitmap = DirtyBitmap(LAYOUT.npages, PAGE)
    tracker = VfioDmaLogTracker(VfioDevice(dev.fd, lab.sys, name="dev"), name="dev")
    return bitmap, TrackerSet([tracker], bitmap, LAYOUT)


def every_rung_refused_is_perma_dirty(lab: Lab) -> None:
    """No plan fits a 4 KiB address space: EOPNOTSUPP at every rung of the ladder."""

    async def go() -> None:
        bitmap, tracker_set = one_tracker(lab, lab.device(Kind.DIRTYDEV, Caps(max_addr_space=PAGE)))
        async with tracker_set:
            fallbacks = [e.errno for e in tracker_set.events if e.kind == "start-fallback"]
            assert len(fallbacks) >= 2 and set(fallbacks) == {errno.EOPNOTSUPP}
            assert tracker_set.stats()[0].state is TrackerState.PERMA_DIRTY
            await tracker_set.collect(1)
            assert set(bitmap.harvest().tolist()) == RAM_PAGES

    asyncio.run(go())


def detached_device_is_degraded(lab: Lab) -> None:
    """START fails with ENOTCONN, which no coarser plan can fix: the device's reach is dirty."""

    async def go() -> None:
        dev = lab.device(Kind.DIRTYDEV)
        dev.inject(Fault.DETACH)
        bitmap, tracker_set = one_tracker(lab, dev)
        async with tracker_set:
            assert tracker_set.stats()[0].state is TrackerState.DEGRADED
            await tracker_set.collect(1)
            assert set(bitmap.harvest().tolist()) == RAM_PAGES

    asyncio.run(go())


def ladder_falls_back_one_rung(lab: Lab) -> None:
    async def go() -> None:
        dev = lab.device(Kind.DIRTYDEV)
        dev.fail_start(errno.ENOMEM)
        bitmap, tracker_set = one_tracker(lab, dev)
        async with tracker_set:
            kinds = [(e.kind, e.errno) for e in tracker_set.events]
            assert kinds[0] == ("start-fallback", errno.ENOMEM)
            assert kinds[1][0] == "start" and tracker_set.stats()[0].state is TrackerState.RUNNING
            dev.dma(0x3000, 0x2000)
            await tracker_set.collect(1)
            assert bitmap.harvest().tolist() == [3, 4]

    asyncio.run(go())


SCENARIOS = [
    *(pytest.param(partial(no_lost_bit_under_faults, seed=s), id=f"no_lost_bit_under_faults-{s}") for s in SEEDS),
    *(pytest.param(partial(exact_without_faults, seed=s), id=f"exact_without_faults-{s}") for s in SEEDS),
    pytest.param(every_rung_refused_is_perma_dirty, id="every_rung_refused_is_perma_dirty"),
    pytest.param(detached_device_is_degraded, id="detached_device_is_degraded"),
    pytest.param(ladder_falls_back_one_rung, id="ladder_falls_back_one_rung"),
]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_emulated(scenario, emulated) -> None:
    scenario(emulated)


@pytest.mark.realkernel
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_real(scenario, real) -> None:
    scenario(real)
