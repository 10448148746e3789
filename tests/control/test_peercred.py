"""Only the owner may connect: a process of another uid is refused by SO_PEERCRED even where
the file modes have been opened for it, and by the modes where they have not."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from orchestrator.control.commands import Context
from orchestrator.control.registry import Migrations
from orchestrator.control.server import ControlServer

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="dropping to a second uid needs root"),
]
NOBODY = 65534

#: Connect as `uid` (dropped to with setuid first unless it is ours), print what the server
#: sent before hanging up, or the error the connect met.
CHILD = """
import os, socket, sys
path, uid = sys.argv[1], int(sys.argv[2])
if uid != os.geteuid():
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
try:
    s.connect(path)
except OSError as exc:
    print("connect:", type(exc).__name__)
    sys.exit()
data = b""
while b"\\n" not in data and (chunk := s.recv(4096)):
    data += chunk
print("got:", data.decode().strip() or "nothing")
"""


async def connect_as(path: Path, uid: int) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(path), str(uid), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    return out.decode().strip()


def open_the_modes(short_dir: Path, path: Path) -> None:
    """What a careless setup could do: every directory on the way enterable, the socket writable."""
    for d in (short_dir, path.parent):
        d.chmod(0o711)
    path.chmod(0o666)


async def test_another_uid_is_refused_by_its_credentials(short_dir: Path) -> None:
    path = short_dir / "c" / "q.sock"
    async with ControlServer(path, Context(Migrations())) as server:
        open_the_modes(short_dir, path)
        assert await connect_as(path, NOBODY) == "got: nothing"  # connected, then hung up on
        assert server.refused == [NOBODY]
        # negative control: the owner, through the very same path and modes, is greeted
        assert (await connect_as(path, os.geteuid())).startswith('got: {"QMP": ')
        assert server.refused == [NOBODY]


async def test_with_the_modes_as_made_another_uid_cannot_even_connect(short_dir: Path) -> None:
    path = short_dir / "c" / "q.sock"
    short_dir.chmod(0o711)  # the test's own directory aside, the modes are the server's
    async with ControlServer(path, Context(Migrations())) as server:
        assert await connect_as(path, NOBODY) == "connect: PermissionError"
        assert server.refused == []  # the kernel refused before the server saw it
