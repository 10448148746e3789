"""The throttle on a real QEMU: the fixture guest's `heavy` workload writes as fast as its vCPU
runs, so the pages it reports per guest second (its own progress lines) fall as the cgroup
quota takes vCPU time away, roughly as (1 - level); released, the guest runs at full speed
again and the vCPU thread is back in its cgroup."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.lab.demo import guest_pair, wait_progress
from orchestrator.lab.workload import guest_rate, parse_progress
from orchestrator.qemu.throttle import CgroupThrottle, thread_cgroup

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
LEVELS = (0.0, 0.5, 0.8)
WINDOW_S = 4.0


async def rate_over(pair, seconds: float) -> float:
    """Pages a guest second, from the progress lines the guest printed over `seconds`."""
    before = len(parse_progress(pair.src.read_serial()))
    await asyncio.sleep(seconds)
    lines = await wait_progress(pair.src, before + 2, 30)
    return guest_rate(lines[before:])


async def test_the_heavy_guests_dirty_rate_falls_as_set(built) -> None:
    async with guest_pair("heavy", 256 << 20) as pair:
        pid = pair.src.qmp.peer_pid()
        throttle = await CgroupThrottle.open(pair.src.qmp, pid)
        homes = {tid: thread_cgroup(pid, tid, throttle.hierarchy.version) for tid in throttle.tids}
        rates: dict[float, float] = {}
        try:
            for level in LEVELS:
                await throttle.set(level)
                await asyncio.sleep(0.5)  # the quota takes hold within a period or two
                rates[level] = await rate_over(pair, WINDOW_S)
        finally:
            await throttle.release()
        after = await rate_over(pair, WINDOW_S)
        full = rates[0.0]
        print(
            "heavy guest, pages per guest second: "
            + ", ".join(f"L={lv:.1f}: {r:.0f} ({r / full:.2f} of full, 1-L={1 - lv:.1f})" for lv, r in rates.items())
            + f"; released: {after:.0f} ({after / full:.2f})"
        )
        assert rates[0.5] < 0.75 * full and rates[0.8] < 0.6 * rates[0.5], rates
        assert rates[0.8] > 0, "throttled, not stopped"
        assert after > 0.75 * full, "released: full speed again"
        assert {tid: thread_cgroup(pid, tid, throttle.hierarchy.version) for tid in throttle.tids} == homes
