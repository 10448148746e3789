"""`orchestrator probe` against a real QEMU running the fixture guest (slow): its harvests
follow the workload's write rate (light: a 32 MiB sweep at 32 MiB/s) and an idle guest's are
near zero (the negative control); the VM is left as it was, and a probe stopped by SIGINT
still closes its trace and unregisters, so the next probe can watch the same QEMU."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import pytest

from orchestrator.experiments.trace import TraceKind, read_trace
from orchestrator.experiments.workingset import working_set_of
from orchestrator.lab.demo import wait_progress
from orchestrator.lab.launcher import VmConfig, launch
from orchestrator.lab.workload import GUEST_ELF, WORKLOADS, parse_progress

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
REPO = Path(__file__).resolve().parents[2]
LIGHT_PAGES_PER_S = (32 << 20) // 4096
LIGHT_WSS_PAGES = (32 << 20) // 4096


def probe_argv(sock: Path, ram: Path, trace: Path, duration: float, period: float) -> list[str]:
    return [
        *(sys.executable, "-m", "orchestrator", "probe", "--qmp", str(sock), "--ram", str(ram)),
        *("--duration", str(duration), "--period", str(period), "--trace", str(trace)),
    ]


async def run_probe(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(), err.decode()


def guest(workload: str, sock: Path):
    return launch(
        VmConfig(
            "probed",
            128,
            kernel=GUEST_ELF,
            append=WORKLOADS[workload],
            extra_args=("-qmp", f"unix:{sock},server=on,wait=off"),
        )
    )


async def capabilities(vm) -> dict[str, bool]:
    return {c["capability"]: c["state"] for c in await vm.qmp.execute("query-migrate-capabilities")}


@pytest.mark.parametrize("workload", ["light", "idle"])
async def test_harvests_follow_the_workload(built, tmp_path: Path, workload: str) -> None:
    sock, trace_path = tmp_path / "mgmt.qmp", tmp_path / "probe.jsonl"
    async with guest(workload, sock) as vm:
        await wait_progress(vm, 1, 60)
        caps = await capabilities(vm)
        code, out, err = await run_probe(*probe_argv(sock, vm.ram_path, trace_path, 3.0, 0.5))
        assert code == 0, out + err
        trace = read_trace(trace_path)
        assert trace.header.kind is TraceKind.PROBE and trace.header.period_s == 0.5
        assert len(trace.harvests) == 6 and trace.lost == 0
        assert trace.end is not None and trace.end.report["interrupted"] is False
        per_s = [h.dirty_pages / h.interval_s for h in trace.harvests]
        curve = {p.periods: p for p in working_set_of(trace)}
        print(
            f"{workload}: pages/s per harvest {[round(r) for r in per_s]}; W(t) "
            + ", ".join(f"{p.window_s:g}s={p.mean_pages:.0f}" for p in curve.values())
        )
        if workload == "light":
            mean = sum(per_s) / len(per_s)
            assert 0.6 * LIGHT_PAGES_PER_S < mean < 1.4 * LIGHT_PAGES_PER_S, per_s
            # a sweep of its 32 MiB: the working set grows with t, then stays at the sweep's size
            assert curve[1].mean_pages < curve[2].mean_pages
            assert curve[6].mean_pages < 1.1 * LIGHT_WSS_PAGES
        else:
            assert max(h.dirty_pages for h in trace.harvests) < 64, "an idle guest writes (almost) nothing"
        # nothing changed in the VM: it runs, its capabilities are as before, no migration
        assert (await vm.qmp.execute("query-status"))["status"] == "running"
        assert await capabilities(vm) == caps
        assert (await vm.qmp.execute("query-migrate")).get("status") in (None, "none")


async def test_sigint_closes_the_trace_and_leaves_the_vm_watchable(built, tmp_path: Path) -> None:
    sock = tmp_path / "mgmt.qmp"
    async with guest("light", sock) as vm:
        await wait_progress(vm, 1, 60)
        argv = probe_argv(sock, vm.ram_path, tmp_path / "cut.jsonl", 60.0, 0.25)
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        assert proc.stdout is not None
        for _ in range(3):  # three harvests printed: it is watching
            await asyncio.wait_for(proc.stdout.readline(), 60)
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 1, err.decode()
        said = err.decode()
        assert f"the trace so far is kept in {tmp_path / 'cut.jsonl'}" in said and "is removed" not in said
        cut = read_trace(tmp_path / "cut.jsonl")
        assert len(cut.harvests) >= 3 and cut.end is not None and cut.end.report["interrupted"] is True
        before = len(parse_progress(vm.read_serial()))
        await wait_progress(vm, before + 1, 30)
        code, out, err = await run_probe(*probe_argv(sock, vm.ram_path, tmp_path / "again.jsonl", 1.0, 0.5))
        assert code == 0, out + err + "\n(the first probe's registration was left behind)"
