"""Shared pieces of the real-QEMU tests: skipping without QEMU, and a guest that holds still.

A guest that keeps running (SeaBIOS idling, for one) writes RAM at any moment, so "the
destination's RAM equals what was copied" could not be checked exactly. The halting guest
prints one line on COM1 and then stops with interrupts off: after that line its RAM is frozen
on the source and stays frozen on the destination once it resumes.
"""

from __future__ import annotations

import asyncio
import shutil
import struct
import time
from pathlib import Path

import pytest

from orchestrator.lab.launcher import QemuVm, VmConfig, default_qemu

QEMU = default_qemu()
READY_LINE = b"ready\n"

_MB_MAGIC = 0x1BADB002
_MB_AOUT_KLUDGE = 1 << 16  # load addresses come from the header, not from an ELF
_LOAD = 0x100000
_HEADER_SIZE = 32


def _halt_kernel_image() -> bytes:
    code = b"\x66\xba\xf8\x03"  # mov dx, 0x3f8 (COM1 data port)
    for ch in READY_LINE:
        code += bytes([0xB0, ch, 0xEE])  # mov al, ch ; out dx, al
    code += b"\xfa\xf4\xeb\xfd"  # cli ; hlt ; jmp back to hlt
    header = struct.pack(
        "<III5I",
        _MB_MAGIC,
        _MB_AOUT_KLUDGE,
        -(_MB_MAGIC + _MB_AOUT_KLUDGE) & 0xFFFFFFFF,
        _LOAD,  # header_addr
        _LOAD,  # load_addr
        0,  # load_end_addr: the whole file
        0,  # bss_end_addr: no bss
        _LOAD + _HEADER_SIZE,  # entry_addr: the code right after this header
    )
    # Padded so QEMU's probe for a Linux header reads zeros, not past the end of the file.
    return (header + code).ljust(8192, b"\0")


@pytest.fixture(scope="session")
def qemu_available() -> None:
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed (Debian: apt-get install qemu-system-x86)")


@pytest.fixture(scope="session")
def halt_kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("guest") / "halt.mb"
    path.write_bytes(_halt_kernel_image())
    return path


@pytest.fixture
def halting_guest(qemu_available: None, halt_kernel: Path) -> VmConfig:
    """Source config of a 256 MiB guest that prints READY_LINE and halts."""
    return VmConfig("src", ram_mib=256, kernel=halt_kernel)


async def wait_serial(vm: QemuVm, text: str, timeout: float = 20.0) -> None:
    """Wait until the guest's serial file contains `text` (QEMU writes it as the guest prints)."""
    deadline = time.monotonic() + timeout
    while text not in vm.read_serial():
        vm.check_running()
        if time.monotonic() > deadline:
            raise AssertionError(f"guest '{vm.name}' did not print {text!r}: {vm.read_serial()!r}")
        await asyncio.sleep(0.02)
