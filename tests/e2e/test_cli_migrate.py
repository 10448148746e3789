"""`python -m orchestrator migrate` against QEMUs someone else started, as a management stack
uses it: it works, and bad input gets a clear error (exit 2) before anything changes."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from orchestrator.lab.demo import wait_progress
from orchestrator.lab.launcher import Role, VmConfig, launch
from orchestrator.lab.workload import GUEST_ELF, WORKLOADS

from .conftest import REPO

pytestmark = pytest.mark.slow


def mgmt(path: Path) -> tuple[str, ...]:
    """A second QMP monitor for the management stack (the launcher holds the first)."""
    return ("-qmp", f"unix:{path},server=on,wait=off")


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator",
        "migrate",
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 240)
    return proc.returncode, out.decode(), err.decode()


async def pair(tmp_path: Path, share: bool = True, **src_more):
    src_sock, dst_sock = tmp_path / "src.qmp", tmp_path / "dst.qmp"
    src = launch(
        VmConfig(
            "src",
            128,
            kernel=GUEST_ELF,
            append=WORKLOADS["light"].replace("32M", "16M"),
            share=share,
            extra_args=mgmt(src_sock),
            **src_more,
        )
    )
    dst = launch(VmConfig("dst", 128, Role.DESTINATION, kernel=GUEST_ELF, extra_args=mgmt(dst_sock)))
    return src, dst, src_sock, dst_sock


@pytest.mark.parametrize("tracker,kind", [(None, "write-watch"), ("content", "content-hash")])
async def test_migrate_command_end_to_end(tmp_path, tracker, kind):
    src_cm, dst_cm, s, d = await pair(tmp_path)
    async with src_cm as src, dst_cm as dst:
        await wait_progress(src, 1, 60)
        code, out, err = await run_cli(
            "--src-qmp",
            str(s),
            "--dst-qmp",
            str(d),
            "--src-ram",
            str(src.ram_path),
            "--dst-ram",
            str(dst.ram_path),
            "--verify",
            "--json",
            "-",
            *(("--tracker", tracker) if tracker else ()),
        )
        assert code == 0, out + err
        report = json.loads(out[out.index("{") :])
        assert report["status"] == "completed" and report["verified"] is True
        assert report["trackers"][0]["kind"] == kind
        assert (await dst.qmp.execute("query-status"))["status"] == "running"


async def test_wrong_socket_is_a_clear_error(tmp_path):
    code, _, err = await run_cli(
        "--src-qmp",
        str(tmp_path / "nope.sock"),
        "--dst-qmp",
        str(tmp_path / "x"),
        "--src-ram",
        "/dev/null",
        "--dst-ram",
        "/dev/null",
    )
    assert code == 2 and "nope.sock does not exist" in err


async def test_ram_file_that_is_not_the_guests(tmp_path):
    src_cm, dst_cm, s, d = await pair(tmp_path)
    wrong = tmp_path / "wrong.ram"
    wrong.write_bytes(bytes(4096))
    async with src_cm as src, dst_cm as dst:
        code, _, err = await run_cli(
            "--src-qmp", str(s), "--dst-qmp", str(d), "--src-ram", str(wrong), "--dst-ram", str(dst.ram_path)
        )
        assert code == 2 and f"source RAM file {wrong} is not the file QEMU maps" in err
        assert (await src.qmp.execute("query-status"))["running"], "nothing changed"
        assert (await src.qmp.query_migrate()).get("status") in (None, "none")


async def test_ram_that_is_not_shared(tmp_path):
    src_cm, dst_cm, s, d = await pair(tmp_path, share=False)
    async with src_cm as src, dst_cm as dst:
        code, _, err = await run_cli(
            "--src-qmp", str(s), "--dst-qmp", str(d), "--src-ram", str(src.ram_path), "--dst-ram", str(dst.ram_path)
        )
        assert code == 2 and "is not shared (share=off)" in err


class FakeQemu:
    """A QMP endpoint of a QEMU that lacks x-ignore-shared: enough protocol to be asked."""

    def __init__(self, path: Path, status: str):
        self.path, self.status, self.commands = path, status, []

    async def __aenter__(self):
        self.server = await asyncio.start_unix_server(self.serve, path=str(self.path))
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()

    async def serve(self, reader, writer):
        greeting = {
            "QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}, "capabilities": []}
        }
        writer.write(json.dumps(greeting).encode() + b"\r\n")
        buf, decoder = "", json.JSONDecoder()
        while chunk := await reader.read(4096):  # QMP messages need not end in a newline
            buf += chunk.decode()
            while buf.strip():
                try:
                    msg, end = decoder.raw_decode(buf.lstrip())
                except json.JSONDecodeError:
                    break
                buf = buf.lstrip()[end:]
                await self.answer(msg, writer)

    async def answer(self, msg, writer):
        self.commands.append(msg["execute"])
        ret = {
            "query-status": {"status": self.status, "running": self.status == "running", "singlestep": False},
            "query-migrate-capabilities": [
                {"capability": "events", "state": False},
                {"capability": "pause-before-switchover", "state": False},
            ],
        }.get(msg["execute"], {})
        reply = {"return": ret, **({"id": msg["id"]} if "id" in msg else {})}
        writer.write(json.dumps(reply).encode() + b"\r\n")
        await writer.drain()


async def test_qemu_without_the_needed_capabilities(tmp_path):
    async with FakeQemu(tmp_path / "s.sock", "running") as s, FakeQemu(tmp_path / "d.sock", "inmigrate") as d:
        code, _, err = await run_cli(
            "--src-qmp", str(s.path), "--dst-qmp", str(d.path), "--src-ram", "/dev/null", "--dst-ram", "/dev/null"
        )
        assert code == 2 and "lacks migration capabilities ['x-ignore-shared']" in err
        changing = {"migrate-set-capabilities", "migrate", "migrate-incoming", "stop", "cont"}
        assert not changing & set(s.commands + d.commands), "nothing was changed"


async def test_embedding_example(tmp_path):
    sys.path.insert(0, str(REPO / "examples"))
    try:
        from migrate_two_vms import migrate
    finally:
        sys.path.pop(0)
    src_cm, dst_cm, s, d = await pair(tmp_path)
    async with src_cm as src, dst_cm as dst:
        await wait_progress(src, 1, 60)
        report = await migrate(s, d, src.ram_path, dst.ram_path)
        assert report.ok and report.verified is True, report.error


async def test_migrate_with_the_vcpu_plugin_log(tmp_path):
    """`vcpu-log` makes the log and names the -plugin argument; migrate reads it."""
    log = Path("/dev/shm") / f"orchestrator-test-{tmp_path.name}.log"
    made = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator",
        "vcpu-log",
        str(log),
        "--mem",
        "128M",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await made.communicate()
    try:
        assert made.returncode == 0 and out.decode().startswith("-plugin ")
        src_cm, dst_cm, s, d = await pair(tmp_path, plugin=out.decode().split()[1])
        async with src_cm as src, dst_cm as dst:
            await wait_progress(src, 1, 60)
            code, out, err = await run_cli(
                "--src-qmp",
                str(s),
                "--dst-qmp",
                str(d),
                "--src-ram",
                str(src.ram_path),
                "--dst-ram",
                str(dst.ram_path),
                "--verify",
                "--json",
                "-",
                "--tracker",
                "vcpu",
                "--vcpu-log",
                str(log),
            )
            assert code == 0, out + err
            assert json.loads(out[out.index("{") :])["trackers"][0]["kind"] == "vcpu-plugin"
    finally:
        log.unlink(missing_ok=True)


async def test_write_watch_asked_for_by_name_and_refused_is_an_error(tmp_path):
    from orchestrator.lab.launcher import default_qemu
    from orchestrator.uapi import ptrace as P
    from tests.writewatch.filters import exec_wrapper, on_syscall

    wrapper = exec_wrapper(tmp_path, on_syscall(P.SYS_userfaultfd, P.SECCOMP_RET_KILL_PROCESS), default_qemu())
    src_cm, dst_cm, s, d = await pair(tmp_path, qemu_binary=str(wrapper))
    async with src_cm as src, dst_cm as dst:
        await wait_progress(src, 1, 60)
        args = (
            "--src-qmp",
            str(s),
            "--dst-qmp",
            str(d),
            "--src-ram",
            str(src.ram_path),
            "--dst-ram",
            str(dst.ram_path),
        )
        code, _, err = await run_cli(*args, "--tracker", "writewatch")
        assert code == 2 and "write-watch refused (seccomp-forbids)" in err and "userfaultfd" in err
        assert (await src.qmp.execute("query-status"))["running"], "nothing changed"
        assert (await src.qmp.query_migrate()).get("status") in (None, "none")
        code, out, err = await run_cli(*args, "--verify")  # not asked for by name: content hashing
        assert code == 0 and "falling back to content hashing" in out, out + err
