"""Seccomp filters for the tests, installed for real: a small assembler and an exec wrapper
that puts a filter on a program (QEMU) before it starts."""

from __future__ import annotations

import ctypes
import os
import stat
import struct
import sys
from pathlib import Path

from orchestrator.uapi import ptrace as P

LD_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06
SYS_seccomp = 317
PR_SET_NO_NEW_PRIVS = 38


def insn(code: int, k: int, jt: int = 0, jf: int = 0) -> tuple[int, int, int, int]:
    return (code, jt, jf, k)


def on_syscall(nr: int, action: int) -> list[tuple[int, int, int, int]]:
    """`action` for syscall `nr`, allow everything else (after the arch check)."""
    return [
        insn(LD_ABS, 4),
        insn(JEQ_K, P.AUDIT_ARCH_X86_64, 1, 0),
        insn(RET_K, P.SECCOMP_RET_KILL_PROCESS),
        insn(LD_ABS, 0),
        insn(JEQ_K, nr, 0, 1),
        insn(RET_K, action),
        insn(RET_K, P.SECCOMP_RET_ALLOW),
    ]


def encode(program) -> bytes:
    return b"".join(struct.pack("<HBBI", code, jt, jf, k) for code, jt, jf, k in program)


def install(raw: bytes) -> None:
    """Put `raw` (encoded sock_filters) on this thread; seccomp(2) errors raise OSError."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(raw, len(raw))
    prog = struct.pack("<HxxxxxxQ", len(raw) // 8, ctypes.addressof(buf))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl")
    pbuf = ctypes.create_string_buffer(prog, len(prog))
    if libc.syscall(SYS_seccomp, 1, 0, pbuf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_WRAPPER = """#!{python}
import os, sys
sys.path.insert(0, {root!r})
from tests.writewatch.filters import install
install(bytes.fromhex({hexprog!r}))
os.execvp({target!r}, [{target!r}, *sys.argv[1:]])
"""


def exec_wrapper(where: Path, program, target: str) -> Path:
    """An executable that installs `program` on itself, then becomes `target` with its args."""
    root = str(Path(__file__).resolve().parents[2])
    path = where / "seccomp-exec"
    path.write_text(_WRAPPER.format(python=sys.executable, root=root, hexprog=encode(program).hex(), target=target))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path
