"""Device state through VFIO migration v2, for one source device and its destination twin.

Source: RUNNING -> PRE_COPY (precopy data read in the background while RAM iterates) ->
STOP_COPY at switchover (the rest read to end of stream) -> STOP. Destination: RESUMING ->
state written -> STOP, then RUNNING once the guest runs there. Data fds are read and written
off the event loop through the syscall seam, so a slow device never stalls the migration,
and the same code serves real device fds and emulated ones.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from orchestrator import uapi as U
from orchestrator.trackers.watchdog import watched
from orchestrator.vfio import EndOfStream, State, VfioDevice, VfioError

_T = TypeVar("_T")
CHUNK = 1 << 20
POLL_S = 0.02  # how often to look for new precopy data after a temporary end of stream


async def each_device(devices: list[DeviceMigration], step: Callable[[DeviceMigration], Awaitable[_T]]) -> list[_T]:
    """Run `step` on every device and let every one settle before returning or raising the
    first failure: an abort racing a sibling's STOP_COPY could otherwise leave that device
    stopped under a running VM. (Cancelling the others would not help: their ioctls run in
    threads that a cancel does not stop.)"""
    results = await asyncio.gather(*(step(d) for d in devices), return_exceptions=True)
    settled: list[_T] = []
    for r in results:
        if isinstance(r, BaseException):
            raise r
        settled.append(r)
    return settled


@dataclass
class DeviceReport:
    name: str
    precopy_bytes: int = 0
    stop_copy_bytes: int = 0
    state: str = "RUNNING"


@dataclass
class DeviceMigration:
    name: str
    src: VfioDevice
    dst: VfioDevice
    on_destination_running: Callable[[], None] | None = None
    # how long one device call may take: a REPORT hung in the driver holds the device's
    # mutex, and every later ioctl on the device waits behind it
    timeout_s: float = 10.0
    report: DeviceReport = field(init=False)
    _data: bytearray = field(default_factory=bytearray, init=False)
    _fd: int | None = field(default=None, init=False)
    _pump: asyncio.Task | None = field(default=None, init=False)
    _wake: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    #: Calls whose thread has not returned, abandoned ones (a cancelled step) included.
    _inflight: int = field(default=0, init=False)
    _idle: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    def __post_init__(self) -> None:
        self.report = DeviceReport(self.name)
        self._idle.set()

    async def _call(self, fn, *args):
        self._inflight += 1
        self._idle.clear()

        def settled() -> None:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

        name = f"{self.name}: {fn.__name__}"
        return await watched(fn, *args, timeout=self.timeout_s, name=name, on_settled=settled)

    async def _quiesce(self) -> str | None:
        """Wait for the calls a cancelled step left running: a STOP_COPY still in its thread
        would otherwise land after abort's RUNNING and leave the device stopped."""
        try:
            await asyncio.wait_for(self._idle.wait(), self.timeout_s)
        except TimeoutError:
            return f"a call still had not returned after {self.timeout_s:g}s"
        return None

    async def start_precopy(self) -> None:
        """Enter PRE_COPY when the device offers it and start reading its precopy data."""
        if not await self._call(self.src.migration_flags) & U.VFIO_MIGRATION_PRE_COPY:
            return
        self._fd = await self._call(self.src.set_state, State.VFIO_DEVICE_STATE_PRE_COPY)
        self.report.state = "PRE_COPY"
        self._pump = asyncio.create_task(self._read_precopy(), name=f"{self.name}-precopy")

    async def _read_precopy(self) -> None:
        """Read until told to stop; never abandons a read in flight, so no byte is dropped."""
        while not self._wake.is_set():
            try:
                chunk = await self._call(self.src.read_data, self._fd, CHUNK)
            except EndOfStream:
                chunk = b""
            if chunk:
                self._data += chunk
                self.report.precopy_bytes += len(chunk)
                continue
            with contextlib.suppress(TimeoutError):  # nothing for now: look again soon, or stop when told to
                await asyncio.wait_for(self._wake.wait(), POLL_S)

    async def _stop_pump(self) -> None:
        """Let the reader finish; its failure (a hung or failed read) is the caller's. The
        switchover waits for this with the guest paused, so the reader is woken, not
        waited out."""
        self._wake.set()
        pump, self._pump = self._pump, None
        if pump is not None:
            await pump

    async def pending_bytes(self) -> int:
        """What switchover would still have to move: precopy data not read yet plus the
        stop-copy size (the device's own estimate, part of the expected downtime)."""
        if self._pump is not None and self._pump.done():
            self._pump.result()  # a precopy read failed: surface it now, not at switchover
        pending = await self._call(self.src.stop_copy_size)
        if self._fd is not None and self.report.state == "PRE_COPY":
            initial, dirty = await self._call(self.src.precopy_info, self._fd)
            pending += initial + dirty
        return pending

    async def stop_copy(self) -> None:
        """At switchover (vCPUs stopped): quiesce the device and read its final state."""
        await self._stop_pump()
        fd = await self._call(self.src.set_state, State.VFIO_DEVICE_STATE_STOP_COPY)
        self.report.state = "STOP_COPY"
        if fd is not None:
            await self._close(self.src, self._fd)
            self._fd = fd
        while chunk := await self._call(self.src.read_data, self._fd, CHUNK):
            self._data += chunk
            self.report.stop_copy_bytes += len(chunk)
        await self._close(self.src, self._fd)
        self._fd = None
        await self._call(self.src.set_state, State.VFIO_DEVICE_STATE_STOP)
        self.report.state = "STOP"

    async def resume(self) -> None:
        """Load the state into the destination device before the destination runs."""
        fd = await self._call(self.dst.set_state, State.VFIO_DEVICE_STATE_RESUMING)
        try:
            view = memoryview(self._data)
            for lo in range(0, len(view), CHUNK):
                await self._call(self.dst.write_data, fd, bytes(view[lo : lo + CHUNK]))
        finally:
            await self._close(self.dst, fd)
        await self._call(self.dst.set_state, State.VFIO_DEVICE_STATE_STOP)

    async def run_destination(self) -> None:
        await self._call(self.dst.set_state, State.VFIO_DEVICE_STATE_RUNNING)
        self.report.state = "MIGRATED"
        if self.on_destination_running:
            self.on_destination_running()

    async def abort(self) -> str | None:
        """Migration abandoned: the source device runs again. Returns an error text if it
        could not be brought back (the caller reports it; the VM itself keeps running)."""
        problems = []
        try:
            await self._stop_pump()
        except (VfioError, TimeoutError) as exc:
            problems.append(f"precopy read failed: {exc}")
        if hung := await self._quiesce():
            problems.append(hung)
        await self._close(self.src, self._fd)
        self._fd = None
        try:
            await self._call(self.src.set_state, State.VFIO_DEVICE_STATE_RUNNING)
        except (VfioError, TimeoutError) as exc:
            problems.append(f"could not return to RUNNING: {exc}")
        if problems:
            return f"{self.name}: {'; '.join(problems)}"
        self.report.state = "RUNNING"
        return None

    async def _close(self, dev: VfioDevice, fd: int | None) -> None:
        if fd is not None:
            with contextlib.suppress(VfioError, TimeoutError):  # the FSM may have torn the stream down
                await self._call(dev.close_data, fd)
