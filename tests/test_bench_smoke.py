"""`python -m bench --quick` still runs every suite and writes results of the documented shape,
so the benchmarks cannot rot unnoticed. Figures are not checked: timing belongs to the bench."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.e2e import ROWS
from orchestrator.lab.launcher import default_qemu, qemu_version

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
MIGRATION_METRICS = {"total_ms", "downtime_ms", "bytes_sent", "rounds", "converged", "guest_rate"}
MICRO = {"memcpy_gbps", "copy_gbps", "merge_gbps", "harvest_1tib_ms", "collect_16dev_dma_ms"}


def test_quick_bench_writes_json_and_table(tmp_path, capsys):
    if shutil.which(default_qemu()) is None:
        pytest.skip(f"{default_qemu()} is not installed (make fixtures installs it)")
    subprocess.run(["make", "-s", "fixtures"], cwd=REPO, check=True)

    assert main(["--quick", "--output", str(tmp_path)]) == 0

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["micro"].keys() >= MICRO
    assert [row["workload"] for row in results["e2e"]] == [r.name for r in ROWS]
    assert {row["qemu_version"] for row in results["e2e"]} == {".".join(map(str, qemu_version()))}
    for row in results["e2e"]:
        for contender in ("qemu", "orchestrator", "orchestrator_content"):
            assert row[contender].keys() >= MIGRATION_METRICS
            assert row[contender]["converged"] is True, (row["workload"], contender)
        assert MIGRATION_METRICS - {"converged"} <= row["ratio"].keys()
    table = (tmp_path / "results.md").read_text()
    assert "## Targets" in table and table in capsys.readouterr().out
