"""The seccomp verdict against the kernel itself: random filters are installed in a child,
which makes the call; what the kernel did must be what the evaluator said."""

import os
import resource
import signal

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from orchestrator.uapi import ptrace as P
from orchestrator.writewatch.inject import syscall
from orchestrator.writewatch.seccomp import Action, Unverifiable, run, seccomp_data, verdict

from .filters import RET_K, encode, insn, install

TARGET = 110  # getppid: ignores its arguments, so any may be passed
ERRNOS = st.integers(1, 200)
ACTIONS = st.one_of(
    st.sampled_from(
        [
            P.SECCOMP_RET_ALLOW,
            P.SECCOMP_RET_LOG,
            P.SECCOMP_RET_KILL_PROCESS,
            P.SECCOMP_RET_TRAP,
            P.SECCOMP_RET_TRACE,
            P.SECCOMP_RET_KILL_THREAD,
        ]
    ),
    ERRNOS.map(lambda e: P.SECCOMP_RET_ERRNO | e),
)
FIELDS = [0, 4, *range(16, 64, 4)]  # nr, arch, args (not the instruction pointer)


@st.composite
def bodies(draw):
    """A seccomp-valid program for TARGET: loads, ALU, forward jumps, returns."""
    n = draw(st.integers(1, 12))
    body = []
    for i in range(n):
        left = n - i  # instructions after this one, the final ALLOW included
        kind = draw(st.sampled_from(["ld", "alu", "jmp", "ret", "tax", "txa"]))
        if kind == "ld":
            body.append(insn(0x20, draw(st.sampled_from(FIELDS))))
        elif kind == "alu":
            op = draw(st.sampled_from([0x00, 0x10, 0x20, 0x40, 0x50, 0x60, 0x70, 0xA0, 0x30, 0x90]))
            src = draw(st.sampled_from([0x00, 0x08]))
            k = draw(st.integers(1 if op in (0x30, 0x90) and src == 0 else 0, 40))
            body.append(insn(0x04 | op | src, k))
        elif kind == "jmp":
            op = draw(st.sampled_from([0x10, 0x20, 0x30, 0x40]))
            k = draw(st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1)))
            body.append(
                insn(
                    0x05 | op | draw(st.sampled_from([0, 8])),
                    k,
                    draw(st.integers(0, left - 1)),
                    draw(st.integers(0, left - 1)),
                )
            )
        elif kind == "ret":
            body.append(insn(RET_K, draw(ACTIONS)))
        else:
            body.append(insn(0x07 | (0x00 if kind == "tax" else 0x80), 0))
    guard = [insn(0x00, 0), insn(0x01, 0), insn(0x20, 0), insn(0x15, TARGET, 0, n)]  # A=X=0; other calls: ALLOW
    return guard + body + [insn(RET_K, P.SECCOMP_RET_ALLOW)]


def kernel_outcome(programs, args) -> tuple[str, int]:
    """Install `programs` in a forked child (newest last) and make the call there."""
    parent = os.getpid()  # the child may make the filtered call only once
    pid = os.fork()
    if pid == 0:  # the child: only raw syscalls and _exit
        try:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            for prog in programs:
                install(encode(prog))
        except OSError as exc:
            os._exit(252 if exc.errno == 22 else 253)
        try:
            r = syscall(TARGET, *args)
        except OSError as exc:
            os._exit(exc.errno)
        os._exit(250 if r == parent else 251)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "signal", os.WTERMSIG(status)
    code = os.WEXITSTATUS(status)
    return {250: ("ok", 0), 251: ("zero", 0), 252: ("rejected", 0), 253: ("install-failed", 0)}.get(
        code, ("errno", code)
    )


def expected(action: Action, data: int) -> tuple[str, int]:
    if action in (Action.ALLOW, Action.LOG):
        return "ok", 0
    if action is Action.ERRNO:
        return ("errno", data) if data else ("zero", 0)
    if action in (Action.TRACE, Action.USER_NOTIF):
        return "errno", 38  # no tracer, no listener: ENOSYS
    return "signal", signal.SIGSYS


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much], derandomize=True)
@given(
    programs=st.lists(bodies(), min_size=1, max_size=2),
    args=st.lists(st.integers(0, 2**64 - 1), min_size=6, max_size=6),
)
def test_verdict_is_what_the_kernel_does(writewatch_kernel, programs, args):
    outcome = kernel_outcome(programs, args)
    assume(outcome[0] != "rejected")  # not a program seccomp accepts
    assert outcome[0] != "install-failed"
    data = seccomp_data(TARGET, args, 0)
    assert expected(*verdict(list(reversed(programs)), data)) == outcome


def test_programs_seccomp_rejects_are_unverifiable():
    for bad in ([insn(0x28, 0)], [insn(0x20, 8 + 64)], [insn(0x20, 2)], [insn(0x15, 0, 0, 0)]):
        try:
            run(bad, seccomp_data(TARGET, [0] * 6, 0))
        except Unverifiable:
            continue
        raise AssertionError(f"{bad} was evaluated")
