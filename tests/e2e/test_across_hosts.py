"""Across hosts: two network namespaces joined by one veth pair stand for two machines.

The source QEMU and `migrate` run in one, the destination QEMU and `receive` in the other;
guest pages cross the veth as the authenticated page stream, QEMU's own state as its tcp
migration stream. The test creates the namespaces (private /30: 10.231.7.1 and .2, traffic
only between those two addresses) and deletes them at the end, whatever happens.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fixtures.guest.pattern import check_guest_ram
from orchestrator.lab.demo import run_demo, wait_progress
from orchestrator.lab.launcher import Role, VmConfig, default_qemu, launch
from orchestrator.lab.workload import GUEST_ELF, WORKLOADS, parse_progress
from orchestrator.migration.driver import MigrationOptions
from orchestrator.transport.auth import write_token

from .conftest import REPO

pytestmark = pytest.mark.slow

SRC_ADDR, DST_ADDR = "10.231.7.1", "10.231.7.2"
QEMU_PORT, RECEIVER_PORT = 4444, 4445


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@pytest.fixture
def namespaces():
    tag = str(os.getpid() % 100000)
    src, dst, veth = f"orch-src-{tag}", f"orch-dst-{tag}", f"orv{tag}"
    made = ip("netns", "add", src, check=False)
    if made.returncode:
        pytest.skip(f"cannot create network namespaces here (ip netns add: {made.stderr.strip()})")
    try:
        ip("netns", "add", dst)
        ip("link", "add", f"{veth}a", "netns", src, "type", "veth", "peer", "name", f"{veth}b", "netns", dst)
        for ns, dev, addr in ((src, f"{veth}a", SRC_ADDR), (dst, f"{veth}b", DST_ADDR)):
            ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield src, dst
    finally:
        for ns in (src, dst):
            ip("netns", "del", ns, check=False)


def inside(ns: str, tmp_path: Path) -> str:
    """A QEMU binary that starts in namespace `ns` (the launcher takes one program name)."""
    wrapper = tmp_path / f"qemu-in-{ns}"
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {ns} {default_qemu()} "$@"\n')
    wrapper.chmod(0o700)
    return str(wrapper)


async def orchestrator(ns: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        "ip",
        "netns",
        "exec",
        ns,
        sys.executable,
        "-m",
        "orchestrator",
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
    await proc.wait()


async def test_migrate_across_namespaces_bit_exact_guest_runs_on(namespaces, tmp_path):
    src_ns, dst_ns = namespaces
    token = tmp_path / "token"
    write_token(token)
    src_qmp, dst_qmp, report_path = tmp_path / "src.qmp", tmp_path / "dst.qmp", tmp_path / "report.json"
    append = WORKLOADS["light"].replace("32M", "16M")
    src_cfg = VmConfig(
        "src",
        128,
        kernel=GUEST_ELF,
        append=append,
        qemu_binary=inside(src_ns, tmp_path),
        extra_args=("-qmp", f"unix:{src_qmp},server=on,wait=off"),
    )
    dst_cfg = VmConfig(
        "dst",
        128,
        Role.DESTINATION,
        kernel=GUEST_ELF,
        qemu_binary=inside(dst_ns, tmp_path),
        extra_args=("-qmp", f"unix:{dst_qmp},server=on,wait=off"),
    )
    async with launch(src_cfg) as src, launch(dst_cfg) as dst:
        await wait_progress(src, 1, 60)
        receiver = await orchestrator(
            dst_ns,
            "receive",
            "--listen",
            f"{DST_ADDR}:{RECEIVER_PORT}",
            "--ram",
            str(dst.ram_path),
            "--token-file",
            str(token),
            "--once",
        )
        try:
            first = (await asyncio.wait_for(receiver.stdout.readline(), 30)).decode()
            assert f"receiving on {DST_ADDR}:{RECEIVER_PORT}" in first, first
            migrate = await orchestrator(
                src_ns,
                "migrate",
                "--src-qmp",
                str(src_qmp),
                "--dst-qmp",
                str(dst_qmp),
                "--src-ram",
                str(src.ram_path),
                "--dst-receiver",
                f"{DST_ADDR}:{RECEIVER_PORT}",
                "--token-file",
                str(token),
                "--uri",
                f"tcp:{DST_ADDR}:{QEMU_PORT}",
                "--verify",
                "--json",
                str(report_path),
            )
            try:
                out, _ = await asyncio.wait_for(migrate.communicate(), 240)
            finally:
                await stop(migrate)
            assert migrate.returncode == 0, out.decode()
            report = json.loads(report_path.read_text())
            assert report["status"] == "completed" and report["verified"] is True, report["error"]
            assert report["mismatched_pages"] == []
            received, _ = await asyncio.wait_for(receiver.communicate(), 30)
            assert receiver.returncode == 0 and b"ended after" in received, received.decode()
        finally:
            await stop(receiver)

        assert (await dst.qmp.execute("query-status"))["status"] == "running"
        assert (await src.qmp.execute("query-status"))["status"] == "postmigrate"
        n = len(parse_progress(dst.read_serial()))
        lines = await wait_progress(dst, n + 1, 30)
        assert lines[-1].ms > parse_progress(src.read_serial())[-1].ms, "the destination continues the guest"
        await dst.qmp.execute("stop")
        result = check_guest_ram(np.memmap(dst.ram_path, np.uint8, mode="r"))
        assert result.ok, result.errors[:5]


async def test_demo_over_the_tcp_transport():
    result = await run_demo("light", 128 << 20, "vcpu", MigrationOptions(verify=True), transport="tcp")
    rep = result.report
    assert rep.status == "completed" and rep.verified is True, rep.error
    assert result.dst_progress, "the guest runs on at the destination"
