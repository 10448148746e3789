"""Embedding the orchestrator: migrate between two QEMUs your stack already started.

    python examples/migrate_two_vms.py SRC_QMP DST_QMP SRC_RAM DST_RAM

Both QEMUs need share=on file-backed RAM and a QMP socket for us; the destination must be
started with `-incoming defer`. Prints the JSON report; exit status 0 when it completed.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path

from orchestrator.migration.attach import attach
from orchestrator.migration.driver import Migration, MigrationOptions, MigrationReport
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
                return await Migration(ep, trackers, uri, options).run()
        finally:
            ep.sink.close()
    finally:
        await src.close()
        await dst.close()


def main() -> int:
    report = asyncio.run(migrate(*map(Path, sys.argv[1:5])))
    print(json.dumps(report.as_dict(), indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
