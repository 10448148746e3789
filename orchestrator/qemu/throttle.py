"""Throttling a QEMU's vCPUs from outside: its vCPU threads in a child cgroup whose CPU
bandwidth is limited, level L giving them (1 - L) of each period.

QEMU's own auto-converge throttles only inside QEMU's RAM migration, which the orchestrator
does not use, and a stop/cont duty cycle would change the run state the migration's
choreography reads; a CPU quota on the vCPU threads changes nothing QEMU can see. The threads
come from `query-cpus-fast` (`thread-id`) and are checked to be the QEMU's own. Both cgroup
versions work: v2 `cpu.max` in a threaded child of QEMU's cgroup (threads may move only
within a threaded subtree), or v1 `cpu.cfs_quota_us`/`cpu.cfs_period_us` and `tasks`. Which
one is found at `open`, which also makes and removes a child once to prove it may; with
neither it refuses, naming why each failed. `release` moves every thread back where it was
and removes the child (and in v2 turns the cpu controller off again if it turned it on).
"""

from __future__ import annotations

import asyncio
import errno
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from orchestrator.qemu.errors import QemuError
from orchestrator.qemu.peer import QmpPeer

MOUNTINFO = Path("/proc/self/mountinfo")
#: The CFS period: 100 ms, the kernel's default; quotas below 1 ms are refused by it.
PERIOD_US = 100_000
MIN_QUOTA_US = 1_000


class ThrottleError(QemuError):
    """The vCPUs cannot be throttled: no usable cgroup, or threads that are not QEMU's."""


@dataclass(frozen=True)
class Hierarchy:
    """A mounted cgroup hierarchy that has the cpu controller (v1) or may have it (v2)."""

    version: int
    mount: Path
    root: str  # the hierarchy path the mount shows (its mountinfo root)

    def directory(self, path: str) -> Path | None:
        """Where the hierarchy's cgroup `path` is under this mount (None: not visible here)."""
        if path != self.root and not path.startswith(self.root.rstrip("/") + "/"):
            return None
        return self.mount / path[len(self.root) :].lstrip("/")


def cpu_hierarchies(mountinfo: Path = MOUNTINFO) -> list[Hierarchy]:
    """Cgroup v2 mounts first (the current interface), then v1 mounts with `cpu`."""
    v2, v1 = [], []
    for line in mountinfo.read_text().splitlines():
        fields_, _, tail = line.partition(" - ")
        parts, rest = fields_.split(), tail.split()
        if len(parts) < 5 or len(rest) < 3:
            continue
        fstype, options = rest[0], rest[2].split(",")
        if fstype == "cgroup2":
            v2.append(Hierarchy(2, Path(parts[4]), parts[3]))
        elif fstype == "cgroup" and "cpu" in options:
            v1.append(Hierarchy(1, Path(parts[4]), parts[3]))
    return v2 + v1


def thread_cgroup(pid: int, tid: int, version: int) -> str:
    """The cgroup path of thread `tid` of `pid` in the v2 hierarchy or the v1 cpu one."""
    text = Path(f"/proc/{pid}/task/{tid}/cgroup").read_text()
    for line in text.splitlines():
        number, controllers, path = line.split(":", 2)
        if version == 2 and number == "0" and controllers == "":
            return path
        if version == 1 and "cpu" in controllers.split(","):
            return path
    raise ThrottleError(f"thread {tid} of process {pid} is in no cgroup v{version} cpu hierarchy")


async def vcpu_threads(session: QmpPeer, pid: int) -> list[int]:
    """The thread ids of QEMU's vCPUs (one thread for all of them under single-threaded TCG),
    each checked to be a thread of process `pid`."""
    cpus = await session.execute("query-cpus-fast")
    tids = sorted({int(cpu["thread-id"]) for cpu in cpus})
    if not tids:
        raise ThrottleError(f"QEMU {session.socket_path} reports no vCPU threads")
    for tid in tids:
        if not Path(f"/proc/{pid}/task/{tid}").exists():
            raise ThrottleError(f"vCPU thread {tid} of {session.socket_path} is not a thread of QEMU's process {pid}")
    return tids


def _write(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)


def _home(tasks: Path, tid: int, problems: list[str]) -> None:
    """Move a thread back, saying (not raising) what failed: every other thread still goes."""
    try:
        _move(tasks, tid)
    except OSError as exc:
        problems.append(f"moving thread {tid} back to {tasks.parent} failed: {exc.strerror}")


def _move(tasks: Path, tid: int) -> bool:
    """Write one thread into a cgroup; False if it has exited meanwhile."""
    try:
        _write(tasks, str(tid))
    except ProcessLookupError:
        return False
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return False
        raise
    return True


class _Group(Protocol):
    """One cgroup version's way of holding the vCPU threads in a child with a CPU limit."""

    def create(self) -> None: ...

    def limit(self, quota_us: int | None) -> None: ...

    def remove(self) -> list[str]: ...

    @property
    def child(self) -> Path | None: ...


def _lift(group: _Group) -> list[str]:
    try:
        group.limit(None)
    except OSError as exc:
        return [f"lifting the limit of {group.child} failed: {exc.strerror}"]
    return []


@dataclass
class _V1Group:
    """cgroup v1: the child under the first thread's cpu cgroup; `tasks` takes thread ids."""

    pid: int
    tids: list[int]
    hierarchy: Hierarchy
    period_us: int
    origins: dict[int, Path] = field(default_factory=dict)
    child: Path | None = None

    def create(self) -> None:
        for tid in self.tids:
            where = self.hierarchy.directory(thread_cgroup(self.pid, tid, 1))
            if where is None:
                raise ThrottleError(f"thread {tid}'s cpu cgroup is outside the mount {self.hierarchy.mount}")
            self.origins[tid] = where
        child = self.origins[self.tids[0]] / f"orchestrator-throttle-{self.pid}-{uuid.uuid4().hex[:8]}"
        child.mkdir()
        self.child = child
        _write(child / "cpu.cfs_period_us", str(self.period_us))
        _write(child / "cpu.cfs_quota_us", "-1")
        for tid in self.tids:
            _move(child / "tasks", tid)

    def limit(self, quota_us: int | None) -> None:
        assert self.child is not None
        _write(self.child / "cpu.cfs_quota_us", "-1" if quota_us is None else str(quota_us))

    def remove(self) -> list[str]:
        problems: list[str] = []
        if self.child is None:
            return problems
        lifted = _lift(self)  # first of all: a thread that cannot be moved home at least runs unlimited
        home = self.origins[self.tids[0]]
        for tid in self.tids:
            _home(self.origins[tid] / "tasks", tid, problems)
        # A thread a vCPU thread started meanwhile is in the child too: it goes home as well.
        for line in _lines(self.child / "tasks"):
            _home(home / "tasks", int(line), problems)
        if problems:
            return lifted + problems  # the child stays for another release to retry
        problems += lifted + _rmdir(self.child)
        self.child = None
        return problems


@dataclass
class _V2Group:
    """cgroup v2: a threaded child of QEMU's cgroup (threads move only inside a threaded
    subtree), the cpu controller enabled in QEMU's cgroup for its children if it was not."""

    pid: int
    tids: list[int]
    hierarchy: Hierarchy
    period_us: int
    origin: Path | None = None
    child: Path | None = None
    enabled_cpu: bool = False

    def create(self) -> None:
        paths = {thread_cgroup(self.pid, tid, 2) for tid in self.tids}
        if len(paths) != 1:
            raise ThrottleError(f"QEMU's vCPU threads are in {len(paths)} v2 cgroups ({', '.join(sorted(paths))})")
        origin = self.hierarchy.directory(paths.pop())
        if origin is None:
            raise ThrottleError(f"QEMU's cgroup is outside the mount {self.hierarchy.mount}")
        if "cpu" not in (origin / "cgroup.controllers").read_text().split():
            raise ThrottleError(
                f"cgroup v2 at {self.hierarchy.mount} offers no cpu controller to {origin} "
                "(it is bound to a v1 hierarchy, or not delegated to that cgroup)"
            )
        self.origin = origin
        child = origin / f"orchestrator-throttle-{self.pid}-{uuid.uuid4().hex[:8]}"
        child.mkdir()
        self.child = child
        _write(child / "cgroup.type", "threaded")
        if "cpu" not in (origin / "cgroup.subtree_control").read_text().split():
            _write(origin / "cgroup.subtree_control", "+cpu")
            self.enabled_cpu = True
        _write(child / "cpu.max", f"max {self.period_us}")
        for tid in self.tids:
            _move(child / "cgroup.threads", tid)

    def limit(self, quota_us: int | None) -> None:
        assert self.child is not None
        _write(self.child / "cpu.max", f"{'max' if quota_us is None else quota_us} {self.period_us}")

    def remove(self) -> list[str]:
        problems: list[str] = []
        if self.child is None or self.origin is None:
            return problems
        lifted = _lift(self)  # first of all: a thread that cannot be moved home at least runs unlimited
        for line in {*map(str, self.tids), *_lines(self.child / "cgroup.threads")}:
            _home(self.origin / "cgroup.threads", int(line), problems)
        if problems:
            return lifted + problems  # the child stays for another release to retry
        problems += lifted + _rmdir(self.child)
        self.child = None
        if self.enabled_cpu:
            try:
                _write(self.origin / "cgroup.subtree_control", "-cpu")
            except OSError as exc:
                problems.append(f"turning the cpu controller of {self.origin} off again failed: {exc.strerror}")
            self.enabled_cpu = False
        return problems


def _lines(path: Path) -> Iterator[str]:
    try:
        yield from (line for line in path.read_text().split() if line)
    except FileNotFoundError:
        return


def _rmdir(path: Path) -> list[str]:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return []
    except OSError as exc:
        return [f"removing the throttle cgroup {path} failed: {exc.strerror}"]
    return []


def _group(hierarchy: Hierarchy, pid: int, tids: list[int], period_us: int) -> _Group:
    if hierarchy.version == 2:
        return _V2Group(pid, tids, hierarchy, period_us)
    return _V1Group(pid, tids, hierarchy, period_us)


def _usable(hierarchies: list[Hierarchy], pid: int, tids: list[int], period_us: int) -> Hierarchy:
    """The first hierarchy where a throttle group can be made (made and removed to prove it)."""
    why: list[str] = []
    for h in hierarchies:
        group = _group(h, pid, tids, period_us)
        try:
            group.create()
        except (OSError, ThrottleError, ValueError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            why.append(f"cgroup v{h.version} at {h.mount}: {detail}")
            continue
        finally:
            leftover = group.remove()
        if leftover:
            raise ThrottleError("; ".join(leftover))
        return h
    found = "; ".join(why) if why else "no cgroup v2 mount and no cgroup v1 mount with the cpu controller"
    raise ThrottleError(f"cannot throttle the vCPU threads {tids} of process {pid}: {found}")


class CgroupThrottle:
    """The `orchestrator.migration.throttle.Actuator` for a real QEMU."""

    def __init__(self, pid: int, tids: list[int], hierarchy: Hierarchy, period_us: int = PERIOD_US) -> None:
        self.pid, self.tids, self.hierarchy, self.period_us = pid, tids, hierarchy, period_us
        self.level = 0.0
        self._group: _Group | None = None
        self._lock = asyncio.Lock()

    @classmethod
    async def open(
        cls, session: QmpPeer, pid: int, period_us: int = PERIOD_US, hierarchies: list[Hierarchy] | None = None
    ) -> CgroupThrottle:
        """Find QEMU's vCPU threads and a cgroup hierarchy that can hold them; nothing stays
        changed (`ThrottleError` naming why each hierarchy failed)."""
        if not MIN_QUOTA_US * 10 <= period_us <= 1_000_000:
            raise ThrottleError(f"a CFS period of {period_us} us: choose 10 ms to 1 s")
        tids = await vcpu_threads(session, pid)
        found = cpu_hierarchies() if hierarchies is None else hierarchies
        hierarchy = await asyncio.to_thread(_usable, found, pid, tids, period_us)
        return cls(pid, tids, hierarchy, period_us)

    def quota_us(self, level: float) -> int | None:
        """Level L -> (1 - L) of the period, at least the kernel's 1 ms; None (no limit) at 0."""
        if not 0 <= level < 1:
            raise ThrottleError(f"a throttle level is a share of vCPU time in [0, 1), got {level}")
        if level == 0:
            return None
        return max(MIN_QUOTA_US, round((1 - level) * self.period_us))

    async def set(self, level: float) -> None:
        quota = self.quota_us(level)
        async with self._lock:
            work = asyncio.ensure_future(asyncio.to_thread(self._set, quota))
            try:
                await asyncio.shield(work)
            except asyncio.CancelledError:
                await asyncio.wait({work})  # the thread runs on: a release must come after it
                raise
            self.level = level

    def _set(self, quota: int | None) -> None:
        if self._group is None:
            if quota is None:
                return
            group = _group(self.hierarchy, self.pid, self.tids, self.period_us)
            try:
                group.create()
            except BaseException:
                group.remove()
                raise
            self._group = group
        self._group.limit(quota)

    async def release(self) -> None:
        """The limit lifted, every thread back in its cgroup, the child removed; safe to call
        again, and what could not be undone is tried again then (the error says what)."""
        async with self._lock:
            group, self.level = self._group, 0.0
            if group is not None:
                problems = await asyncio.to_thread(group.remove)
                if group.child is None:
                    self._group = None
                if problems:
                    raise ThrottleError("; ".join(problems))


@asynccontextmanager
async def vcpu_throttle(session: QmpPeer, pid: int) -> AsyncIterator[CgroupThrottle]:
    """A throttle of QEMU's vCPUs, released on every way out."""
    throttle = await CgroupThrottle.open(session, pid)
    try:
        yield throttle
    finally:
        await throttle.release()
