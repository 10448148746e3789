"""The launcher: command line, private files, and cleanup on every way out."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import tempfile
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator.lab.launcher import (
    QEMU_ENV,
    QemuVm,
    Role,
    SerialMode,
    VmConfig,
    VmPaths,
    guarded,
    launch,
    qemu_argv,
    qemu_version,
)
from orchestrator.qemu.errors import QemuExitedError, QmpDisconnectedError

from .conftest import READY_LINE


def test_command_line() -> None:
    paths = VmPaths.inside(Path("/run/vm"), Path("/dev/shm/vm.ram"))
    config = VmConfig(
        "dst",
        ram_mib=512,
        role=Role.DESTINATION,
        kernel=Path("/k.elf"),
        append="rate=5",
        plugin="/p/libdirty.so,shm=x",
        extra_args=("-machine", "max-ram-below-4g=1G"),
        qemu_binary="/opt/qemu/bin/qemu-system-x86_64",
    )
    assert qemu_argv(config, paths) == [
        "/opt/qemu/bin/qemu-system-x86_64", "-name", "dst", "-nodefaults", "-nographic",
        "-machine", "pc,memory-backend=ram0", "-m", "512M",
        "-object", "memory-backend-file,id=ram0,size=512M,mem-path=/dev/shm/vm.ram,share=on",
        "-accel", "tcg", "-smp", "1",
        "-qmp", "unix:/run/vm/qmp.sock,server=on,wait=off",
        "-serial", "file:/run/vm/serial.log",
        "-kernel", "/k.elf", "-append", "rate=5", "-plugin", "/p/libdirty.so,shm=x",
        "-incoming", "defer",
        "-machine", "max-ram-below-4g=1G",
    ]  # fmt: skip
    piped = qemu_argv(replace(config, serial=SerialMode.PIPE, share=False, kernel=None), paths)
    assert "share=off" in piped[piped.index("-object") + 1]
    assert piped[piped.index("-serial") + 1] == "stdio"
    assert "-kernel" not in piped


def test_the_environment_picks_the_qemu_a_config_does_not_name(monkeypatch, tmp_path: Path) -> None:
    fake = tmp_path / "qemu"
    fake.write_text("#!/bin/sh\necho 'QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)'\n")
    fake.chmod(0o700)
    monkeypatch.setenv(QEMU_ENV, str(fake))
    assert VmConfig("vm").qemu_binary == str(fake)
    assert VmConfig("vm", qemu_binary="qemu-7").qemu_binary == "qemu-7"
    assert qemu_version() == (10, 0, 2)
    monkeypatch.delenv(QEMU_ENV)
    assert VmConfig("vm").qemu_binary == "qemu-system-x86_64"


def leftovers(name: str) -> list[Path]:
    return [
        *Path("/dev/shm").glob(f"orchestrator-{name}-*"),
        *Path(tempfile.gettempdir()).glob(f"qemu-{name}-*"),
    ]


def assert_gone(vm: QemuVm) -> None:
    assert vm.returncode is not None
    assert not vm.paths.ram.exists()
    assert not vm.paths.workdir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(vm.process.pid, 0)


def unique() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


slow = pytest.mark.slow


@slow
async def test_private_files_and_cleanup(qemu_available: None) -> None:
    async with launch(VmConfig(unique(), ram_mib=64)) as vm:
        ram = os.stat(vm.ram_path)
        assert vm.ram_path.parent == Path("/dev/shm")
        assert stat.S_IMODE(ram.st_mode) == 0o600 and ram.st_size == 64 << 20
        assert stat.S_IMODE(os.stat(vm.paths.workdir).st_mode) == 0o700
        assert vm.paths.qmp.parent == vm.paths.workdir
        assert vm.migration_uri() == f"unix:{vm.paths.workdir}/migrate.sock"
        vm.check_running()
    assert_gone(vm)


@slow
async def test_cleanup_on_exception(qemu_available: None) -> None:
    with pytest.raises(RuntimeError, match="caller failed"):
        async with launch(VmConfig(unique(), ram_mib=64)) as vm:
            raise RuntimeError("caller failed")
    assert_gone(vm)


@slow
async def test_cleanup_on_cancellation(qemu_available: None) -> None:
    started: asyncio.Future[QemuVm] = asyncio.get_running_loop().create_future()

    async def user() -> None:
        async with launch(VmConfig(unique(), ram_mib=64)) as vm:
            started.set_result(vm)
            await asyncio.Event().wait()

    task = asyncio.create_task(user())
    vm = await started
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_gone(vm)


@slow
async def test_qemu_refusing_to_start_reports_code_and_stderr(qemu_available: None) -> None:
    name = unique()
    expected = f"QEMU '{name}' exited unexpectedly with code 1: .*-bogus"
    with pytest.raises(QemuExitedError, match=expected) as err:
        async with launch(VmConfig(name, ram_mib=64, extra_args=("-bogus",))):
            pass
    assert err.value.returncode == 1
    assert leftovers(name) == []


@slow
async def test_qemu_dying_while_awaited_reports_its_exit(qemu_available: None) -> None:
    async with launch(VmConfig(unique(), ram_mib=64)) as vm:
        waiting = guarded(vm.qmp.wait_event("RESUME", timeout=30), vm)
        os.kill(vm.process.pid, signal.SIGKILL)
        with pytest.raises(QemuExitedError, match=f"QEMU '{vm.name}' exited unexpectedly with code -9"):
            await waiting
        with pytest.raises(QemuExitedError):
            vm.check_running()
        broken = f"QMP connection {vm.paths.qmp} broke during 'query-status'"
        with pytest.raises(QmpDisconnectedError, match=broken):
            await vm.qmp.execute("query-status")
    assert_gone(vm)


@slow
async def test_guarded_passes_results_through(qemu_available: None) -> None:
    async with launch(VmConfig(unique(), ram_mib=64)) as vm:
        assert (await guarded(vm.qmp.execute("query-status"), vm))["running"]


@slow
async def test_serial_pipe(halting_guest: VmConfig) -> None:
    async with launch(replace(halting_guest, serial=SerialMode.PIPE)) as vm:

        async def until_ready() -> bytes:
            seen = b""
            while not seen.endswith(READY_LINE):
                line = await vm.serial.readline()
                assert line, f"serial closed after {seen!r}"
                seen += line
            return seen

        # SeaBIOS prints its banner first; the guest's line ends the output.
        assert b"SeaBIOS" in await asyncio.wait_for(until_ready(), 20)
