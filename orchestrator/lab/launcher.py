"""Start and always clean up QEMU processes for tests and the demo.

Each VM gets a private directory (mode 0700: QMP and migration sockets are control channels)
and a RAM file in shared memory (mode 0600: it is the guest's memory). Both, and the process,
are gone when the context manager exits, whether by return, exception or cancellation: the
process is killed and the files removed synchronously before anything is awaited, so a second
cancellation cannot leave either behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from orchestrator.qemu.errors import QemuExitedError, QmpConnectError, QmpDisconnectedError, QmpTimeoutError
from orchestrator.qemu.qmp import QmpSession

RAM_BACKEND_ID = "ram0"
#: The QEMU that VMs run unless their config names one: how tests, the demo and the bench are
#: pointed at another version, e.g. the QEMU 10.0 that `make qemu-10` unpacks under build/.
QEMU_ENV = "ORCHESTRATOR_QEMU"
_EXIT_GRACE_S = 2.0
_T = TypeVar("_T")


def default_qemu() -> str:
    return os.environ.get(QEMU_ENV) or "qemu-system-x86_64"


def qemu_version(binary: str | None = None) -> tuple[int, int, int]:
    """(major, minor, micro) that `binary --version` prints (default: `default_qemu()`)."""
    binary = binary or default_qemu()
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    if m is None:
        raise ValueError(f"{binary} --version printed no version: {out[:200]!r}")
    return int(m[1]), int(m[2]), int(m[3])


class Role(enum.Enum):
    SOURCE = "source"
    #: Started with `-incoming defer`: waits for `migrate-incoming`, never runs on its own.
    DESTINATION = "destination"


class SerialMode(enum.Enum):
    #: The guest's COM1 goes to a file in the private directory (`QemuVm.serial_path`).
    FILE = "file"
    #: The guest's COM1 is QEMU's stdout (`QemuVm.serial`); the caller must keep reading it,
    #: or the guest stalls once the pipe is full.
    PIPE = "pipe"


@dataclass(frozen=True)
class VmConfig:
    name: str
    ram_mib: int = 256
    role: Role = Role.SOURCE
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    #: The `-plugin` value, e.g. "path/libx.so,arg=value".
    plugin: str | None = None
    #: Appended verbatim; QEMU merges repeated `-machine` options, so this can add machine
    #: properties too.
    extra_args: tuple[str, ...] = ()
    serial: SerialMode = SerialMode.FILE
    #: Only for exercising the layout checks; migration needs share=on.
    share: bool = True
    ram_dir: Path = Path("/dev/shm")
    qemu_binary: str = field(default_factory=default_qemu)
    #: "tcg" (the default: runs anywhere, and the only one TCG plugins work with) or "kvm".
    accel: str = "tcg"


@dataclass(frozen=True)
class VmPaths:
    workdir: Path
    ram: Path
    qmp: Path
    serial: Path
    stderr: Path

    @classmethod
    def inside(cls, workdir: Path, ram: Path) -> VmPaths:
        return cls(workdir, ram, workdir / "qmp.sock", workdir / "serial.log", workdir / "qemu.stderr")


def qemu_argv(config: VmConfig, paths: VmPaths) -> list[str]:
    """The full QEMU command line (an argument list: nothing goes through a shell)."""
    share = "on" if config.share else "off"
    argv = [
        config.qemu_binary,
        "-name",
        config.name,
        "-nodefaults",
        "-nographic",
        "-machine",
        f"pc,memory-backend={RAM_BACKEND_ID}",
        "-m",
        f"{config.ram_mib}M",
        "-object",
        f"memory-backend-file,id={RAM_BACKEND_ID},size={config.ram_mib}M,mem-path={paths.ram},share={share}",
        "-accel",
        config.accel,
        "-smp",
        "1",
        "-qmp",
        f"unix:{paths.qmp},server=on,wait=off",
        "-serial",
        "stdio" if config.serial is SerialMode.PIPE else f"file:{paths.serial}",
    ]
    if config.kernel is not None:
        argv += ["-kernel", str(config.kernel)]
    if config.initrd is not None:
        argv += ["-initrd", str(config.initrd)]
    if config.append is not None:
        argv += ["-append", config.append]
    if config.plugin is not None:
        argv += ["-plugin", config.plugin]
    if config.role is Role.DESTINATION:
        argv += ["-incoming", "defer"]
    return argv + list(config.extra_args)


class QemuVm:
    """A running QEMU started by `launch`; valid only inside its context manager."""

    def __init__(self, config: VmConfig, paths: VmPaths, process: asyncio.subprocess.Process) -> None:
        self.config = config
        self.paths = paths
        self.process = process
        self._qmp: QmpSession | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def qmp(self) -> QmpSession:
        if self._qmp is None:
            raise RuntimeError(f"QEMU '{self.name}' has no QMP session yet")
        return self._qmp

    @property
    def ram_path(self) -> Path:
        return self.paths.ram

    @property
    def ram_size(self) -> int:
        return self.config.ram_mib << 20

    @property
    def serial(self) -> asyncio.StreamReader:
        """The guest's serial output in `SerialMode.PIPE`."""
        if self.process.stdout is None:
            raise RuntimeError(f"QEMU '{self.name}' was not started with SerialMode.PIPE")
        return self.process.stdout

    def read_serial(self) -> str:
        """Everything the guest printed so far in `SerialMode.FILE`."""
        try:
            return self.paths.serial.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def migration_uri(self) -> str:
        """Where this VM, as a destination, should listen: a socket in its private directory."""
        return f"unix:{self.paths.workdir / 'migrate.sock'}"

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def exited_error(self) -> QemuExitedError:
        try:
            stderr = self.paths.stderr.read_text(errors="replace")
        except FileNotFoundError:
            stderr = ""
        return QemuExitedError(self.name, self.process.returncode or 0, stderr)

    def check_running(self) -> None:
        """Raise `QemuExitedError` (exit code and stderr) if QEMU is gone."""
        if self.process.returncode is not None:
            raise self.exited_error()

    async def wait_exit(self, timeout: float) -> int:
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            raise QmpTimeoutError(f"QEMU '{self.name}' still running after {timeout:g}s") from None

    async def _wait_for_qmp(self, timeout: float) -> None:
        # QEMU binds the socket (the file appears) a moment before it listens, so a refused
        # or failed connection is retried for as long as QEMU is alive and time remains.
        deadline = time.monotonic() + timeout
        while True:
            if self.process.returncode is not None:
                raise self.exited_error()
            try:
                self._qmp = await QmpSession.connect(self.paths.qmp)
                return
            except QmpConnectError as err:
                if time.monotonic() > deadline:
                    raise QmpTimeoutError(
                        f"QEMU '{self.name}' offered no QMP on {self.paths.qmp} within {timeout:g}s: {err}"
                    ) from err
            await asyncio.sleep(0.02)

    def _kill_and_remove(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        _remove_files(self.paths)

    async def _reap(self) -> None:
        if self._qmp is not None:
            await self._qmp.close()
        await self.process.wait()


async def guarded(awaitable: Awaitable[_T], *vms: QemuVm) -> _T:
    """Await `awaitable`, but if one of `vms` exits first, cancel it and raise that VM's
    `QemuExitedError`: a dead QEMU then reports its exit code and stderr instead of surfacing
    as a broken QMP connection or a timeout."""
    if not vms:
        raise ValueError("guarded() needs at least one VM to watch")
    work = asyncio.ensure_future(awaitable)
    exits = {asyncio.ensure_future(vm.process.wait()): vm for vm in vms}
    try:
        await asyncio.wait([work, *exits], return_when=asyncio.FIRST_COMPLETED)
        if work.done() and not isinstance(work.exception(), QmpDisconnectedError):
            return work.result()
        # A broken QMP connection is usually the first sign of a dying QEMU: give the
        # process a moment to be reaped so its exit code and stderr can be reported.
        await asyncio.wait(exits, timeout=_EXIT_GRACE_S, return_when=asyncio.FIRST_COMPLETED)
        for exited, vm in exits.items():
            if exited.done():
                raise vm.exited_error()
        return work.result()
    finally:
        futures: list[asyncio.Future[Any]] = [work, *exits]
        for future in futures:
            future.cancel()
        await asyncio.gather(*futures, return_exceptions=True)


@asynccontextmanager
async def launch(config: VmConfig, *, ready_timeout: float = 10.0) -> AsyncIterator[QemuVm]:
    """Start QEMU, connect QMP, yield the VM; on exit kill it and delete its files."""
    workdir = Path(tempfile.mkdtemp(prefix=f"qemu-{config.name}-"))  # mkdtemp: mode 0700
    fd, ram_name = tempfile.mkstemp(
        prefix=f"orchestrator-{config.name}-", suffix=".ram", dir=config.ram_dir
    )  # mkstemp: mode 0600
    paths = VmPaths.inside(workdir, Path(ram_name))
    vm: QemuVm | None = None
    try:
        # Sized here so the file is usable by the orchestrator the moment QEMU maps it.
        os.ftruncate(fd, config.ram_mib << 20)
        os.close(fd)
        fd = -1
        with open(paths.stderr, "wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *qemu_argv(config, paths),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if config.serial is SerialMode.PIPE else asyncio.subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # a terminal's Ctrl-C is ours to handle, not QEMU's
            )
        vm = QemuVm(config, paths, process)
        await vm._wait_for_qmp(ready_timeout)
        yield vm
    finally:
        if fd >= 0:
            os.close(fd)
        if vm is None:
            _remove_files(paths)
        else:
            vm._kill_and_remove()
            await vm._reap()


def _remove_files(paths: VmPaths) -> None:
    paths.ram.unlink(missing_ok=True)
    shutil.rmtree(paths.workdir, ignore_errors=True)
