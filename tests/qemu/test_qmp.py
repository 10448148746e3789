"""QmpSession: connection errors that name the socket, typed command errors, the event log."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestrator.lab.launcher import QemuVm, VmConfig, launch
from orchestrator.qemu import choreography
from orchestrator.qemu.errors import (
    MigrationError,
    QmpCommandError,
    QmpConnectError,
    QmpTimeoutError,
)
from orchestrator.qemu.qmp import QmpSession


async def test_missing_socket_is_named(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    with pytest.raises(QmpConnectError, match=f"^QMP socket {path} does not exist$"):
        await QmpSession.connect(path)


async def test_a_regular_file_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    path.write_text("")
    with pytest.raises(QmpConnectError, match=f"^QMP socket {path} is not a unix socket$"):
        await QmpSession.connect(path)


async def test_refused_connection_is_named(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    with socket.socket(socket.AF_UNIX) as bound_not_listening:
        bound_not_listening.bind(str(path))
        with pytest.raises(QmpConnectError, match=f"QMP socket {path} refused the connection"):
            await QmpSession.connect(path)


async def _serve(path: Path, greeting: bytes) -> asyncio.AbstractServer:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        await writer.drain()
        await reader.read()  # hold the connection open until the client leaves
        writer.close()

    return await asyncio.start_unix_server(handle, path=str(path))


async def test_a_silent_socket_is_not_qmp(tmp_path: Path) -> None:
    path = tmp_path / "serial.sock"
    async with await _serve(path, b""):
        with pytest.raises(QmpConnectError, match=f"QMP socket {path} sent no QMP greeting within 0.3s"):
            await QmpSession.connect(path, timeout=0.3)


async def test_a_socket_speaking_something_else_is_not_qmp(tmp_path: Path) -> None:
    path = tmp_path / "serial.sock"
    async with await _serve(path, b'{"hello": "world"}\r\n'):
        with pytest.raises(QmpConnectError, match=f"QMP socket {path} does not speak QMP"):
            await QmpSession.connect(path)


@pytest.fixture
async def vm(qemu_available: None) -> AsyncIterator[QemuVm]:
    async with launch(VmConfig("qmp", ram_mib=64)) as vm:
        yield vm


@pytest.mark.slow
async def test_command_errors_are_typed(vm: QemuVm) -> None:
    with pytest.raises(QmpCommandError, match="QMP command 'no-such-command' failed: CommandNotFound") as err:
        await vm.qmp.execute("no-such-command")
    assert err.value.error_class == "CommandNotFound"
    with pytest.raises(QmpCommandError, match="'migrate-continue' failed: GenericError"):
        await vm.qmp.execute("migrate-continue", state="pre-switchover")


@pytest.mark.slow
async def test_events_are_logged_with_receipt_times(vm: QemuVm) -> None:
    qmp = vm.qmp
    await qmp.execute("stop")
    await qmp.execute("cont")
    # Already received events are found without waiting.
    stop = await qmp.wait_event("STOP", timeout=5)
    resume = await qmp.wait_event("RESUME", timeout=5)
    assert stop.received_ns < resume.received_ns
    assert 0 < stop.qemu_time_us <= resume.qemu_time_us

    mark = qmp.mark()
    with pytest.raises(QmpTimeoutError, match=f"no event STOP from {qmp.socket_path} within 0.2s"):
        await qmp.wait_event("STOP", timeout=0.2, after=mark)
    waiter = asyncio.create_task(qmp.wait_event("STOP", timeout=5, after=mark))
    await qmp.execute("stop")
    assert (await waiter).received_ns > resume.received_ns
    assert qmp.last_event("STOP") is await waiter
    assert [e.name for e in qmp.events] == ["STOP", "RESUME", "STOP"]

    with pytest.raises(ValueError, match="event DEVICE_DELETED is not recorded"):
        await qmp.wait_event("DEVICE_DELETED")


@pytest.mark.slow
async def test_migration_to_nowhere_fails_with_qemus_reason(vm: QemuVm) -> None:
    missing = vm.paths.workdir / "nobody-listens.sock"
    await choreography.start(vm.qmp, f"unix:{missing}")
    failed = r"is 'failed' while waiting for \['completed'\]: .*No such file"
    with pytest.raises(MigrationError, match=failed):
        await vm.qmp.wait_migration_status({"completed"}, timeout=10)
    # Cancelling a failed migration changes nothing and the guest keeps running.
    assert await choreography.cancel(vm.qmp) == "failed"
    assert (await vm.qmp.execute("query-status"))["running"]


@pytest.mark.slow
async def test_waiting_for_a_status_that_never_comes_times_out(vm: QemuVm) -> None:
    with pytest.raises(QmpTimeoutError, match=r"still 'none' after 0.2s; waited for \['active'\]"):
        await vm.qmp.wait_migration_status({"active"}, timeout=0.2)


@pytest.mark.slow
async def test_pre_switchover_wait_names_a_migration_that_failed(vm: QemuVm) -> None:
    """The wait follows MIGRATION events (the choreography turns `events` on): a migration
    that fails first ends it at once, with QEMU's reason."""
    caps = [{"capability": c, "state": True} for c in ("events", "pause-before-switchover")]
    await vm.qmp.execute("migrate-set-capabilities", capabilities=caps)
    mark = await choreography.start(vm.qmp, f"unix:{vm.paths.workdir / 'nobody-listens.sock'}")
    with pytest.raises(MigrationError, match=r"migration failed before switchover: .*No such file"):
        await choreography.wait_pre_switchover(vm.qmp, timeout=10, after=mark)
    assert (await vm.qmp.execute("query-status"))["running"]
