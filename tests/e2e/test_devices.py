"""End to end with emulated VFIO devices DMA-ing into the guest while it migrates.

Device DMA is invisible to the vCPU tracker: only device dirty logging keeps the destination
bit-exact, and the negative control proves it. Faults injected mid-migration must still end
bit-exact, and a failed device transition must leave the source and its devices running.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from orchestrator.lab.demo import device_checks, guest_pair
from orchestrator.lab.fleet import FaultPlan
from orchestrator.lab.workload import dma_window
from orchestrator.migration.driver import MigrationOptions
from orchestrator.trackers import RecoveryPolicy
from orchestrator.vfio import State

from .conftest import REPO

pytestmark = pytest.mark.slow
MEM = 256 << 20
# No hang is injected with these options: a generous watchdog, so a loaded machine cannot
# turn a slow report into a tracker error.
OPTS = MigrationOptions(verify=True, recovery=RecoveryPolicy(timeout=10.0))


async def migrate(devices=("mlx5", "pds"), faults=(), tracking=True, workload="light", opts=OPTS):
    plans = [FaultPlan.parse(f) for f in faults]
    async with guest_pair(workload, MEM, "vcpu", list(devices), tracking, plans) as pair:
        rep = await pair.migration(opts).run()
        checks = device_checks(pair.fleet) if rep.status == "completed" else {}
        extra = {"window": dma_window(pair.src.read_serial())}
        if rep.status != "completed":
            extra["source_running"] = (await pair.src.qmp.execute("query-status"))["running"]
            extra["device_states"] = [d.src_model.mig_state for d in pair.fleet.devices]
            writes = [d.engine.state.writes for d in pair.fleet.devices]
            time.sleep(0.1)
            extra["dma_goes_on"] = all(
                d.engine.state.writes > w for d, w in zip(pair.fleet.devices, writes, strict=False)
            )
        return rep, checks, extra


def trackers(rep):
    return {t.name: t for t in rep.trackers}


async def test_devices_dma_during_precopy_bit_exact_and_state_migrated():
    rep, checks, _ = await migrate()
    assert rep.status == "completed" and rep.verified is True, rep.error
    assert set(checks) == {"mlx5-0", "pds-1"}
    for name, c in checks.items():
        assert c["state_migrated"], f"{name}: destination resumed from the source's final state"
        assert c["destination_mismatched_pages"] == 0, f"{name}: its DMA went on consistently"
    mlx5 = next(d for d in rep.devices if d.name == "mlx5-0")
    assert mlx5.precopy_bytes > 0 and mlx5.stop_copy_bytes > 0 and mlx5.state == "MIGRATED"
    pds = next(d for d in rep.devices if d.name == "pds-1")
    assert pds.precopy_bytes == 0, "pds offers no PRE_COPY: everything moves at stop-copy"
    assert all(t.reports >= 2 and t.errors == 0 for t in rep.trackers)


async def test_negative_control_untracked_devices_corrupt_the_destination():
    rep, _, extra = await migrate(tracking=False)
    assert rep.status == "failed" and rep.verified is False
    lo, length = extra["window"]
    pages = np.array(rep.mismatched_pages) * 4096
    assert pages.size and ((pages >= lo) & (pages < lo + length)).all(), "only device DMA went unseen"
    assert extra["source_running"] and extra["dma_goes_on"]


def test_negative_control_exit_status_from_the_cli(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "demo",
            "--workload",
            "idle",
            "--no-device-tracking",
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rep = json.loads(out.read_text())
    assert rep["verified"] is False and rep["mismatched_pages"]


@pytest.mark.parametrize(
    "fault,device,expect",
    [
        ("report-eio-once", "mlx5-0", {"errors": 1, "restarts": 1}),
        ("report-eio-sticky", "mlx5-0", {"errors": 1, "restarts": 1}),
        ("report-hang", "pds-1", {"errors": 1}),
        ("start-e2big", "mlx5-0", {}),
        ("start-eopnotsupp", "pds-1", {}),
    ],
)
async def test_faults_mid_migration_still_bit_exact(fault, device, expect):
    opts = MigrationOptions(
        verify=True,
        recovery=RecoveryPolicy(timeout=1.0, backoff_initial=0.0),
        downtime_limit_ms=0.5,
        max_rounds=5,
        on_limit="force",
    )
    rep, checks, _ = await migrate(faults=[f"{fault}@{device}:1"], workload="heavy", opts=opts)
    assert rep.status == "completed" and rep.verified is True, rep.error
    assert all(c["state_migrated"] and not c["destination_mismatched_pages"] for c in checks.values())
    t = trackers(rep)[device]
    assert t.errors >= 1 and t.fallbacks >= 1, t
    for key, value in expect.items():
        if key == "errors":
            assert getattr(t, key) >= value, t
        else:
            assert getattr(t, key) == value, t
    kinds = {e.kind for e in rep.events if e.tracker == device}
    assert kinds & {"report-error", "timeout", "start-fallback", "start-error"}, kinds


@pytest.mark.parametrize(
    "fault,why",
    [
        ("state-transition-error@mlx5-0:1", "STOP_COPY"),
        # a VF disabled mid-migration (mlx5 close_migratable) loses its migration streams:
        # that device cannot be migrated any more, so the migration must fail safely
        ("detach@mlx5-0:1", "ENODEV"),
    ],
)
async def test_unmigratable_device_fails_safely_with_everything_running(fault, why):
    rep, _, extra = await migrate(faults=[fault])
    assert rep.status == "failed" and why in rep.error, rep.error
    assert extra["source_running"], "the source VM runs"
    assert extra["dma_goes_on"], "its devices keep DMA-ing"
    assert all(t.state == "stopped" for t in rep.trackers)
    assert extra["device_states"] == [State.VFIO_DEVICE_STATE_RUNNING] * 2, "every device back to RUNNING"


async def test_mixed_models_in_one_migration():
    """mlx5-like with 1 range and 2 MiB pages, pds-like, and a device without DMA logging
    that reaches only a small window: that window is dirty every round, the final one too."""
    rep, checks, _ = await migrate(devices=("mlx5-1r2m", "pds", "nolog"), workload="light")
    assert rep.status == "completed" and rep.verified is True, rep.error
    t = trackers(rep)
    assert t["mlx5-1r2m-0"].page_size == 2 << 20
    assert t["nolog-2"].state == "stopped"
    assert t["nolog-2"].fallbacks == len(rep.rounds), "perma-dirty in every collect, the final one included"
    assert any(e.tracker == "nolog-2" and e.kind == "perma-dirty" for e in rep.events)
    assert rep.rounds[-1].dirty_pages >= 256, "the 1 MiB window is sent again at switchover"
    assert all(c["state_migrated"] and not c["destination_mismatched_pages"] for c in checks.values())
