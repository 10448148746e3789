"""The injector and the refusals, against real child processes: a call runs in the target and
returns its result, the target goes on exactly as before, and every refusal leaves it alone."""

import os
import signal
import subprocess
import sys
import time

import pytest

from orchestrator.uapi import ptrace as P
from orchestrator.writewatch import Refusal, WriteWatch, WriteWatchRefused
from orchestrator.writewatch.inject import seized, thread_state

from .children import BY_COMMAND, RANDOM_WRITER, command, spawn, spawned
from .conftest import collect, flat
from .filters import JEQ_K, LD_ABS, RET_K, exec_wrapper, insn, on_syscall

SYS_getpid = 39


def test_a_call_in_a_thread_blocked_in_read_returns_and_the_read_restarts(shared_file):
    with spawned(BY_COMMAND, shared_file) as child:
        with seized(child.pid) as inj:
            assert inj.call(SYS_getpid) == child.pid
            assert inj.call(P.SYS_close, 9999) == -9  # -EBADF comes back as a value
        command(child, [1, 2])  # the interrupted read() was restarted: the child reads on
        assert child.poll() is None


def test_a_call_in_a_running_thread_uses_a_syscall_from_its_text(shared_file):
    with spawned(RANDOM_WRITER, shared_file, "3") as child:
        for _ in range(20):
            with seized(child.pid) as inj:
                assert inj.call(SYS_getpid) == child.pid
        assert child.poll() is None


def _refused(pid: int, path) -> WriteWatchRefused:
    with pytest.raises(WriteWatchRefused) as info:
        WriteWatch.open(pid, flat(path))
    return info.value


def _fds(pid: int) -> set[str]:
    return set(os.listdir(f"/proc/{pid}/fd"))


def _child_under(tmp_path, shared_file, program, preamble=""):
    wrapper = exec_wrapper(tmp_path, program, sys.executable)
    child = subprocess.Popen(
        [wrapper, "-c", BY_COMMAND.replace("print('ready'", preamble + "print('ready'"), str(shared_file)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "ready"
    return child


@pytest.mark.parametrize(
    "action,cause",
    [
        (P.SECCOMP_RET_KILL_PROCESS, Refusal.SECCOMP_FORBIDS),
        (P.SECCOMP_RET_TRAP, Refusal.SECCOMP_FORBIDS),
        (P.SECCOMP_RET_ERRNO | 1, Refusal.SECCOMP_FORBIDS),
        (P.SECCOMP_RET_TRACE, Refusal.SECCOMP_UNVERIFIED),
    ],
)
def test_a_filter_that_would_deny_userfaultfd_means_no_injection(tmp_path, shared_file, action, cause):
    child = _child_under(tmp_path, shared_file, on_syscall(P.SYS_userfaultfd, action))
    try:
        fds = _fds(child.pid)
        assert _refused(child.pid, shared_file).cause is cause
        command(child, [5])  # alive and unchanged: nothing was injected
        assert _fds(child.pid) == fds
    finally:
        child.kill()
        child.wait()


def test_a_filter_that_allows_both_calls_is_vouched_for(tmp_path, shared_file):
    child = _child_under(tmp_path, shared_file, on_syscall(SYS_getpid, P.SECCOMP_RET_KILL_PROCESS))
    try:
        watch = WriteWatch.open(child.pid, flat(shared_file))
        watch.scan(None)
        command(child, [5])
        assert collect(watch).tolist() == [5]
        watch.close()
    finally:
        child.kill()
        child.wait()


def test_a_filter_denying_close_of_the_new_fd_refuses_before_any_call(tmp_path, shared_file):
    """close() is killed for fd 64 only, and 64 is the child's lowest free fd: the userfaultfd
    it would get could never be closed again, so nothing is injected."""
    kill_close_64 = [
        insn(LD_ABS, 4),
        insn(JEQ_K, P.AUDIT_ARCH_X86_64, 1, 0),
        insn(RET_K, P.SECCOMP_RET_KILL_PROCESS),
        insn(LD_ABS, 0),
        insn(JEQ_K, P.SYS_close, 0, 3),
        insn(LD_ABS, 16),
        insn(JEQ_K, 64, 0, 1),
        insn(RET_K, P.SECCOMP_RET_KILL_PROCESS),
        insn(RET_K, P.SECCOMP_RET_ALLOW),
    ]
    fill = "import os\nfor fd in range(3, 64):\n    try: os.fstat(fd)\n    except OSError: os.dup2(0, fd)\n"
    child = _child_under(tmp_path, shared_file, kill_close_64, fill)
    try:
        fds = _fds(child.pid)
        assert _refused(child.pid, shared_file).cause is Refusal.SECCOMP_FORBIDS
        command(child, [5])
        assert _fds(child.pid) == fds
    finally:
        child.kill()
        child.wait()


def test_ptrace_denied_when_another_tracer_holds_the_process(shared_file):
    child = spawn(BY_COMMAND, shared_file)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from orchestrator.writewatch.inject import ptrace; "
            "ptrace(0x4206, int(sys.argv[1])); print('held', flush=True); time.sleep(60)",
            str(child.pid),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        fds = _fds(child.pid)
        assert _refused(child.pid, shared_file).cause is Refusal.PTRACE_DENIED
        assert _fds(child.pid) == fds
    finally:
        holder.kill()
        holder.wait()
        child.kill()
        child.wait()


def test_an_unprivileged_caller_is_refused_with_the_cause(shared_file):
    with spawned(BY_COMMAND, shared_file) as child:
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import os, sys\n"
                "from orchestrator.dirty.memory import MemoryLayout\n"
                "from orchestrator.writewatch import WriteWatch, WriteWatchRefused\n"
                "os.setgid(65534); os.setuid(65534)\n"
                "try: WriteWatch.open(int(sys.argv[1]), MemoryLayout.flat(16 << 20, path=sys.argv[2]))\n"
                "except WriteWatchRefused as e: print(e.cause.value, e)",
                str(child.pid),
                str(shared_file),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert probe.stdout.startswith("ptrace-denied"), probe.stdout + probe.stderr
        command(child, [1])


def test_a_stopped_process_is_refused_and_stays_stopped(shared_file):
    with spawned(BY_COMMAND, shared_file) as child:
        os.kill(child.pid, signal.SIGSTOP)
        while thread_state(child.pid, child.pid) != "T":  # the stop is delivered asynchronously
            time.sleep(0.001)
        assert _refused(child.pid, shared_file).cause is Refusal.STOPPED
        assert thread_state(child.pid, child.pid) == "T"
        os.kill(child.pid, signal.SIGCONT)
        command(child, [1])


def test_a_gone_process_is_refused(shared_file):
    child = spawn(BY_COMMAND, shared_file)
    child.kill()
    child.wait()
    assert _refused(child.pid, shared_file).cause is Refusal.PROCESS_GONE


def test_a_file_the_process_does_not_map_is_refused(shared_file, tmp_path):
    child = spawn(BY_COMMAND, shared_file)
    other = tmp_path / "other"
    other.write_bytes(b"\0" * 4096)
    try:
        assert _refused(child.pid, other).cause is Refusal.NO_MAPPING
    finally:
        child.kill()
        child.wait()


def test_an_unprivileged_target_without_unprivileged_userfaultfd_is_refused(shared_file):
    """The injected call runs with the target's credentials: a QEMU without CAP_SYS_PTRACE
    gets EPERM when vm.unprivileged_userfaultfd is 0, and the refusal says so."""
    sysctl = "/proc/sys/vm/unprivileged_userfaultfd"
    with open(sysctl) as f:
        if f.read().strip() != "0":
            pytest.skip("vm.unprivileged_userfaultfd is 1 here")
    os.chown(shared_file, 65534, 65534)
    drop = "import os; os.setgid(65534); os.setuid(65534)\n"
    child = subprocess.Popen(
        [sys.executable, "-c", BY_COMMAND.replace("print('ready'", drop + "print('ready'"), str(shared_file)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        fds = _fds(child.pid)
        refusal = _refused(child.pid, shared_file)
        assert refusal.cause is Refusal.USERFAULTFD_DENIED and "vm.unprivileged_userfaultfd" in str(refusal)
        assert _fds(child.pid) == fds
        command(child, [2])
    finally:
        child.kill()
        child.wait()


def test_a_kernel_without_async_write_protection_is_refused_before_the_target_is_touched(shared_file, monkeypatch):
    import fcntl

    from orchestrator.uapi import userfaultfd as U
    from orchestrator.writewatch import watch as W

    real = fcntl.ioctl

    def old_kernel(fd, request, arg, mutate=True):
        r = real(fd, request, arg, mutate)
        if request == U.UFFDIO_API:
            arg.features &= ~U.UFFD_FEATURE_WP_ASYNC  # what a 6.6 kernel answers
        return r

    monkeypatch.setattr(W.fcntl, "ioctl", old_kernel)
    monkeypatch.setattr(W, "take_userfaultfd", lambda *a: pytest.fail("the target was touched"))
    with spawned(BY_COMMAND, shared_file) as child:
        refusal = _refused(child.pid, shared_file)
        assert refusal.cause is Refusal.KERNEL and "6.7" in str(refusal)


def test_a_terminating_signal_waits_until_the_target_is_restored(shared_file):
    """SIGTERM to the injecting process in the middle of an injection: the call finishes, the
    target gets its registers back and runs on, and only then does the process die of it."""
    with spawned(BY_COMMAND, shared_file) as child:
        script = (
            "import os, signal, sys\n"
            "from orchestrator.writewatch.inject import seized, thread_state\n"
            "with seized(int(sys.argv[1])) as inj:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    print('called', inj.call(39), flush=True)\n"
            "print('never here', flush=True)\n"
        )
        run = subprocess.run([sys.executable, "-c", script, str(child.pid)], capture_output=True, text=True, timeout=60)
        assert run.returncode == -signal.SIGTERM, run.stderr
        assert run.stdout == f"called {child.pid}\n"
        command(child, [4])  # restored: its read() restarted
