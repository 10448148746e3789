"""Draw one plot of each kind from real runs on this machine (`make plots`):

- a report: the fixture guest's `heavy` workload at a 10 ms downtime limit, which does not
  converge alone, migrated with the auto-converge policy and the cgroup throttle (`demo --plot`);
- a trace's working-set curve W(t): `probe` watching a `hotcold` guest for 4 s (`plot TRACE`);
- a sweep: 240 simulations of three workloads over downtime limits and bandwidth caps
  (`sweep --plot`), total time against downtime with the Pareto front.

Everything goes to the directory given (default docs/plots): the PNGs, and the report, trace
and table they were drawn from. The commands are the documented ones, run as a user would.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

from orchestrator.lab.demo import wait_progress
from orchestrator.lab.launcher import VmConfig, launch
from orchestrator.lab.workload import GUEST_ELF, WORKLOADS

REPO = Path(__file__).resolve().parents[1]

SWEEP = """\
policy = "downtime"
search = "grid"
[[scenario]]
workload = "heavy"
mem = "256M"
[[scenario]]
workload = "hotcold"
mem = "256M"
[[scenario]]
workload = "sweep"
mem = "256M"
[grid]
downtime_limit_s = [0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3]
bandwidth_cap = ["250M", "500M", "1G", "2G", "4G", "8G", "16G", "32G"]
max_rounds = [30]
on_limit = ["force"]
"""


def orchestrator(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=REPO, check=True)


async def probe(out: Path, work: Path) -> None:
    sock, trace = work / "probe.qmp", out / "hotcold-probe.jsonl"
    config = VmConfig(
        "probed",
        256,
        kernel=GUEST_ELF,
        append=WORKLOADS["hotcold"],
        extra_args=("-qmp", f"unix:{sock},server=on,wait=off"),
    )
    async with launch(config) as vm:
        await wait_progress(vm, 5, 60)
        argv = ["probe", "--qmp", str(sock), "--ram", str(vm.ram_path), "--duration", "4", "--period", "0.1"]
        await asyncio.to_thread(orchestrator, *argv, "--trace", str(trace))
    orchestrator("plot", str(trace), "--out-dir", str(out))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "plots")
    out = parser.parse_args().out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    orchestrator(
        *("demo", "--workload", "heavy", "--devices", "none", "--no-verify", "--progress", "text"),
        *("--policy", "throttle", "--set", "inner=downtime", "--set", "inner.downtime_limit_s=0.01"),
        *("--set", "inner.max_rounds=30", "--trace", str(out / "heavy-throttled.jsonl")),
        *("--json", str(out / "heavy-throttled.json"), "--plot", str(out / "heavy-throttled.png")),
    )
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(probe(out, Path(tmp)))
        spec = Path(tmp) / "sweep.toml"
        spec.write_text(SWEEP)
        orchestrator("sweep", str(spec), "--out", str(out / "sweep.csv"), "--plot", str(out / "sweep.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
