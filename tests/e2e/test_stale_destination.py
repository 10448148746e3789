"""A destination RAM file holding old data still ends up as the source's bytes, without
`--verify` to catch it: round 0 clears the destination instead of assuming it is zeroed.

The destination QEMU is started with `-incoming defer` and then its file gets 0xAA over the
upper three quarters of guest RAM, where the fixture guest never writes (its working set and
its own data lie below 18 MiB): as if the file had held another guest before. QEMU has not
run the guest yet, so this is the same as a file that held those bytes when QEMU opened it.
"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
import pytest

from fixtures.guest.pattern import check_guest_ram
from orchestrator.lab.demo import wait_progress
from orchestrator.lab.launcher import Role, VmConfig, launch
from orchestrator.lab.workload import GUEST_ELF, WORKLOADS
from orchestrator.transport.auth import write_token

from .conftest import REPO
from .receiving import free_port, receiver

pytestmark = pytest.mark.slow

MIB = 1 << 20
STALE = slice(32 * MIB, 128 * MIB)  # the guest runs in [2, 18) MiB


async def migrate(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator",
        "migrate",
        *args,
        "--json",
        "-",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 240)
    return proc.returncode, out.decode()


@pytest.mark.parametrize("through", ["local", "receive"])
async def test_stale_destination_file_ends_bit_exact_without_verify(tmp_path, through):
    s, d = tmp_path / "src.qmp", tmp_path / "dst.qmp"
    src_cfg = VmConfig(
        "src",
        128,
        kernel=GUEST_ELF,
        append=WORKLOADS["light"].replace("32M", "16M"),
        extra_args=("-qmp", f"unix:{s},server=on,wait=off"),
    )
    dst_cfg = VmConfig(
        "dst", 128, Role.DESTINATION, kernel=GUEST_ELF, extra_args=("-qmp", f"unix:{d},server=on,wait=off")
    )
    async with launch(src_cfg) as src, launch(dst_cfg) as dst:
        await wait_progress(src, 1, 60)
        held = np.memmap(dst.ram_path, np.uint8, mode="r+")
        held[STALE] = 0xAA
        held.flush()
        source = np.memmap(src.ram_path, np.uint8, mode="r")
        zero_pages = int((~source[STALE].reshape(-1, 4096).any(axis=1)).sum())
        assert zero_pages > 4000, "the source is zero where the destination holds old data"
        common = ("--src-qmp", str(s), "--dst-qmp", str(d), "--src-ram", str(src.ram_path))
        if through == "local":
            code, out = await migrate(*common, "--dst-ram", str(dst.ram_path))
        else:
            token = tmp_path / "token"
            write_token(token)
            async with receiver(dst.ram_path, token) as (proc, where):
                code, out = await migrate(
                    *common,
                    "--dst-receiver",
                    where,
                    "--token-file",
                    str(token),
                    "--uri",
                    f"tcp:127.0.0.1:{free_port()}",
                )
                await asyncio.wait_for(proc.wait(), 30)
        assert code == 0, out
        assert json.loads(out[out.index("{") :])["status"] == "completed"
        await dst.qmp.execute("stop")
        stale = int((held[STALE].reshape(-1, 4096) == 0xAA).all(axis=1).sum())
        assert stale == 0, f"{stale} pages still hold the destination's old data"
        assert np.array_equal(held[STALE], source[STALE])
        result = check_guest_ram(held)
        assert result.ok, result.errors[:5]
        del held, source
