"""A migration rig of doubles: two fake QEMUs, a device, guest RAM on both sides and a tracker
of the guest's writes, all journalled in one place."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field

import pytest

from orchestrator.driver import GuestHome, Migration, MigrationOptions, MigrationReport
from orchestrator.engine import RoundRecord
from orchestrator.memory import MemoryLayout
from orchestrator.trackers import RecoveryPolicy
from orchestrator.vfio import State
from tests.fakes.devices import FakeDevice
from tests.fakes.faults import Fault
from tests.fakes.qemu import FakeHost, FakeQemu, RunState, turn
from tests.fakes.ram import PAGE, GuestWrites, MemorySink

NPAGES = 64
LAYOUT = MemoryLayout.flat(NPAGES * PAGE)
URI = "unix:/fake/dst/migrate.sock"
#: No round meets this limit, so precopy always runs to the round cap (3) and is forced over:
#: the same steps on every run.
OPTIONS = MigrationOptions(
    downtime_limit_ms=1e-6, max_rounds=3, on_limit="force", verify=True, qmp_timeout_s=5.0,
    device_timeout_s=5.0, recovery=RecoveryPolicy(timeout=5.0, backoff_initial=0.0),
)


@dataclass
class Rig:
    host: FakeHost
    src: FakeQemu
    dst: FakeQemu
    sink: MemorySink
    guest: GuestWrites
    device: FakeDevice
    was_running: bool
    written: list[int] = field(default_factory=list)

    def migration(self, options: MigrationOptions = OPTIONS, on_round: Callable[[RoundRecord], None] | None = None) -> Migration:
        return Migration(self.src, self.dst, LAYOUT, self.sink, [self.guest], URI, options,
                         on_round=on_round or self.guest_writes, devices=[self.device.migration])

    def guest_writes(self, rec: RoundRecord) -> None:
        """A running guest writes one more page after every round (not once it is stopped)."""
        if self.src.running:
            page = (7 * rec.round + 3) % NPAGES
            self.guest.write(page)
            self.written.append(page)

    async def settle(self) -> None:
        """Let what the QEMUs still do on their own (a destination loading, exiting) happen."""
        for _ in range(20):
            await turn()

    async def check_guest_home(self, rep: MigrationReport) -> None:
        """Invariant 10: the guest runs (or stays paused, as its user left it) on exactly one
        side, or the report says it runs nowhere; trackers stopped; a source that keeps the
        guest has its capabilities and its device as before."""
        await self.settle()
        assert not (self.src.running and self.dst.running), self.host.journal
        assert rep.trackers[0]["state"] == "stopped"
        if rep.guest is GuestHome.SOURCE:
            assert not self.src.lost and self.src.running is self.was_running, self.host.journal
            assert not self.dst.running
            assert self.src.capabilities == dict.fromkeys(self.src.capabilities, False), rep.error
            assert self.device.src.mig_state == State.VFIO_DEVICE_STATE_RUNNING
        elif rep.guest is GuestHome.DESTINATION:
            assert not self.dst.lost and self.dst.running is self.was_running, self.host.journal
            assert self.dst.runstate in (RunState.RUNNING, RunState.PAUSED) and not self.src.running
        else:
            assert rep.status != "completed"
            assert self.src.lost or self.dst.lost or RunState.SHUTDOWN in (self.src.runstate, self.dst.runstate)


RigFactory = Callable[..., Rig]


@pytest.fixture
async def make_rig() -> AsyncIterator[RigFactory]:
    rigs: list[Rig] = []

    def make(*, paused: bool = False, src: Collection[Fault] = (), dst: Collection[Fault] = (),
             sink: Collection[Fault] = (), collect: Collection[int | str] = (), device: str | None = None) -> Rig:
        host = FakeHost()
        src_qemu = FakeQemu(host, "src", RunState.PAUSED if paused else RunState.RUNNING, faults=src)
        dst_qemu = FakeQemu(host, "dst", RunState.INMIGRATE, faults=dst)
        memory = MemorySink(host, NPAGES, sink)
        dev = FakeDevice.pair(host)
        if device is not None:
            dev.fail(device)
        rig = Rig(host, src_qemu, dst_qemu, memory, GuestWrites(memory, collect), dev, not paused)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        await rig.src.close()
        await rig.dst.close()

