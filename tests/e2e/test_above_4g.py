"""Guest RAM above 4 GiB under the vCPU plugin, on whichever QEMU the run uses.

QEMU 7.2 tells the plugin a store's RAM-block address (there, the offset in the RAM file),
10.0 its guest-physical address; above 4 GiB the two differ by the PCI hole. Either way the
tracker must find every page the guest dirties there, or verification fails.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from fixtures.guest.pattern import check_guest_ram, pc_regions
from orchestrator.lab.demo import wait_progress
from orchestrator.lab.launcher import Role, VmConfig, launch
from orchestrator.lab.workload import GUEST_ELF
from orchestrator.migration.attach import attach
from orchestrator.migration.driver import Migration, MigrationOptions
from orchestrator.trackers import VcpuTracker
from orchestrator.trackers.vcpulog import VcpuDirtyLog, log_pages

pytestmark = pytest.mark.slow
GIB = 1 << 30
# 1 GiB below the PCI hole and 512 MiB from 4 GiB on: the working set lies in the second.
RAM_MIB, BELOW_4G = 1536, GIB
MACHINE = ("-machine", f"max-ram-below-4g={BELOW_4G}")
APPEND = "pattern=random wss=64M base=0x100000000"


async def test_a_working_set_above_4g_migrates_bit_exact_under_the_vcpu_plugin() -> None:
    with VcpuDirtyLog.create(Path("/dev/shm") / f"vcpu-above-4g-{uuid.uuid4().hex}", log_pages(RAM_MIB << 20)) as log:
        src_cfg = VmConfig(
            "src", RAM_MIB, kernel=GUEST_ELF, append=APPEND, plugin=log.plugin_args(), extra_args=MACHINE
        )
        dst_cfg = VmConfig("dst", RAM_MIB, Role.DESTINATION, kernel=GUEST_ELF, append=APPEND, extra_args=MACHINE)
        async with launch(src_cfg) as src, launch(dst_cfg) as dst:
            await wait_progress(src, 3, 60)
            ep = await attach(src.qmp, dst.qmp, src.ram_path, dst.ram_path)
            try:
                regions = [(r.gpa, r.length, r.offset) for r in ep.layout.regions]
                assert regions[-1] == (4 * GIB, (RAM_MIB << 20) - BELOW_4G, BELOW_4G), regions
                migration = Migration(
                    ep,
                    [VcpuTracker(log)],
                    dst.migration_uri(),
                    MigrationOptions(verify=True),
                )
                rep = await migration.run()
            finally:
                ep.sink.close()
            assert rep.status == "completed", rep.error
            assert rep.verified is True and rep.mismatched_pages == []
            # Rounds after the first found the guest's stores above 4 GiB, not only what round 0 copied.
            assert sum(r.sent_pages for r in rep.rounds[1:]) > 1000, rep.rounds
            assert log.unresolved == 0

            await dst.qmp.execute("stop")
            ram = np.memmap(dst.ram_path, np.uint8, mode="r")
            result = check_guest_ram(ram, regions=pc_regions(BELOW_4G, RAM_MIB << 20))
            assert result.ok, result.errors[:5]
