import os
import uuid
from pathlib import Path

import numpy as np
import pytest

from orchestrator.dirty.memory import MemoryLayout
from orchestrator.writewatch import WriteWatch, WriteWatchRefused
from orchestrator.writewatch.watch import kernel_features


def _available() -> str | None:
    if os.geteuid() != 0:
        return "write-watch tests need root (ptrace and kernel-mode userfaultfd)"
    try:
        kernel_features()
    except WriteWatchRefused as exc:
        return str(exc)
    return None


@pytest.fixture(scope="session")
def writewatch_kernel():
    why = _available()
    if why:
        pytest.skip(why)


@pytest.fixture
def shared_file(writewatch_kernel):
    """A 16 MiB RAM-like file in shared memory, removed afterwards."""
    path = Path("/dev/shm") / f"orchestrator-test-{uuid.uuid4().hex}"
    with open(path, "wb") as f:
        f.truncate(16 << 20)
    yield path
    path.unlink(missing_ok=True)


def collect(watch: WriteWatch) -> np.ndarray:
    """One harvest as sorted unique guest page numbers."""
    runs: list[np.ndarray] = []
    watch.scan(lambda first, stop: runs.extend(np.arange(a, b) for a, b in zip(first, stop, strict=False)))
    return np.unique(np.concatenate(runs)) if runs else np.empty(0, np.int64)


def flat(path: Path, gpa: int = 0) -> MemoryLayout:
    from orchestrator.dirty.memory import RamRegion

    return MemoryLayout((RamRegion(gpa, path.stat().st_size, str(path)),))


@pytest.fixture
def hugetlb_file(writewatch_kernel, tmp_path):
    """A 16 MiB file on hugetlbfs (2 MiB pages), reserving the pages for the test only."""
    import subprocess

    nr = Path("/proc/sys/vm/nr_hugepages")
    before = int(nr.read_text())
    nr.write_text(str(before + 8))
    if int(Path("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages").read_text()) < 8:
        nr.write_text(str(before))
        pytest.skip("the kernel could not reserve 8 huge pages")
    mnt = tmp_path / "huge"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", str(mnt)], check=True)
    path = mnt / "ram"
    try:
        with open(path, "wb") as f:
            f.truncate(16 << 20)
        yield path
    finally:
        path.unlink(missing_ok=True)
        subprocess.run(["umount", str(mnt)], check=False)
        nr.write_text(str(before))
