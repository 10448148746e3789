"""A signal stops a `sweep` the way it stops every command: exit status 1 with the signal
named, no traceback, no table half-written and no worker process left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SPEC = """
[[scenario]]
workload = "heavy"
[grid]
downtime_limit_s = [{limits}]
"""


def children(pid: int) -> set[int]:
    """The processes `pid` started that are still there."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.update(int(c) for c in (task / "children").read_text().split())
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_sweep_stops_it_like_any_command(tmp_path, sig):
    spec, table = tmp_path / "s.toml", tmp_path / "t.csv"
    spec.write_text(SPEC.format(limits=", ".join(f"{0.001 * (i + 1):.3f}" for i in range(2000))))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "orchestrator", "sweep", str(spec), "--out", str(table), "--jobs", "2"]
    # In a session of its own, so a SIGINT can go to the whole process group as a terminal's Ctrl-C does.
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("sweep: 2000 simulations")
        workers: set[int] = set()
        while len(workers) < 2 and proc.poll() is None:
            workers = children(proc.pid)
            time.sleep(0.05)
        assert len(workers) >= 2, "the sweep runs in worker processes"
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # the workers get it too
        else:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1, err
    assert f"interrupted by {sig.name}" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert not table.exists(), "a stopped sweep writes no table"
    assert not [w for w in workers if alive(w)], "no worker outlives the sweep"
