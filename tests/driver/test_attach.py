"""`attach` against QEMU doubles: each refusal names the problem and changes nothing in
either QEMU (no command but queries was sent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.migration.attach import attach
from orchestrator.qemu.errors import LayoutError, MigrationError
from tests.fakes.qemu import FakeHost, FakeQemu, RunState, changes

MIB = 1 << 20


def ram(path: Path, size: int = 2 * MIB) -> Path:
    path.write_bytes(bytes(size))
    path.chmod(0o600)
    return path


async def test_two_good_qemus_are_attached(tmp_path: Path) -> None:
    host = FakeHost()
    src = FakeQemu(host, "src", RunState.RUNNING, ram(tmp_path / "src"))
    dst = FakeQemu(host, "dst", RunState.INMIGRATE, ram(tmp_path / "dst"))
    ep = await attach(src, dst, src.ram, dst.ram)
    try:
        assert ep.layout.npages == 2 * MIB // 4096 and ep.src is src
    finally:
        ep.sink.close()
    assert changes(host.journal) == []


@pytest.mark.parametrize(
    "problem,error,match",
    [
        ("capability missing", MigrationError, r"lacks migration capabilities \['pause-before-switchover'\]"),
        ("source postmigrate", MigrationError, "source QEMU is 'postmigrate', not running"),
        ("source shut down", MigrationError, "source QEMU is 'shutdown', not running"),
        ("destination running", MigrationError, "destination QEMU is 'running': start it with '-incoming defer'"),
        ("destination listening", MigrationError, r"already listens for a migration \(unix:/fake/in.sock\)"),
        ("layouts differ", LayoutError, "different RAM layouts: 0x0\\+0x200000 vs 0x0\\+0x400000"),
        ("wrong source file", LayoutError, "is not the file QEMU maps"),
    ],
)
async def test_a_refusal_changes_nothing(tmp_path: Path, problem: str, error: type, match: str) -> None:
    host = FakeHost()
    src_state = {"source postmigrate": RunState.POSTMIGRATE, "source shut down": RunState.SHUTDOWN}.get(
        problem, RunState.RUNNING
    )
    capabilities = ("x-ignore-shared", "events") if problem == "capability missing" else None
    src = FakeQemu(
        host, "src", src_state, ram(tmp_path / "src"), **({"capabilities": capabilities} if capabilities else {})
    )
    dst = FakeQemu(
        host,
        "dst",
        RunState.RUNNING if problem == "destination running" else RunState.INMIGRATE,
        ram(tmp_path / "dst", 4 * MIB if problem == "layouts differ" else 2 * MIB),
        incoming="unix:/fake/in.sock" if problem == "destination listening" else None,
    )
    given = ram(tmp_path / "other") if problem == "wrong source file" else src.ram
    with pytest.raises(error, match=match):
        await attach(src, dst, given, dst.ram)
    assert changes(host.journal) == [], host.journal
    assert src.runstate is src_state and src.capabilities == dict.fromkeys(src.capabilities, False)
