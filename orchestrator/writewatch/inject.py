"""Run a system call inside another process's thread, with ptrace, and leave it as it was.

The thread is seized and interrupted (never killed: no PTRACE_O_EXITKILL), its registers
saved, the call run by single-stepping one `syscall` instruction that is already mapped in
the target, and every register restored before the detach. If the thread was stopped inside
a system call, the kernel restarts that call on resume exactly as after any signal stop,
because the restored registers carry its restart state. Signals that arrive meanwhile are
delivered, not swallowed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from orchestrator.uapi import ptrace as P
from orchestrator.writewatch.errors import Refusal, WriteWatchRefused

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_libc.syscall.restype = ctypes.c_long

_WALL = 0x40000000
#: How long a thread may take to reach a ptrace stop before the injection is given up.
STOP_TIMEOUT_S = 2.0
_MINUS_ONE = (1 << 64) - 1
#: Signals that would end this process mid-injection and leave the target's registers changed.
_HELD = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}


def ptrace(request: int, tid: int, addr: int = 0, data: int = 0) -> int:
    ctypes.set_errno(0)
    r: int = _libc.ptrace(request, tid, addr, data)  # restype c_long
    if r == -1 and (err := ctypes.get_errno()):
        raise OSError(err, f"ptrace({request:#x}, {tid}): {os.strerror(err)}")
    return r


def syscall(nr: int, *args: int) -> int:
    """A raw system call in this process; OSError on failure."""
    r: int = _libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))  # restype c_long
    if r == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return r


def signed(value: int) -> int:
    return value - (1 << 64) if value >> 63 else value


def check_arch() -> None:
    if platform.machine() != "x86_64":
        raise WriteWatchRefused(
            Refusal.UNSUPPORTED_ARCH, f"the syscall injector speaks x86_64 only, this host is {platform.machine()}"
        )


def find_syscall_insn(pid: int) -> int:
    """Address of a `syscall` instruction in an executable mapping of `pid` (vdso first)."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        spans = []
        for line in maps:
            fields = line.split()
            if "x" not in fields[1] or (len(fields) > 5 and fields[5] == "[vsyscall]"):
                continue
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            spans.append((len(fields) < 6 or fields[5] != "[vdso]", lo, hi))
        for _, lo, hi in sorted(spans):
            try:
                at = os.pread(mem.fileno(), min(hi - lo, 1 << 20), lo).find(P.SYSCALL_INSN)
            except OSError:
                continue
            if at >= 0:
                return lo + at
    raise WriteWatchRefused(Refusal.PROCESS_GONE, f"no syscall instruction found in process {pid}'s text")


class Injector:
    """One seized, stopped thread; `call` runs system calls in it. Use `seized(pid)`."""

    def __init__(self, pid: int, tid: int) -> None:
        self.pid, self.tid = pid, tid
        self.saved = P.user_regs_struct()
        self.site = 0
        self._saved_valid = False  # registers are only ever restored once they were read
        self._pending: list[int] = []  # signals that arrived while stopped, re-delivered on detach

    def _wait(self) -> tuple[int, int]:
        """Wait for the next stop: (signal, ptrace event). Polled with a deadline: a stop
        can be reported to another waiter of ours (a child watcher waiting for the thread
        group leader), and a lost report must end in a refusal, not a hang."""
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while True:
            got, status = os.waitpid(self.tid, _WALL | os.WNOHANG)
            if got:
                break
            if time.monotonic() > deadline:
                raise WriteWatchRefused(
                    Refusal.PROCESS_GONE,
                    f"thread {self.tid} of process {self.pid} reached no ptrace stop in {STOP_TIMEOUT_S:g}s",
                )
            time.sleep(0.0002)
        if not os.WIFSTOPPED(status):
            raise WriteWatchRefused(Refusal.PROCESS_GONE, f"thread {self.tid} of process {self.pid} exited")
        return os.WSTOPSIG(status), status >> 16

    def _stop(self) -> None:
        ptrace(P.PTRACE_INTERRUPT, self.tid)
        while True:
            sig, event = self._wait()
            if event == P.PTRACE_EVENT_STOP:
                if sig != signal.SIGTRAP:  # a group-stop: the process was stopped by a signal
                    raise WriteWatchRefused(Refusal.STOPPED, f"process {self.pid} is stopped by signal {sig}")
                return
            ptrace(P.PTRACE_CONT, self.tid, 0, sig)  # a signal for the thread: let it through

    def _regs(self, regs: P.user_regs_struct) -> None:
        ptrace(P.PTRACE_GETREGS, self.tid, 0, ctypes.addressof(regs))

    def _set_regs(self, regs: P.user_regs_struct) -> None:
        ptrace(P.PTRACE_SETREGS, self.tid, 0, ctypes.addressof(regs))

    def _find_site(self) -> int:
        """The `syscall` just before rip when the thread sits in a system call, else one
        from its executable mappings."""
        if signed(self.saved.orig_rax) >= 0:
            with open(f"/proc/{self.pid}/mem", "rb", buffering=0) as mem:
                try:
                    if os.pread(mem.fileno(), 2, self.saved.rip - 2) == P.SYSCALL_INSN:
                        return int(self.saved.rip) - 2
                except OSError:
                    pass
        return find_syscall_insn(self.pid)

    def call(self, nr: int, *args: int) -> int:
        """Run system call `nr` in the thread; its return value (negative: -errno)."""
        regs = P.user_regs_struct.from_buffer_copy(self.saved)
        regs.rax, regs.orig_rax, regs.rip = nr, _MINUS_ONE, self.site  # orig_rax -1: no restart
        for name, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args, strict=False):
            setattr(regs, name, value & _MINUS_ONE)
        self._set_regs(regs)
        done = P.user_regs_struct()
        while True:
            ptrace(P.PTRACE_SINGLESTEP, self.tid)
            sig, _ = self._wait()
            self._regs(done)
            if sig != signal.SIGTRAP:
                self._pending.append(sig)
            if done.rip == self.site + len(P.SYSCALL_INSN):
                return signed(done.rax)

    def _detach(self) -> None:
        if self._saved_valid:
            self._set_regs(self.saved)
        first, rest = (self._pending[0], self._pending[1:]) if self._pending else (0, [])
        ptrace(P.PTRACE_DETACH, self.tid, 0, first)
        for sig in rest:
            syscall(P.SYS_tgkill, self.pid, self.tid, sig)


def quiet_thread(pid: int) -> int:
    """A thread of `pid` to inject into: one blocked in a system call, not a vCPU, and not the
    thread group leader when another will do (a parent's child watcher waits for the leader's
    state changes, ptrace stops included)."""
    best: tuple[int, int] | None = None
    for name in os.listdir(f"/proc/{pid}/task"):
        tid = int(name)
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                blocked = f.read().split()[0].lstrip("-").isdigit()
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                vcpu = f.read().startswith("CPU ")
        except OSError:
            continue  # the thread just exited
        rank = (tid == pid) + 2 * (not blocked or vcpu)
        if best is None or (rank, tid) < best:
            best = (rank, tid)
    if best is None:
        raise WriteWatchRefused(Refusal.PROCESS_GONE, f"no process {pid}")
    return best[1]


def thread_state(pid: int, tid: int) -> str:
    """The thread's state letter from /proc (T: stopped by a signal)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][:1]
    except (FileNotFoundError, IndexError):
        raise WriteWatchRefused(Refusal.PROCESS_GONE, f"no process {pid} (thread {tid})") from None


@contextmanager
def _signals_held() -> Iterator[None]:
    """Signals that would kill this process wait until the target is restored. This thread
    blocks them; on the main thread, those left at their default action (which would end the
    process whichever of its threads takes them) get a recorder meanwhile, and what arrived
    is raised again afterwards. Signals with a handler of their own keep it."""
    arrived: list[int] = []
    main = threading.current_thread() is threading.main_thread()
    fatal = [sig for sig in _HELD if main and signal.getsignal(sig) == signal.SIG_DFL]
    old_handlers = {sig: signal.signal(sig, lambda n, _: arrived.append(n)) for sig in fatal}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        for n in arrived:
            signal.raise_signal(n)


@contextmanager
def seized(pid: int, tid: int | None = None, check: Callable[[Injector], None] | None = None) -> Iterator[Injector]:
    """Seize and stop thread `tid` (default: a `quiet_thread`) of `pid`; restore and detach on
    exit, whatever happened. `check` runs while the thread is stopped, before any register is
    touched (the seccomp check reads the filters then). This process's terminating signals are
    held meanwhile: dying mid-call would leave the target with changed registers."""
    check_arch()
    tid = quiet_thread(pid) if tid is None else tid
    if thread_state(pid, tid) == "T":  # a stopped process must stay stopped, untouched
        raise WriteWatchRefused(Refusal.STOPPED, f"process {pid} is stopped by a signal (SIGSTOP?): continue it first")
    with _signals_held():
        try:
            ptrace(P.PTRACE_SEIZE, tid)
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                raise WriteWatchRefused(Refusal.PROCESS_GONE, f"no process {pid} (thread {tid})") from None
            raise WriteWatchRefused(
                Refusal.PTRACE_DENIED,
                f"cannot ptrace process {pid} ({exc.strerror}): run as root or with CAP_SYS_PTRACE "
                "(and a Yama ptrace_scope that allows it)",
            ) from None
        inj = Injector(pid, tid)
        try:
            inj._stop()
            inj._regs(inj.saved)
            inj._saved_valid = True
            if check is not None:
                check(inj)
            inj.site = inj._find_site()
            yield inj
        finally:
            try:
                inj._detach()
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    raise
