"""One timed live migration of a running guest pair, by QEMU itself or by the orchestrator.

Both contenders get the same pair (fixture guest, RAM in a share=on file, TCG, one vCPU, a
destination waiting with `-incoming defer`) and end the clock at the same point: when
`choreography.wait_completed` returns (source `completed`, destination RESUME received and
running). Downtime is the same function for both: source STOP to destination RESUME, each
stamped when the event is read from QMP.

- QEMU: its own precopy over the unix socket, every RAM page through QEMU (no x-ignore-shared),
  `max-bandwidth` unlimited, `downtime-limit` 300 ms. The clock starts right before `migrate`;
  the capability/parameter setup and `migrate-incoming` before it are not counted.
- Orchestrator: the clock starts right before `attach` (layout discovery on both sides, RAM
  files mapped and pre-faulted) and covers `Migration.run()`: capabilities, tracker start,
  round 0, every round, switchover, tracker stop.

The pair was attached once when it was launched, and that attach pre-faulted, so allocated,
the whole destination RAM file. A destination QEMU that has just started holds no pages, so
`fresh_destination` gives them back to the kernel before either clock starts: each contender
pays for the destination memory it makes the kernel allocate, as it would in a real migration.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from orchestrator.lab.demo import GuestPair
from orchestrator.lab.launcher import QemuVm
from orchestrator.lab.workload import guest_rate, parse_progress
from orchestrator.migration.attach import attach
from orchestrator.migration.driver import MigrationOptions
from orchestrator.migration.engine import MigrationStatus
from orchestrator.qemu import choreography
from orchestrator.qemu.errors import QmpTimeoutError
from orchestrator.trackers import QemuWrites

#: QEMU rejects more than SIZE_MAX; this is far above any memory bandwidth.
UNLIMITED_BPS = 1 << 40
#: Progress lines (100 ms each) the guest prints before the clock starts: the pre-migration
#: rate is measured over them and every working set has been written once.
SETTLE_LINES = 11

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
_PUNCH_HOLE = 0x2 | 0x1  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def fresh_destination(vm: QemuVm) -> None:
    """Free every page of `vm`'s RAM file (it reads as zeros again) and keep its size."""
    fd = os.open(vm.ram_path, os.O_RDWR)
    try:
        if _libc.fallocate(fd, _PUNCH_HOLE, 0, vm.ram_size) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"punching {vm.ram_path}: {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Limits:
    downtime_ms: int = 300
    max_time_s: float = 60.0  # past this a migration counts as not converged and is cancelled


@dataclass
class Sample:
    """One migration. `rounds`: QEMU's dirty-sync-count, or the orchestrator's rounds including
    round 0 and the final copy: each is one pass that found what to send."""

    total_ms: float
    downtime_ms: float | None
    bytes_sent: int
    rounds: int
    converged: bool
    guest_rate: float | None  # guest pages/s during the migration window (None: window too short)
    guest_rate_before: float  # guest pages/s in the second before the clock started
    detail: dict = field(default_factory=dict)


class GuestClock:
    """The guest's progress lines on the source, split at the start of the migration."""

    def __init__(self, vm: QemuVm) -> None:
        self.vm = vm
        self.before = parse_progress(vm.read_serial())

    def rate_before(self) -> float:
        return guest_rate(self.before[-SETTLE_LINES:])

    def rate_during(self) -> float | None:
        """From the last line before the start to the last before the source stopped."""
        window = parse_progress(self.vm.read_serial())[len(self.before) - 1 :]
        return guest_rate(window) if len(window) >= 2 else None


async def qemu_precopy(pair: GuestPair, limits: Limits) -> Sample:
    src, dst, uri = pair.src.qmp, pair.dst.qmp, pair.dst.migration_uri()
    for session in (src, dst):
        await session.execute("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    await src.execute(
        "migrate-set-parameters", **{"max-bandwidth": UNLIMITED_BPS, "downtime-limit": limits.downtime_ms}
    )
    await dst.execute("migrate-incoming", uri=uri)
    clock = GuestClock(pair.src)
    start = time.monotonic()
    await src.execute("migrate", uri=uri)
    try:
        done = await choreography.wait_completed(src, dst, limits.max_time_s)
    except QmpTimeoutError:
        info = await src.query_migrate()
        await choreography.cancel(src)
        return _qemu_sample(info, time.monotonic() - start, None, clock)
    seconds = time.monotonic() - start
    # QEMU 7.2 reports `completed` a moment before it fills in total-time and downtime: ask again.
    return _qemu_sample(await src.query_migrate(), seconds, done.downtime_ns / 1e6, clock)


def _qemu_sample(info: dict, seconds: float, downtime_ms: float | None, clock: GuestClock) -> Sample:
    ram = info.get("ram", {})
    pages = ram.get("normal", 0) + ram.get("duplicate", 0)
    if downtime_ms is not None and pages * ram["page-size"] < ram["total"]:
        raise RuntimeError(f"QEMU moved {pages} pages of {ram['total']} RAM bytes: RAM was skipped")
    return Sample(
        total_ms=seconds * 1e3,
        downtime_ms=downtime_ms,
        bytes_sent=ram.get("transferred", 0),
        rounds=ram.get("dirty-sync-count", 0),
        converged=downtime_ms is not None,
        guest_rate=clock.rate_during(),
        guest_rate_before=clock.rate_before(),
        detail={
            "qemu_total_ms": info.get("total-time"),
            "qemu_downtime_ms": info.get("downtime"),
            "ram_total": ram.get("total"),
            "normal_pages": ram.get("normal"),
            "zero_pages": ram.get("duplicate"),
        },
    )


async def orchestrated(pair: GuestPair, limits: Limits) -> Sample:
    options = MigrationOptions(downtime_limit_ms=limits.downtime_ms, max_time_s=limits.max_time_s, verify=False)
    clock = GuestClock(pair.src)
    start = time.monotonic()
    ep = await attach(pair.src.qmp, pair.dst.qmp, pair.src.ram_path, pair.dst.ram_path)
    attach_ms = (time.monotonic() - start) * 1e3
    try:
        report = await replace(pair, endpoints=ep).migration(options).run()
    finally:
        ep.sink.close()
    total_ms = (time.monotonic() - start) * 1e3
    if report.status is MigrationStatus.FAILED:
        raise RuntimeError(f"orchestrated migration failed: {report.error}")
    return Sample(
        total_ms=total_ms,
        downtime_ms=report.downtime_ms,
        bytes_sent=report.bytes_sent,
        rounds=len(report.rounds),
        converged=report.status is MigrationStatus.COMPLETED,
        guest_rate=clock.rate_during(),
        guest_rate_before=clock.rate_before(),
        detail={"attach_ms": attach_ms, "migration_ms": report.total_ms, "decision": report.decision},
    )


@dataclass(frozen=True)
class Contender:
    key: str  # its object in an e2e row
    tracker: QemuWrites  # guest_pair's tracker: VCPU loads the dirty-log plugin into the source
    migrate: Callable[[GuestPair, Limits], Awaitable[Sample]]


#: QEMU's own migration gets a pair whose only tracker reads memory (content hashing never
#: touches QEMU): no write-watch is registered while QEMU migrates itself.
QEMU = Contender("qemu", QemuWrites.CONTENT, qemu_precopy)
ORCHESTRATOR = Contender("orchestrator", QemuWrites.WRITEWATCH, orchestrated)
ORCHESTRATOR_VCPU = Contender("orchestrator_vcpu", QemuWrites.VCPU, orchestrated)
ORCHESTRATOR_CONTENT = Contender("orchestrator_content", QemuWrites.CONTENT, orchestrated)
CONTENDERS = (QEMU, ORCHESTRATOR, ORCHESTRATOR_VCPU, ORCHESTRATOR_CONTENT)
