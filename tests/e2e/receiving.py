"""A `receive` process on loopback for end-to-end tests, killed and reaped on exit."""

from __future__ import annotations

import asyncio
import re
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from .conftest import REPO


def free_port() -> int:
    """A loopback port nobody listens on now (for QEMU's own migration stream)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def receiver(ram: Path, token_file: Path, *more: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """`receive --once` into `ram` on a free loopback port; yields the process and its
    HOST:PORT once it listens."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator",
        "receive",
        "--listen",
        "127.0.0.1:0",
        "--ram",
        str(ram),
        "--token-file",
        str(token_file),
        "--once",
        *more,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        first = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        where = re.search(r"receiving on (\S+)", first)
        assert where, first
        yield proc, where.group(1)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
