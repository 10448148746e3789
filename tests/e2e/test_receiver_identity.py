"""A receiver pointed at the wrong RAM file (the right size) is refused before anything is
written: `migrate` exits 2 naming both files, both QEMUs are as they were (the source runs,
no capability changed, the destination still waits), and the wrong file keeps its bytes."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator.lab.demo import wait_progress
from orchestrator.lab.launcher import Role, VmConfig, launch
from orchestrator.lab.workload import GUEST_ELF, WORKLOADS
from orchestrator.transport.auth import write_token

from .conftest import REPO
from .receiving import free_port, receiver

pytestmark = pytest.mark.slow


async def capabilities(vm) -> list[dict]:
    return await vm.qmp.execute("query-migrate-capabilities")


async def test_receiver_on_the_wrong_file_is_refused_and_nothing_changes(tmp_path):
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
    wrong = Path("/dev/shm") / f"orchestrator-test-wrong-{tmp_path.name}.ram"
    content = np.random.default_rng(3).integers(0, 256, 128 << 20, dtype=np.uint8)
    content.tofile(wrong)
    wrong.chmod(0o600)
    token = tmp_path / "token"
    write_token(token)
    try:
        async with launch(src_cfg) as src, launch(dst_cfg) as dst:
            await wait_progress(src, 1, 60)
            caps = await capabilities(src), await capabilities(dst)
            async with receiver(wrong, token) as (_proc, where):
                migrate = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "orchestrator",
                    "migrate",
                    "--src-qmp",
                    str(s),
                    "--dst-qmp",
                    str(d),
                    "--src-ram",
                    str(src.ram_path),
                    "--dst-receiver",
                    where,
                    "--token-file",
                    str(token),
                    "--uri",
                    f"tcp:127.0.0.1:{free_port()}",
                    cwd=REPO,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                out, err = await asyncio.wait_for(migrate.communicate(), 120)
                assert migrate.returncode == 2, out.decode() + err.decode()
                assert f"serves {wrong}" in err.decode() and f"maps: {dst.ram_path}" in err.decode(), err.decode()
            assert (await src.qmp.execute("query-status"))["running"], "the source runs on"
            assert (await dst.qmp.execute("query-status"))["status"] == "inmigrate"
            assert (await capabilities(src), await capabilities(dst)) == caps, "no capability changed"
            assert (await src.qmp.query_migrate()).get("status") in (None, "none")
        assert np.array_equal(np.fromfile(wrong, np.uint8), content), "the wrong file is unchanged"
    finally:
        wrong.unlink(missing_ok=True)
