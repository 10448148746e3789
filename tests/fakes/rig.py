"""A migration rig of doubles: two fake QEMUs, a device, guest RAM on both sides and a tracker
of the guest's writes, all journalled in one place, and the invariant every run must end in."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from functools import cache

from orchestrator.dirty.memory import MemoryLayout
from orchestrator.migration.attach import Endpoints
from orchestrator.migration.driver import GuestHome, Migration, MigrationOptions, MigrationReport
from orchestrator.migration.engine import RoundRecord
from orchestrator.trackers import RecoveryPolicy
from orchestrator.vfio import State

from .devices import FakeDevice
from .faults import Fault
from .qemu import FakeHost, FakeQemu, RunState, turn
from .ram import PAGE, GuestWrites, MemorySink

NPAGES = 64
LAYOUT = MemoryLayout.flat(NPAGES * PAGE)
URI = "unix:/fake/dst/migrate.sock"
#: No round meets this limit, so precopy always runs to the round cap (3) and is forced over:
#: the same steps on every run.
OPTIONS = MigrationOptions(
    downtime_limit_ms=1e-6,
    max_rounds=3,
    on_limit="force",
    verify=True,
    qmp_timeout_s=5.0,
    device_timeout_s=5.0,
    recovery=RecoveryPolicy(timeout=5.0, backoff_initial=0.0),
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

    @classmethod
    def build(
        cls,
        *,
        paused: bool = False,
        src: Collection[Fault] = (),
        dst: Collection[Fault] = (),
        sink: Collection[Fault] = (),
        collect: Collection[int | str] = (),
        device: str | None = None,
    ) -> Rig:
        """`device` names a transition of the device to fail ("dst:RESUMING")."""
        host = FakeHost()
        memory = MemorySink(host, NPAGES, sink)
        dev = FakeDevice.pair(host)
        if device is not None:
            dev.fail(device)
        return cls(
            host,
            FakeQemu(host, "src", RunState.PAUSED if paused else RunState.RUNNING, faults=src),
            FakeQemu(host, "dst", RunState.INMIGRATE, faults=dst),
            memory,
            GuestWrites(memory, collect),
            dev,
            not paused,
        )

    def migration(
        self, options: MigrationOptions = OPTIONS, on_round: Callable[[RoundRecord], None] | None = None
    ) -> Migration:
        return Migration(
            Endpoints(self.src, self.dst, LAYOUT, self.sink),
            [self.guest],
            URI,
            options,
            on_round=on_round or self.guest_writes,
            devices=[self.device.migration],
        )

    def guest_writes(self, rec: RoundRecord) -> None:
        """A running guest writes one more page after every round (not once it is stopped)."""
        if self.src.running:
            page = (7 * rec.round + 3) % NPAGES
            self.guest.write(page)
            self.written.append(page)

    async def close(self) -> None:
        await self.src.close()
        await self.dst.close()

    async def check_guest_home(self, rep: MigrationReport) -> None:
        """The exit-path invariant, checked when the run has returned: the guest runs (or stays paused,
        as its user left it) on the side the report names, or the report says it runs
        nowhere; trackers stopped; a source that keeps the guest has its capabilities and its
        device as before. Then, once the QEMUs have done what they still do on their own (a
        destination loading, exiting), the guest runs on one side at most."""
        assert rep.trackers[0].state == "stopped"
        if rep.guest is GuestHome.SOURCE:
            assert not self.src.lost and self.src.running is self.was_running, self.host.journal
            restored = self.src.capabilities == dict.fromkeys(self.src.capabilities, False)
            assert restored or "capabilities back failed" in f"{rep.error} {rep.decision}", rep.error
            assert self.device.src.mig_state == State.VFIO_DEVICE_STATE_RUNNING
        elif rep.guest is GuestHome.DESTINATION:
            assert not self.dst.lost and self.dst.running is self.was_running, self.host.journal
            assert self.dst.runstate in (RunState.RUNNING, RunState.PAUSED) and not self.src.running
        else:  # an operator must look
            assert rep.status != "completed"
        for _ in range(20):
            await turn()
        assert not (self.src.running and self.dst.running), self.host.journal
        if rep.guest is GuestHome.SOURCE:
            assert not self.dst.running


@cache
def clean_journal() -> tuple[str, ...]:
    """Every step of a clean migration of a running guest, queries and events included: the
    steps at which the fault tests make things go wrong."""

    async def run() -> list[str]:
        rig = Rig.build()
        await rig.migration().run()
        await rig.close()
        return rig.host.journal

    return tuple(asyncio.run(run()))


def qemu_step(entry: str) -> tuple[str, str]:
    """("src", "migrate") from "src: migrate"; ("dst", "RESUME") from "dst RESUME"."""
    side, step = entry.split(": " if ": " in entry else " ", 1)
    return side, step
