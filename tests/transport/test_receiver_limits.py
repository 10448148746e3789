"""A real `receive` process under 200 idle, unauthenticated connections: its memory stays
bounded and a real sender still gets in while they are open.

Bound: 32 MiB over the receiver's own baseline. Before authentication a connection holds an
8 KiB receive buffer and a few asyncio objects (about 20 KiB in all), and at most
`MAX_PENDING` of them are kept (the oldest is dropped for a newer one): about 3 MiB. The
receiver used to give each connection its 4 MiB frame buffer at once, which is 32 MiB after
eight connections.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator.dirty.memory import MemoryLayout
from orchestrator.transport.auth import load_token, write_token
from orchestrator.transport.endpoint import parse_endpoint
from orchestrator.transport.protocol import HEADER, VERSION, Kind
from orchestrator.transport.receiver import MAX_PENDING
from orchestrator.transport.tcp import TcpSink

from .conftest import FAST, NPAGES, PAGE, ram

REPO = Path(__file__).resolve().parents[2]
IDLE = 200
BOUND = 32 << 20

pytestmark = pytest.mark.timeout(120)


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss, hwm = (int(re.search(rf"^{key}:\s+(\d+) kB", status, re.M).group(1)) << 10 for key in ("VmRSS", "VmHWM"))
    return rss, hwm


def sockets(pid: int) -> int:
    return sum(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:") for fd in os.listdir(f"/proc/{pid}/fd"))


async def settled(pid: int) -> int:
    """The receiver's socket count once it has stopped changing for half a second."""
    last, same = -1, 0
    while same < 5:
        await asyncio.sleep(0.1)
        now = sockets(pid)
        same, last = (same + 1, now) if now == last else (0, now)
    return last


async def test_idle_unauthenticated_connections_cost_little_and_never_lock_out_a_sender(tmp_path):
    dst = ram(tmp_path / "dst")
    token_file = tmp_path / "token"
    write_token(token_file)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator",
        "receive",
        "--listen",
        "127.0.0.1:0",
        "--ram",
        str(dst),
        "--token-file",
        str(token_file),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    idle: list[socket.socket] = []
    try:
        where = parse_endpoint(re.search(r"receiving on (\S+)", (await proc.stdout.readline()).decode()).group(1))
        listening = await settled(proc.pid)  # the listener and the event loop's self-pipe
        base_rss, base_hwm = memory(proc.pid)
        for _ in range(IDLE):
            s = socket.create_connection((where.host, where.port))
            s.sendall(HEADER.pack(b"OP", VERSION, Kind.HELLO, 50, 0)[:10])  # half a HELLO header, then nothing
            idle.append(s)
        assert await settled(proc.pid) == listening + MAX_PENDING, "the oldest idle connections were dropped"
        rss, hwm = memory(proc.pid)
        print(
            f"receiver RSS {base_rss >> 20} MiB idle, {rss >> 20} MiB (peak {hwm >> 20} MiB)"
            f" with {IDLE} idle connections"
        )
        assert rss - base_rss < BOUND and hwm - base_hwm < BOUND

        src = ram(tmp_path / "src", np.ones(NPAGES * PAGE, np.uint8))
        sink = await TcpSink.connect(MemoryLayout.flat(NPAGES * PAGE), str(src), where, load_token(token_file), FAST)
        try:
            assert await sink.send_round0() == (NPAGES, NPAGES * PAGE)
        finally:
            sink.close()
        assert np.array_equal(np.fromfile(dst, np.uint8), np.fromfile(src, np.uint8))
    finally:
        for s in idle:
            s.close()
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()
