"""The cgroup throttle against this host's real cgroups, on a process that spins a thread as a
vCPU does (QEMU's `query-cpus-fast` answered by a double): the thread goes into a child with
the quota of each level and comes back, the child gone, on every way out; what cannot be
throttled is refused before anything changes."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.qemu.throttle import (
    PERIOD_US,
    CgroupThrottle,
    Hierarchy,
    ThrottleError,
    cpu_hierarchies,
    thread_cgroup,
    vcpu_throttle,
)

SPIN = "import threading\nt = threading.Thread(target=lambda: [None for _ in iter(int, 1)])\nt.start()\nt.join()"


class FakeQemu:
    """The one QMP command the throttle asks."""

    socket_path = Path("/fake/qmp.sock")

    def __init__(self, tids: list[int]) -> None:
        self.tids = tids

    async def execute(self, command: str, /, **arguments: Any) -> Any:
        assert command == "query-cpus-fast"
        return [{"cpu-index": i, "thread-id": tid, "target": "x86_64"} for i, tid in enumerate(self.tids)]


def usable() -> list[Hierarchy]:
    """The hierarchies a throttle can be tried on here (none without root)."""
    return [h for h in cpu_hierarchies() if (h.mount / "cgroup.procs").exists()]


pytestmark = pytest.mark.skipif(not usable(), reason="no cgroup hierarchy mounted")


@pytest.fixture
def spinner() -> Iterator[tuple[int, int]]:
    """(pid, tid) of a process whose second thread spins."""
    proc = subprocess.Popen([sys.executable, "-c", SPIN])
    try:
        for _ in range(200):
            tasks = sorted(int(t.name) for t in Path(f"/proc/{proc.pid}/task").iterdir())
            if len(tasks) > 1:
                break
            time.sleep(0.01)
        yield proc.pid, tasks[-1]
    finally:
        proc.kill()
        proc.wait()


def home_of(pid: int, tid: int, h: Hierarchy) -> str:
    return thread_cgroup(pid, tid, h.version)


def quota_file(throttle: CgroupThrottle) -> str:
    group = throttle._group
    assert group is not None
    child = group.child  # type: ignore[attr-defined]
    if throttle.hierarchy.version == 2:
        return (child / "cpu.max").read_text().split()[0]
    return (child / "cpu.cfs_quota_us").read_text().strip()


async def test_levels_become_quotas_and_release_puts_everything_back(spinner) -> None:
    pid, tid = spinner
    throttle = await CgroupThrottle.open(FakeQemu([tid]), pid)
    h = throttle.hierarchy
    before = home_of(pid, tid, h)
    before_children = {p.name for p in h.directory(before).iterdir() if p.is_dir()}
    assert throttle._group is None and home_of(pid, tid, h) == before, "open changes nothing"
    await throttle.set(0.5)
    inside = home_of(pid, tid, h)
    assert inside.startswith(before.rstrip("/") + "/orchestrator-throttle-")
    assert home_of(pid, pid, h) == before, "only the vCPU thread moves"
    assert quota_file(throttle) == str(PERIOD_US // 2)
    await throttle.set(0.8)
    assert quota_file(throttle) == str(PERIOD_US // 5)
    await throttle.set(0.0)
    assert quota_file(throttle) in ("-1", "max"), "level 0: no limit"
    await throttle.release()
    assert home_of(pid, tid, h) == before
    assert {p.name for p in h.directory(before).iterdir() if p.is_dir()} == before_children, "the child is gone"
    await throttle.release()  # again: nothing left to do


async def test_a_failure_inside_still_releases(spinner) -> None:
    pid, tid = spinner
    with pytest.raises(RuntimeError, match="mid-migration"):
        async with vcpu_throttle(FakeQemu([tid]), pid) as throttle:
            before = home_of(pid, tid, throttle.hierarchy)
            await throttle.set(0.9)
            child = Path(throttle._group.child)  # type: ignore[union-attr]
            assert home_of(pid, tid, throttle.hierarchy) != before
            raise RuntimeError("mid-migration")
    assert not child.exists()
    assert home_of(pid, tid, throttle.hierarchy) == before


async def test_a_thread_that_cannot_go_home_runs_unlimited_and_a_later_release_retries(
    spinner, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.qemu import throttle as module

    pid, tid = spinner
    throttle = await CgroupThrottle.open(FakeQemu([tid]), pid)
    before = home_of(pid, tid, throttle.hierarchy)
    await throttle.set(0.9)
    real = module._move

    def refuses_home(tasks: Path, t: int) -> bool:
        if "orchestrator-throttle-" not in str(tasks):
            raise PermissionError(13, "Permission denied")
        return real(tasks, t)

    monkeypatch.setattr(module, "_move", refuses_home)
    with pytest.raises(ThrottleError, match=f"moving thread {tid} back"):
        await throttle.release()
    assert quota_file(throttle) in ("-1", "max"), "the limit is lifted before anything else"
    monkeypatch.setattr(module, "_move", real)
    await throttle.release()  # the retry finishes the job
    assert throttle._group is None and home_of(pid, tid, throttle.hierarchy) == before


async def test_a_thread_that_is_not_qemus_is_refused(spinner) -> None:
    pid, _ = spinner
    with pytest.raises(ThrottleError, match="not a thread of QEMU's process"):
        await CgroupThrottle.open(FakeQemu([1]), pid)


async def test_levels_outside_the_range_are_refused(spinner) -> None:
    pid, tid = spinner
    throttle = await CgroupThrottle.open(FakeQemu([tid]), pid)
    for bad in (1.0, -0.1):
        with pytest.raises(ThrottleError, match="share of vCPU time"):
            await throttle.set(bad)
    assert throttle._group is None
    assert throttle.quota_us(0.999) == 1000, "never below the kernel's 1 ms"


async def test_without_a_usable_hierarchy_it_refuses_naming_each(spinner, tmp_path: Path) -> None:
    pid, tid = spinner
    fake = [Hierarchy(2, tmp_path / "unified", "/"), Hierarchy(1, tmp_path / "cpu", "/")]
    with pytest.raises(ThrottleError) as err:
        await CgroupThrottle.open(FakeQemu([tid]), pid, hierarchies=fake)
    assert f"cgroup v2 at {tmp_path / 'unified'}" in str(err.value)
    assert f"cgroup v1 at {tmp_path / 'cpu'}" in str(err.value)
    assert not any(tmp_path.rglob("orchestrator-throttle-*")), "nothing left behind"
    with pytest.raises(ThrottleError, match="no cgroup v2 mount and no cgroup v1"):
        await CgroupThrottle.open(FakeQemu([tid]), pid, hierarchies=[])


def test_mountinfo_gives_v2_first_then_v1_cpu(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
        "33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct\n"
        "40 31 0:31 /machine.slice /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
    )
    found = cpu_hierarchies(info)
    assert found == [
        Hierarchy(2, Path("/sys/fs/cgroup/unified"), "/machine.slice"),
        Hierarchy(1, Path("/sys/fs/cgroup/cpu"), "/"),
    ]
    assert found[0].directory("/machine.slice/qemu") == Path("/sys/fs/cgroup/unified/qemu")
    assert found[0].directory("/user.slice") is None, "outside the mount"


async def test_the_cli_gives_an_actuator_only_to_a_throttling_policy() -> None:
    """`migrate`/`demo` enter `throttle_watch`: a policy that never throttles gets nothing; one
    that does needs a real QEMU session to find the vCPUs' process (a double is refused)."""
    import dataclasses

    from orchestrator.app.checks import InputError
    from orchestrator.app.cli import throttle_watch
    from orchestrator.migration.engine.throttling import ThrottlingPolicy
    from tests.fakes.rig import OPTIONS, Rig

    rig = Rig.build()
    try:
        plain = rig.migration()
        async with throttle_watch(plain):
            assert plain.actuator is None
        throttled = rig.migration(dataclasses.replace(OPTIONS, custom_policy=ThrottlingPolicy()))
        with pytest.raises(InputError, match="throttling policy needs the source QEMU's process"):
            async with throttle_watch(throttled):
                pass
    finally:
        await rig.close()
