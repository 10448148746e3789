"""`migrate` and `demo` as the processes a management stack runs: signals at each phase, QEMUs
that die, cancelled migrations and their retries, paused sources, and input checks. Each ends
with the guest where the exit status says, both QEMUs configured as they were, and nothing the
orchestrator made left behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from orchestrator.app.cli import EXIT_BAD_INPUT, EXIT_GUEST_LOST, EXIT_MIGRATION_FAILED, EXIT_OK
from orchestrator.lab.demo import wait_progress
from orchestrator.lab.launcher import Role, VmConfig, launch
from orchestrator.lab.workload import GUEST_ELF, WORKLOADS
from orchestrator.qemu.choreography import CAPABILITIES

from .conftest import REPO
from .test_cli_migrate import mgmt, pair

pytestmark = pytest.mark.slow

SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
#: A limit no round meets: precopy goes on until a signal, a death or a cap ends it.
NEVER = ("--downtime-limit", "0.001", "--max-rounds", "10000", "--max-time", "120")


class Cli:
    """One `python -m orchestrator` process with a private TMPDIR, so whatever it leaves
    behind is found there; its output is collected as it runs."""

    def __init__(self, tmp: Path, name: str = "cli") -> None:
        self.tmp = tmp / f"{name}-tmp"
        self.tmp.mkdir()
        self.out = ""
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None

    async def start(self, *args: str) -> Cli:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "orchestrator",
            *args,
            cwd=REPO,
            env={**os.environ, "TMPDIR": str(self.tmp)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self._reader = asyncio.ensure_future(self._read())
        return self

    async def _read(self) -> None:
        while line := await self.proc.stdout.readline():
            self.out += line.decode()

    async def wait_for(self, text: str, timeout: float = 60) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while text not in self.out:
            assert self.proc.returncode is None, f"exited before printing {text!r}:\n{self.out}"
            assert loop.time() < deadline, f"no {text!r} within {timeout}s:\n{self.out}"
            await asyncio.sleep(0.02)

    async def exit_code(self, timeout: float = 60) -> int:
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            raise AssertionError(f"still running after {timeout}s:\n{self.out}") from None
        await self._reader
        return code

    def left_behind(self) -> list[str]:
        return sorted(str(p) for p in self.tmp.iterdir())


#: What the demo puts in /dev/shm: both guests' RAM files and the vCPU plugin's log.
DEMO_SHM = ("orchestrator-src-", "orchestrator-dst-", "orchestrator-vcpu-")


def shm_ours() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(DEMO_SHM)}


async def capability_states(session) -> dict[str, bool]:
    return {
        c["capability"]: c["state"]
        for c in await session.execute("query-migrate-capabilities")
        if c["capability"] in CAPABILITIES
    }


def migrate_args(s: Path, d: Path, src, dst, *more: str) -> tuple[str, ...]:
    return (
        "migrate",
        "--src-qmp",
        str(s),
        "--dst-qmp",
        str(d),
        "--src-ram",
        str(src.ram_path),
        "--dst-ram",
        str(dst.ram_path),
        *more,
    )


def report_of(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
async def test_signal_in_precopy_cancels_and_the_destination_takes_a_retry(tmp_path, sig):
    src_cm, dst_cm, s, d = await pair(tmp_path)
    async with src_cm as src, dst_cm as dst:
        await wait_progress(src, 1, 60)
        before = await capability_states(src.qmp), await capability_states(dst.qmp)
        cli = await Cli(tmp_path).start(*migrate_args(s, d, src, dst, *NEVER))
        await cli.wait_for("round   2")
        cli.proc.send_signal(sig)
        assert await cli.exit_code() == EXIT_MIGRATION_FAILED, cli.out
        assert f"{sig.name}: stopping" in cli.out and "the guest runs on: source" in cli.out
        assert (await src.qmp.execute("query-status"))["status"] == "running"
        assert (await capability_states(src.qmp), await capability_states(dst.qmp)) == before
        assert (await dst.qmp.execute("query-status"))["status"] == "inmigrate"
        assert cli.left_behind() == []
        # The same destination takes the next attempt.
        retry = await Cli(tmp_path, "retry").start(*migrate_args(s, d, src, dst, "--verify"))
        assert await retry.exit_code(120) == EXIT_OK, retry.out
        assert (await dst.qmp.execute("query-status"))["status"] == "running"


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
@pytest.mark.parametrize("paused", [False, True], ids=["running", "paused"])
async def test_signal_at_switchover(tmp_path, sig, paused):
    """The signal lands while the source waits in pre-switchover (verification of 256 MiB
    keeps it there long enough to be seen): before migrate-continue the source gets the
    guest back, as it was; after it, the switchover is finished. The report says which."""
    src_cm = launch(
        VmConfig("src", 256, kernel=GUEST_ELF, append=WORKLOADS["light"], extra_args=mgmt(tmp_path / "s.qmp"))
    )
    dst_cm = launch(VmConfig("dst", 256, Role.DESTINATION, kernel=GUEST_ELF, extra_args=mgmt(tmp_path / "d.qmp")))
    async with src_cm as src, dst_cm as dst:
        await wait_progress(src, 1, 60)
        if paused:
            await src.qmp.execute("stop")
        before = await capability_states(src.qmp)
        report = tmp_path / "report.json"
        cli = await Cli(tmp_path).start(
            *migrate_args(tmp_path / "s.qmp", tmp_path / "d.qmp", src, dst, "--verify", "--json", str(report))
        )
        while (await src.qmp.query_migrate()).get("status") != "pre-switchover":
            assert cli.proc.returncode is None, cli.out
            await asyncio.sleep(0.001)
        cli.proc.send_signal(sig)
        code = await cli.exit_code()
        rep = report_of(report)
        # None: the signal came once the migration had ended (or the process had gone), and
        # changed nothing: the exit status is still the migration's.
        assert rep["interrupted"] in ("before migrate-continue", "after migrate-continue", None), cli.out
        if rep["interrupted"] == "before migrate-continue":
            assert code == EXIT_MIGRATION_FAILED and rep["guest"] == "source", cli.out
            assert (await src.qmp.execute("query-status"))["running"] is not paused
            assert await capability_states(src.qmp) == before
            assert "start a new destination (-incoming defer) to retry" in rep["error"]
        else:
            assert code == EXIT_OK and rep["status"] == "completed" and rep["guest"] == "destination", cli.out
            assert (await dst.qmp.execute("query-status"))["status"] == ("paused" if paused else "running")
        assert cli.left_behind() == []


@pytest.mark.parametrize("side", ["destination", "source"])
async def test_a_qemu_killed_in_precopy_is_noticed_at_once(tmp_path, side):
    src_cm, dst_cm, s, d = await pair(tmp_path)
    async with src_cm as src, dst_cm as dst:
        await wait_progress(src, 1, 60)
        cli = await Cli(tmp_path).start(*migrate_args(s, d, src, dst, *NEVER))
        await cli.wait_for("round   2")
        victim = dst if side == "destination" else src
        loop = asyncio.get_running_loop()
        killed = loop.time()
        victim.process.kill()
        code = await cli.exit_code(timeout=10)  # instead of running into the 120 s cap
        print(f"\n{side} killed -> orchestrator exited in {(loop.time() - killed) * 1e3:.0f} ms")
        assert f"the {side} QEMU ({s if side == 'source' else d}) closed its QMP connection" in cli.out
        if side == "destination":
            assert code == EXIT_MIGRATION_FAILED and "the guest runs on: source" in cli.out
            assert (await src.qmp.execute("query-status"))["status"] == "running"
        else:
            assert code == EXIT_GUEST_LOST and "the guest runs on: nowhere" in cli.out
        assert cli.left_behind() == []


async def test_a_paused_source_stays_paused_after_a_cap_cancels(tmp_path):
    src_cm, dst_cm, s, d = await pair(tmp_path)
    async with src_cm as src, dst_cm as dst:
        await wait_progress(src, 1, 60)
        await src.qmp.execute("stop")
        cli = await Cli(tmp_path).start(*migrate_args(s, d, src, dst, "--downtime-limit", "0.001", "--max-rounds", "2"))
        assert await cli.exit_code() == EXIT_MIGRATION_FAILED, cli.out
        assert "round cap 2 reached" in cli.out
        assert (await src.qmp.execute("query-status"))["status"] == "paused"


@pytest.mark.parametrize("transport", ["local", "tcp"])
@pytest.mark.parametrize("phase", ["launch", "precopy"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
async def test_signal_to_demo_leaves_nothing(tmp_path, sig, phase, transport):
    shm = shm_ours()
    cli = Cli(tmp_path)
    await cli.start(
        "demo", "--workload", "heavy", "--devices", "mlx5", "--transport", transport, "--tracker", "vcpu", *NEVER
    )
    if phase == "launch":
        await cli.wait_for("demo: heavy guest")  # printed just before the QEMUs start
    else:
        await cli.wait_for("round   1")
    cli.proc.send_signal(sig)
    assert await cli.exit_code() == EXIT_MIGRATION_FAILED, cli.out
    assert cli.left_behind() == []
    assert shm_ours() - shm == set(), "RAM files or the vCPU log left in /dev/shm"
    qemus = [p for p in Path("/proc").iterdir() if p.name.isdigit() and str(cli.tmp).encode() in _cmdline(p)]
    assert qemus == [], "QEMUs left running"


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


async def test_a_destination_that_already_listens_is_refused_before_anything_changes(tmp_path):
    src_cm = launch(
        VmConfig("src", 128, kernel=GUEST_ELF, append=WORKLOADS["light"], extra_args=mgmt(tmp_path / "s.qmp"))
    )
    dst_cm = launch(
        VmConfig(
            "dst",
            128,
            Role.DESTINATION,
            kernel=GUEST_ELF,
            extra_args=(*mgmt(tmp_path / "d.qmp"), "-incoming", "tcp:127.0.0.1:0"),
        )
    )
    async with src_cm as src, dst_cm as dst:
        before = await capability_states(src.qmp), await capability_states(dst.qmp)
        cli = await Cli(tmp_path).start(*migrate_args(tmp_path / "s.qmp", tmp_path / "d.qmp", src, dst))
        assert await cli.exit_code() == EXIT_BAD_INPUT
        assert "already listens for a migration (inet:127.0.0.1:" in cli.out and "'-incoming defer'" in cli.out
        assert (await capability_states(src.qmp), await capability_states(dst.qmp)) == before


@pytest.mark.parametrize("problem", ["world-readable", "foreign-owner", "not-vfio"])
async def test_input_that_would_expose_or_waste_is_refused(tmp_path, problem):
    src_cm, dst_cm, s, d = await pair(tmp_path)
    async with src_cm as src, dst_cm as dst:
        more: tuple[str, ...] = ()
        if problem == "world-readable":
            src.ram_path.chmod(0o644)
            needle = f"source RAM file {src.ram_path} is open to every local user (mode 0644)"
        elif problem == "foreign-owner":
            if os.geteuid() != 0:
                pytest.skip("giving a file to another user needs root")
            os.chown(dst.ram_path, 65534, -1)
            needle = f"destination RAM file {dst.ram_path} belongs to uid 65534"
        else:
            more = ("--vfio-device", "/dev/null")
            needle = "--vfio-device /dev/null offers no VFIO DMA logging"
        cli = await Cli(tmp_path).start(*migrate_args(s, d, src, dst, *more))
        assert await cli.exit_code() == EXIT_BAD_INPUT
        assert needle in cli.out
        assert (await src.qmp.query_migrate()).get("status") in (None, "none")
        assert (await src.qmp.execute("query-status"))["running"]


async def test_a_destination_that_dies_loading_the_state_gives_the_guest_back_to_the_source(tmp_path):
    """A destination that lacks one of the source's devices fails to load QEMU's stream
    after migrate-continue and exits without ever running the guest: the source runs it
    again."""
    src_cm = launch(
        VmConfig(
            "src",
            128,
            kernel=GUEST_ELF,
            append=WORKLOADS["light"],
            extra_args=(*mgmt(tmp_path / "s.qmp"), "-device", "virtio-rng-pci"),
        )
    )
    dst_cm = launch(VmConfig("dst", 128, Role.DESTINATION, kernel=GUEST_ELF, extra_args=mgmt(tmp_path / "d.qmp")))
    async with src_cm as src, dst_cm as dst:
        await wait_progress(src, 1, 60)
        report = tmp_path / "report.json"
        cli = await Cli(tmp_path).start(
            *migrate_args(tmp_path / "s.qmp", tmp_path / "d.qmp", src, dst, "--json", str(report))
        )
        assert await cli.exit_code() == EXIT_MIGRATION_FAILED, cli.out
        rep = report_of(report)
        assert rep["status"] == "failed" and rep["guest"] == "source", cli.out
        assert "the destination never ran the guest: the source runs again" in rep["decision"]
        assert await dst.wait_exit(10) != 0
        assert (await src.qmp.execute("query-status"))["status"] == "running"
        lines = len(await wait_progress(src, 0, 10))
        await wait_progress(src, lines, 30)  # and the guest goes on working there
        assert cli.left_behind() == []


async def test_a_paused_guest_migrates_and_stays_paused(tmp_path):
    src_cm, dst_cm, s, d = await pair(tmp_path)
    async with src_cm as src, dst_cm as dst:
        await wait_progress(src, 1, 60)
        await src.qmp.execute("stop")
        report = tmp_path / "report.json"
        cli = await Cli(tmp_path).start(*migrate_args(s, d, src, dst, "--verify", "--json", str(report)))
        assert await cli.exit_code() == EXIT_OK, cli.out
        rep = report_of(report)
        assert rep["status"] == "completed" and rep["guest"] == "destination" and rep["downtime_ms"] is None
        assert (await dst.qmp.execute("query-status"))["status"] == "paused"
        await dst.qmp.execute("cont")
        lines = len(await wait_progress(dst, 0, 30))
        await wait_progress(dst, lines, 30)
