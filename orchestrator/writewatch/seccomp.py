"""Vouching for a target's seccomp filters before a system call is injected into it.

A filter whose action for the injected call is to kill would kill QEMU, so the filters are
read (PTRACE_SECCOMP_GET_FILTER, the target stopped) and run here, in a classic-BPF
evaluator of the subset seccomp accepts, on the exact `seccomp_data` of each call. The
verdict is the most restrictive action of all filters, as the kernel takes it.
"""

from __future__ import annotations

import ctypes
import enum
import errno
from collections.abc import Sequence
from dataclasses import dataclass

from orchestrator.uapi import ptrace as P
from orchestrator.writewatch.errors import Refusal, WriteWatchError, WriteWatchRefused
from orchestrator.writewatch.inject import Injector, ptrace

Program = Sequence[tuple[int, int, int, int]]  # (code, jt, jf, k) per instruction

_DATA_SIZE = ctypes.sizeof(P.seccomp_data)
_U32 = 0xFFFF_FFFF


class Action(enum.Enum):
    ALLOW = "allow"
    LOG = "log"
    ERRNO = "errno"
    TRACE = "trace"
    USER_NOTIF = "user-notif"
    TRAP = "trap"
    KILL_THREAD = "kill-thread"
    KILL_PROCESS = "kill-process"


_ACTIONS = {
    P.SECCOMP_RET_ALLOW: Action.ALLOW,
    P.SECCOMP_RET_LOG: Action.LOG,
    P.SECCOMP_RET_ERRNO: Action.ERRNO,
    P.SECCOMP_RET_TRACE: Action.TRACE,
    P.SECCOMP_RET_USER_NOTIF: Action.USER_NOTIF,
    P.SECCOMP_RET_TRAP: Action.TRAP,
    P.SECCOMP_RET_KILL_THREAD: Action.KILL_THREAD,
    P.SECCOMP_RET_KILL_PROCESS: Action.KILL_PROCESS,
}


class Unverifiable(WriteWatchError):
    """The program uses something seccomp would have rejected or we do not model."""


def _signed32(v: int) -> int:
    return v - (1 << 32) if v >> 31 else v


def _alu(op: int, a: int, v: int) -> int:
    return {
        0x00: lambda: a + v,
        0x10: lambda: a - v,
        0x20: lambda: a * v,
        0x30: lambda: a // v,
        0x40: lambda: a | v,
        0x50: lambda: a & v,
        0x60: lambda: a << v if v < 32 else 0,
        0x70: lambda: a >> v if v < 32 else 0,
        0x90: lambda: a % v,
        0xA0: lambda: a ^ v,
    }[op]() & _U32


def run(program: Program, data: bytes) -> int:
    """The filter's 32-bit return value for `data` (a `struct seccomp_data`)."""
    a = x = 0
    mem = [0] * 16
    pc = 0
    while pc < len(program):
        code, jt, jf, k = program[pc]
        pc += 1
        cls = code & 0x07
        if cls in (0x00, 0x01):  # LD, LDX
            mode, size = code & 0xE0, code & 0x18
            if size != 0x00:
                raise Unverifiable(f"load of size {size:#x}")
            if mode == 0x00:
                v = k
            elif mode == 0x20 and cls == 0x00 and k % 4 == 0 and k + 4 <= _DATA_SIZE:
                v = int.from_bytes(data[k : k + 4], "little")
            elif mode == 0x60 and k < 16:
                v = mem[k]
            elif mode == 0x80:
                v = _DATA_SIZE
            else:
                raise Unverifiable(f"load mode {mode:#x} at {k:#x}")
            if cls == 0x00:
                a = v
            else:
                x = v
        elif cls in (0x02, 0x03):  # ST, STX
            if k >= 16:
                raise Unverifiable(f"store to scratch word {k}")
            mem[k] = a if cls == 0x02 else x
        elif cls == 0x04:  # ALU
            op = code & 0xF0
            v = x if code & 0x08 else k
            if op in (0x30, 0x90) and v == 0:
                return 0  # as the kernel's BPF: a division by zero ends the program with 0
            a = (-a & _U32) if op == 0x80 else _alu(op, a, v)
        elif cls == 0x05:  # JMP
            op = code & 0xF0
            if op == 0x00:
                pc += k
                continue
            v = x if code & 0x08 else k
            taken = {0x10: a == v, 0x20: a > v, 0x30: a >= v, 0x40: bool(a & v)}.get(op)
            if taken is None:
                raise Unverifiable(f"jump op {op:#x}")
            pc += jt if taken else jf
        elif cls == 0x06:  # RET
            src = code & 0x18
            return k if src == 0x00 else a if src == 0x10 else x
        else:  # MISC
            if code & 0xF8 == 0x00:
                x = a
            elif code & 0xF8 == 0x80:
                a = x
            else:
                raise Unverifiable(f"misc op {code:#x}")
    raise Unverifiable("program runs past its end")


def seccomp_data(nr: int, args: Sequence[int], ip: int) -> bytes:
    d = P.seccomp_data(nr=nr, arch=P.AUDIT_ARCH_X86_64, instruction_pointer=ip)
    for i, v in enumerate(args):
        d.args[i] = v & ((1 << 64) - 1)
    return bytes(d)


def verdict(programs: Sequence[Program], data: bytes) -> tuple[Action, int]:
    """The action every filter together takes (the most restrictive one), with its data."""
    best = P.SECCOMP_RET_ALLOW
    for prog in programs:
        ret = run(prog, data)
        if _signed32(ret & P.SECCOMP_RET_ACTION_FULL) < _signed32(best & P.SECCOMP_RET_ACTION_FULL):
            best = ret
    action = _ACTIONS.get(best & P.SECCOMP_RET_ACTION_FULL)
    if action is None:  # an unknown action is treated as kill-process by the kernel
        return Action.KILL_PROCESS, best & P.SECCOMP_RET_DATA
    return action, best & P.SECCOMP_RET_DATA


def status_fields(pid: int, tid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def read_filters(inj: Injector) -> list[Program]:
    """Every filter attached to the stopped thread, newest first."""
    programs: list[Program] = []
    while True:
        try:
            n = ptrace(P.PTRACE_SECCOMP_GET_FILTER, inj.tid, len(programs), 0)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return programs
            raise Unverifiable(f"the kernel will not show the filters ({exc.strerror})") from None
        buf = (P.sock_filter * n)()
        ptrace(P.PTRACE_SECCOMP_GET_FILTER, inj.tid, len(programs), ctypes.addressof(buf))
        programs.append([(i.code, i.jt, i.jf, i.k) for i in buf])


@dataclass(frozen=True)
class Call:
    nr: int
    args: tuple[int, ...]
    name: str


@dataclass
class SeccompCheck:
    """Vouches that each of `calls` is allowed in the stopped thread; `trust` lets a filter
    we cannot evaluate pass (the user's word), never one that we know denies or kills."""

    calls: Sequence[Call]
    trust: bool = False
    programs: list[Program] | None = None  # None: no filter, or not read yet
    pid: int = 0

    def __call__(self, inj: Injector) -> None:
        self.pid = inj.pid
        fields = status_fields(inj.pid, inj.tid)
        mode = int(fields.get("Seccomp", "0"))
        if mode == P.SECCOMP_MODE_DISABLED:
            return
        if mode == P.SECCOMP_MODE_STRICT:
            raise WriteWatchRefused(Refusal.SECCOMP_FORBIDS, f"process {inj.pid} runs in strict seccomp mode")
        try:
            self.programs = read_filters(inj)
            if len(self.programs) != int(fields.get("Seccomp_filters", len(self.programs))):
                raise Unverifiable(f"{len(self.programs)} filters read, the kernel counts {fields['Seccomp_filters']}")
            for call in self.calls:
                self.check(call, inj.saved.rip)
        except Unverifiable as exc:
            if self.trust:
                return
            raise WriteWatchRefused(
                Refusal.SECCOMP_UNVERIFIED,
                f"process {inj.pid} has a seccomp filter that cannot be checked here ({exc}); "
                "pass --trust-seccomp if you know it allows userfaultfd and close",
            ) from None

    def check(self, call: Call, ip: int) -> None:
        if self.programs is None:
            return
        action, data = verdict(self.programs, seccomp_data(call.nr, call.args, ip))
        if action in (Action.ALLOW, Action.LOG):
            return
        if action in (Action.TRACE, Action.USER_NOTIF) and self.trust:
            return
        what = f"{action.value}" + (f" (errno {data})" if action is Action.ERRNO else "")
        cause = Refusal.SECCOMP_UNVERIFIED if action in (Action.TRACE, Action.USER_NOTIF) else Refusal.SECCOMP_FORBIDS
        raise WriteWatchRefused(
            cause, f"the seccomp filter of process {self.pid} would answer {call.name}() with {what}"
        )
