"""Embedding the orchestrator: migrate between two QEMUs your stack already started.

    python examples/migrate_two_vms.py SRC_QMP DST_QMP SRC_RAM DST_RAM

Both QEMUs need share=on file-backed RAM and a QMP socket for us; the destination must be
started with `-incoming defer`. Prints the job's state after every round (as `query-migrate`
would), lowers the downtime limit after round 5 if it has not converged by then, and prints
the JSON report; exit status 0 when it completed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import tempfile
from pathlib import Path

from orchestrator.migration.attach import attach
from orchestrator.migration.driver import Migration, MigrationOptions, MigrationReport
from orchestrator.migration.engine.sequence import NotNow
from orchestrator.migration.events import EventName, MigrationEvent
from orchestrator.qemu.qmp import QmpSession
from orchestrator.trackers import QemuWrites, qemu_write_trackers


async def migrate(src_qmp: Path, dst_qmp: Path, src_ram: Path, dst_ram: Path) -> MigrationReport:
    src, dst = await QmpSession.connect(src_qmp), await QmpSession.connect(dst_qmp)
    try:
        ep = await attach(src, dst, src_ram, dst_ram)  # validates everything, changes nothing
        try:
            # Any accelerator: write-watch on the source QEMU's process (content hashing if it
            # is refused, with the reason printed). Add VfioDmaLogTracker(VfioDevice(fd,
            # RealSyscalls())) per device.
            with (
                qemu_write_trackers(
                    QemuWrites.WRITEWATCH, ep.layout, src.peer_pid(), explicit=False, src_ram=str(src_ram)
                ) as trackers,
                tempfile.TemporaryDirectory() as tmp,
            ):
                uri = f"unix:{tmp}/migrate.sock"
                options = MigrationOptions(downtime_limit_ms=300, verify=True)
                migration = Migration(ep, trackers, uri, options)
                migration.listen(lambda ev: watch(migration, ev))
                return await migration.run()
        finally:
            ep.sink.close()
    finally:
        await src.close()
        await dst.close()


def watch(migration: Migration, ev: MigrationEvent) -> None:
    """Called on the event loop's thread for every event: must not block."""
    if ev.name is not EventName.MIGRATION_PASS:
        return
    info = migration.info().as_qmp()
    print(f"pass {ev.data['pass']}: {info['status']}, remaining {info['ram']['remaining']} B", file=sys.stderr)
    if ev.data["pass"] == 5:
        with contextlib.suppress(NotNow):  # NotNow: already switching over, nothing to relax
            migration.set_parameters(downtime_limit_ms=1000)  # a stack's "accept a longer pause"


def main() -> int:
    report = asyncio.run(migrate(*map(Path, sys.argv[1:5])))
    print(json.dumps(report.as_dict(), indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
