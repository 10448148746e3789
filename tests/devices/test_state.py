"""Device state through migration v2: a hung device call fails the step with a clear error
instead of hanging the migration, and a failed precopy read surfaces at once."""

from __future__ import annotations

import asyncio
import errno
import threading

import pytest

from orchestrator import uapi as U
from orchestrator.emulated import EmulatedKernel, Mlx5Like
from orchestrator.migration.devices import DeviceMigration
from orchestrator.vfio import State, TrackerLost, VfioDevice


class Hanging:
    """Wraps a real VfioDevice; the named method blocks until released."""

    def __init__(self, dev: VfioDevice, method: str):
        self._dev, self._method = dev, method
        self.release = threading.Event()

    def __getattr__(self, name):
        real = getattr(self._dev, name)
        if name != self._method:
            return real

        def blocked(*args):
            self.release.wait(10)
            return real(*args)

        blocked.__name__ = name
        return blocked


def pair():
    src_k, dst_k = EmulatedKernel(), EmulatedKernel()
    sm, dm = Mlx5Like(), Mlx5Like()
    return (
        VfioDevice(src_k.open_device(sm), src_k, name="dev"),
        sm,
        VfioDevice(dst_k.open_device(dm), dst_k, name="dev"),
        dm,
    )


async def test_round_trip_moves_the_state():
    src, sm, dst, dm = pair()
    sm.device_data = b"state".ljust(40, b"!")
    dm_run = []
    mig = DeviceMigration("dev", src, dst, lambda: dm_run.append(True))
    await mig.start_precopy()
    assert await mig.pending_bytes() > 0
    await mig.stop_copy()
    await mig.resume()
    await mig.run_destination()
    assert dm.device_data == sm.device_data and dm_run == [True]
    assert dm.mig_state == U.VFIO_DEVICE_STATE_RUNNING and mig.report.state == "MIGRATED"


async def test_a_hung_state_change_is_a_timeout_naming_the_device():
    src, _sm, dst, _ = pair()
    hung = Hanging(src, "set_state")
    mig = DeviceMigration("dev", hung, dst, timeout_s=0.2)
    with pytest.raises(TimeoutError, match=r"dev: set_state did not return within 0.2s"):
        await mig.start_precopy()
    problem = await mig.abort()
    assert problem and "could not return to RUNNING" in problem
    hung.release.set()


async def test_failed_precopy_read_surfaces_before_switchover():
    src, sm, dst, _ = pair()

    class Failing:
        def __getattr__(self, name):
            return getattr(src, name)

        def read_data(self, fd, n):
            raise TrackerLost("read migration data", errno.EIO, "dev")

    mig = DeviceMigration("dev", Failing(), dst)
    await mig.start_precopy()
    for _ in range(100):
        if mig._pump.done():
            break
        await asyncio.sleep(0.01)
    with pytest.raises(TrackerLost):
        await mig.pending_bytes()
    assert await mig.abort() is not None
    assert sm.mig_state == State.VFIO_DEVICE_STATE_RUNNING


async def test_a_failing_device_step_waits_for_its_siblings():
    """The first failure is raised only after every device's step has settled."""
    from orchestrator.migration.devices import each_device

    finished = []

    async def step(name):
        if name == "fast-fail":
            raise RuntimeError("STOP_COPY refused")
        await asyncio.sleep(0.1)
        finished.append(name)
        return name

    with pytest.raises(RuntimeError, match="STOP_COPY refused"):
        await each_device(["fast-fail", "slow"], step)
    assert finished == ["slow"], "the sibling finished before the failure was raised"
    assert await each_device(["a", "b"], step) == ["a", "b"]
