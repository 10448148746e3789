"""The x86_64 ABI the syscall injector speaks: ptrace requests, `struct user_regs_struct`,
seccomp's filter program and data layouts, and the syscall numbers it injects or checks."""

from __future__ import annotations

import ctypes

from orchestrator.uapi.vfio import c_u32, c_u64

PTRACE_PEEKDATA = 2
PTRACE_CONT = 7
PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_SECCOMP_GET_FILTER = 0x420C
PTRACE_EVENT_STOP = 128

SYS_close = 3
SYS_tgkill = 234
SYS_userfaultfd = 323
SYS_pidfd_open = 434
SYS_pidfd_getfd = 438

#: The two bytes of the `syscall` instruction.
SYSCALL_INSN = b"\x0f\x05"


class user_regs_struct(ctypes.Structure):
    _fields_ = [
        (name, c_u64)
        for name in (
            "r15",
            "r14",
            "r13",
            "r12",
            "rbp",
            "rbx",
            "r11",
            "r10",
            "r9",
            "r8",
            "rax",
            "rcx",
            "rdx",
            "rsi",
            "rdi",
            "orig_rax",
            "rip",
            "cs",
            "eflags",
            "rsp",
            "ss",
            "fs_base",
            "gs_base",
            "ds",
            "es",
            "fs",
            "gs",
        )
    ]


# seccomp(2)
AUDIT_ARCH_X86_64 = 0xC000003E
SECCOMP_MODE_DISABLED, SECCOMP_MODE_STRICT, SECCOMP_MODE_FILTER = 0, 1, 2
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_KILL_THREAD = 0x00000000
SECCOMP_RET_TRAP = 0x00030000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_TRACE = 0x7FF00000
SECCOMP_RET_LOG = 0x7FFC0000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ACTION_FULL = 0xFFFF0000
SECCOMP_RET_DATA = 0x0000FFFF


class sock_filter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", c_u32)]


class seccomp_data(ctypes.Structure):
    _fields_ = [("nr", ctypes.c_int32), ("arch", c_u32), ("instruction_pointer", c_u64), ("args", c_u64 * 6)]
