"""Write-watch on another process: async userfaultfd write-protection registered in its
address space, harvested with PAGEMAP_SCAN (an atomic read-and-reprotect).

The userfaultfd is created inside the target by one injected `userfaultfd()` call and taken
with `pidfd_getfd`; the target's copy is closed again by a second injected call. Every later
operation acts on the target's memory from this process, and closing our fd ends the
registration: the target is left as it was. Facts: the project's reference on write-watch.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from orchestrator.dirty.memory import MemoryLayout
from orchestrator.uapi import ptrace as P
from orchestrator.uapi import userfaultfd as U
from orchestrator.writewatch.errors import Refusal, WriteWatchRefused
from orchestrator.writewatch.inject import check_arch, seized, syscall
from orchestrator.writewatch.maps import mappings_of
from orchestrator.writewatch.seccomp import Call, SeccompCheck

#: What the watch asks of the kernel: async write-protection that needs no fault handler,
#: covers pages never populated, and works on shmem/hugetlbfs (guest RAM files).
FEATURES = U.UFFD_FEATURE_WP_ASYNC | U.UFFD_FEATURE_WP_UNPOPULATED | U.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
_UFFD_FLAGS = os.O_CLOEXEC | os.O_NONBLOCK
#: Regions one scan call can return before it stops and says where (walk_end).
VEC_LEN = 1 << 14
#: Threads a scan is split across: the page-table walk costs about a millisecond per GiB
#: registered, touched or not, and the final one runs inside the downtime with QEMU stopped.
SCAN_LANES = min(2, os.cpu_count() or 1)
#: A lane takes at least this much of the registered span: handing a piece to a thread and
#: waiting for it costs about 0.4 ms, a quarter-GiB walk about 0.1 ms (measured, 256 MiB).
LANE_BYTES = 1 << 30


class _Lane:
    """One thread's share of a scan: its pieces of the ranges, its own argument and vector."""

    def __init__(self, pieces: list[tuple[WatchedRange, int, int]]) -> None:
        self.pieces = pieces
        self.vec = np.zeros((VEC_LEN, 3), np.uint64)
        self.arg = U.pm_scan_arg(
            size=ctypes.sizeof(U.pm_scan_arg),
            vec=self.vec.ctypes.data,
            vec_len=VEC_LEN,
            flags=U.PM_SCAN_WP_MATCHING | U.PM_SCAN_CHECK_WPASYNC,
            category_mask=U.PAGE_IS_WRITTEN,
            return_mask=U.PAGE_IS_WRITTEN,
        )

    def scan(self, pagemap: int, page: int, on_runs: OnRuns | None) -> int:
        arg, vec, total = self.arg, self.vec, 0
        for r, lo, hi in self.pieces:
            arg.start, arg.end = lo, hi
            while arg.start < arg.end:
                n = fcntl.ioctl(pagemap, U.PAGEMAP_SCAN, arg, True)
                if n:
                    first, stop = _guest_runs(r, vec[:n], page)
                    total += int((stop - first).sum())
                    if on_runs is not None:
                        on_runs(first, stop)
                arg.start = arg.walk_end
        return total


def _guest_runs(r: WatchedRange, regions: np.ndarray, page: int) -> tuple[np.ndarray, np.ndarray]:
    """Guest page runs of scan results (virtual [start, end) rows), clipped to the range."""
    lo = np.clip(regions[:, 0].astype(np.int64) - r.vaddr, 0, r.length)
    hi = np.clip(regions[:, 1].astype(np.int64) - r.vaddr, 0, r.length)
    first, stop = (r.gpa + lo) // page, -(-(r.gpa + hi) // page)
    keep = stop > first
    return first[keep], stop[keep]


# A run callback: (first guest page, end guest page) arrays, both int64.
OnRuns = Callable[[np.ndarray, np.ndarray], None]


@dataclass(frozen=True)
class WatchedRange:
    """The target's virtual [vaddr, vaddr + length) holds guest-physical [gpa, gpa + length).
    `span` is what is registered and scanned: the range widened to whole pages of the
    mapping (huge pages on hugetlbfs), within it."""

    vaddr: int
    length: int
    gpa: int
    span: tuple[int, int]
    page: int  # the mapping's page size: pieces of a span are cut on its boundaries

    def pieces(self, n: int) -> list[tuple[int, int]]:
        """The span cut into at most `n` parts on page boundaries, for parallel scans."""
        lo, hi = self.span
        step = -(-(hi - lo) // n // self.page) * self.page
        return [(a, min(a + step, hi)) for a in range(lo, hi, step)]


def watched_ranges(pid: int, layout: MemoryLayout) -> list[WatchedRange]:
    """Every place the target maps each RAM region's file bytes: each is written through,
    so each is watched."""
    out: list[WatchedRange] = []
    for region in layout.regions:
        if region.path is None:
            raise ValueError(f"RAM region {region.gpa:#x}+{region.length:#x} names no file")
        found = 0
        for m in mappings_of(pid, region.path):
            lo = max(region.offset, m.offset)
            hi = min(region.offset + region.length, m.offset + m.length)
            if lo >= hi:
                continue
            if not m.shared:
                raise WriteWatchRefused(
                    Refusal.NO_MAPPING, f"process {pid} maps {region.path} privately: its writes never reach the file"
                )
            vaddr = m.start + lo - m.offset
            span = (
                max(m.start, vaddr - vaddr % m.page_size),
                min(m.end, -(-(vaddr + hi - lo) // m.page_size) * m.page_size),
            )
            out.append(WatchedRange(vaddr, hi - lo, region.gpa + lo - region.offset, span, m.page_size))
            found += hi - lo
        if found < region.length:
            raise WriteWatchRefused(
                Refusal.NO_MAPPING,
                f"process {pid} does not map all of {region.path} bytes {region.offset:#x}+{region.length:#x}",
            )
    return out


def kernel_features() -> int:
    """The userfaultfd features this kernel offers, learnt on a userfaultfd of our own (the
    target is not touched); also checks PAGEMAP_SCAN exists."""
    try:
        fd = syscall(P.SYS_userfaultfd, _UFFD_FLAGS | U.UFFD_USER_MODE_ONLY)
    except OSError as exc:
        raise WriteWatchRefused(Refusal.KERNEL, f"this kernel offers no userfaultfd ({exc.strerror})") from None
    try:
        api = U.uffdio_api(api=U.UFFD_API, features=0)
        fcntl.ioctl(fd, U.UFFDIO_API, api, True)
    finally:
        os.close(fd)
    missing = FEATURES & ~api.features
    if missing:
        raise WriteWatchRefused(
            Refusal.KERNEL,
            f"this kernel lacks async userfaultfd write-protection (features {missing:#x}; Linux >= 6.7 has them)",
        )
    try:
        pm = open("/proc/self/pagemap", "rb", buffering=0)  # noqa: SIM115 - the `with` below closes it
    except PermissionError:  # a process that dropped privileges; the target's pagemap tells
        return int(api.features)
    with pm:
        arg = U.pm_scan_arg(size=ctypes.sizeof(U.pm_scan_arg), start=0, end=0)
        try:
            fcntl.ioctl(pm.fileno(), U.PAGEMAP_SCAN, arg, True)
        except OSError as exc:
            raise WriteWatchRefused(
                Refusal.KERNEL, f"this kernel has no PAGEMAP_SCAN ({exc.strerror}; Linux >= 6.7 has it)"
            ) from None
    return int(api.features)


def _lowest_free_fd(pid: int) -> int:
    used = {int(n) for n in os.listdir(f"/proc/{pid}/fd")}
    return next(n for n in range(len(used) + 1) if n not in used)


def take_userfaultfd(pid: int, trust_seccomp: bool = False) -> int:
    """A userfaultfd for `pid`'s memory, held by this process (the target keeps none)."""
    calls = [
        Call(P.SYS_userfaultfd, (_UFFD_FLAGS,), "userfaultfd"),
        Call(P.SYS_close, (_lowest_free_fd(pid),), "close"),
    ]
    check = SeccompCheck(calls, trust_seccomp)
    with seized(pid, check=check) as inj:
        remote = inj.call(P.SYS_userfaultfd, _UFFD_FLAGS)
        if remote < 0:
            err = -remote
            hint = ": the process needs CAP_SYS_PTRACE, or vm.unprivileged_userfaultfd=1" if err == errno.EPERM else ""
            raise WriteWatchRefused(
                Refusal.USERFAULTFD_DENIED, f"userfaultfd() in process {pid} failed: {os.strerror(err)}{hint}"
            )
        try:
            check.check(Call(P.SYS_close, (remote,), "close"), inj.site + len(P.SYSCALL_INSN))
        except WriteWatchRefused as exc:  # never make a call the filter would punish
            raise WriteWatchRefused(
                exc.cause, f"{exc}; process {pid} keeps an unused userfaultfd (fd {remote})"
            ) from None
        try:
            pidfd = os.pidfd_open(pid)
            try:
                return syscall(P.SYS_pidfd_getfd, pidfd, remote, 0)
            finally:
                os.close(pidfd)
        except OSError as exc:
            raise WriteWatchRefused(
                Refusal.PTRACE_DENIED, f"cannot take process {pid}'s userfaultfd: {exc.strerror}"
            ) from None
        finally:
            inj.call(P.SYS_close, remote)


class WriteWatch:
    """A userfaultfd registered over every watched range of one process."""

    def __init__(self, pid: int, uffd: int, ranges: Sequence[WatchedRange], page_size: int) -> None:
        self.pid, self.ranges, self.page_size = pid, list(ranges), page_size
        self._uffd: int | None = uffd
        self._pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self._registered = False
        n = max(1, min(SCAN_LANES, sum(r.span[1] - r.span[0] for r in self.ranges) // LANE_BYTES))
        parts = [[(r, lo, hi) for r in self.ranges for lo, hi in r.pieces(n)[i::n]] for i in range(n)]
        self._lanes = [_Lane(p) for p in parts if p]
        self._pool = ThreadPoolExecutor(len(self._lanes) - 1, "write-watch-scan") if len(self._lanes) > 1 else None

    @classmethod
    def open(cls, pid: int, layout: MemoryLayout, trust_seccomp: bool = False) -> WriteWatch:
        """Check everything, take a userfaultfd from `pid` and register its RAM mappings.
        Raises `WriteWatchRefused` naming the cause; the target is unchanged if it does."""
        check_arch()
        kernel_features()
        ranges = watched_ranges(pid, layout)
        uffd = take_userfaultfd(pid, trust_seccomp)
        try:
            api = U.uffdio_api(api=U.UFFD_API, features=FEATURES)
            try:
                fcntl.ioctl(uffd, U.UFFDIO_API, api, True)
            except OSError as exc:
                raise WriteWatchRefused(
                    Refusal.KERNEL, f"UFFDIO_API on process {pid}'s userfaultfd: {exc.strerror}"
                ) from None
            try:
                watch = cls(pid, uffd, ranges, layout.page_size)
            except FileNotFoundError:
                raise WriteWatchRefused(Refusal.PROCESS_GONE, f"no process {pid}") from None
            except PermissionError:
                raise WriteWatchRefused(Refusal.PTRACE_DENIED, f"cannot open process {pid}'s pagemap") from None
        except BaseException:
            os.close(uffd)
            raise
        try:
            watch.register()
        except BaseException:
            watch.close()
            raise
        return watch

    @property
    def closed(self) -> bool:
        return self._uffd is None

    def _fd(self) -> int:
        if self._uffd is None:
            raise RuntimeError(f"write-watch on process {self.pid} is closed")
        return self._uffd

    def register(self) -> None:
        if self._registered:
            return
        done: list[WatchedRange] = []
        try:
            for r in self.ranges:
                lo, hi = r.span
                reg = U.uffdio_register(range=U.uffdio_range(start=lo, len=hi - lo), mode=U.UFFDIO_REGISTER_MODE_WP)
                try:
                    fcntl.ioctl(self._fd(), U.UFFDIO_REGISTER, reg, True)
                except OSError as exc:
                    why = (
                        " (already registered: QEMU postcopy or a background snapshot?)"
                        if exc.errno == errno.EBUSY
                        else ""
                    )
                    raise WriteWatchRefused(
                        Refusal.REGISTER_REFUSED,
                        f"registering {lo:#x}-{hi:#x} of process {self.pid} failed: {exc.strerror}{why}",
                    ) from None
                done.append(r)
        except BaseException:
            self._unregister(done)
            raise
        self._registered = True

    def _unregister(self, ranges: Sequence[WatchedRange]) -> None:
        for r in ranges:
            lo, hi = r.span
            try:
                fcntl.ioctl(self._fd(), U.UFFDIO_UNREGISTER, U.uffdio_range(start=lo, len=hi - lo), True)
            except OSError as exc:
                if exc.errno not in (errno.ESRCH, errno.ENOMEM):  # the process is gone
                    raise

    def unregister(self) -> None:
        """Write-protection off everywhere: the target runs as before."""
        if self._registered and self._uffd is not None:
            self._registered = False
            self._unregister(self.ranges)

    def scan(self, on_runs: OnRuns | None) -> int:
        """Pages written since the last scan, re-protected atomically; each batch goes to
        `on_runs` as guest page runs (None: discard, as the arming scan does). Returns the
        number of guest pages reported."""
        if not self._registered:
            raise RuntimeError(f"write-watch on process {self.pid} is not registered")
        first, *rest = self._lanes
        others = (
            [self._pool.submit(lane.scan, self._pagemap, self.page_size, on_runs) for lane in rest]
            if self._pool
            else []
        )
        try:
            total = first.scan(self._pagemap, self.page_size, on_runs)
        finally:
            wait(others)  # no lane may still be scanning when the caller acts on a failure
        return total + sum(f.result() for f in others)

    def close(self) -> None:
        """End the registration (closing the userfaultfd does) and release everything."""
        if self._uffd is not None:
            fd, self._uffd = self._uffd, None
            self._registered = False
            os.close(fd)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._pagemap >= 0:
            os.close(self._pagemap)
            self._pagemap = -1
