"""W(t) from a probe trace, against hand-counted unions: a sweep whose working set grows with
the window and then stays, a hot set that does not grow, and what is not a probe refused; and
the probe command's own checks, made before it connects to anything."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.app.cli import EXIT_BAD_INPUT, main
from orchestrator.experiments.errors import ExperimentError
from orchestrator.experiments.trace import Harvest, Trace, TraceHeader, TraceKind
from orchestrator.experiments.workingset import working_set, working_set_of

NPAGES = 1000


def sweep(periods: int, per_period: int, wss: int) -> list[Harvest]:
    """A guest writing `per_period` pages a period in order through `wss` pages, wrapping."""
    return [
        Harvest(0.5 * (i + 1), 0.5, np.sort(np.arange(i * per_period, (i + 1) * per_period) % wss))
        for i in range(periods)
    ]


def test_a_sweep_grows_until_it_has_covered_its_working_set() -> None:
    points = working_set(sweep(8, 100, 300), NPAGES, 0.5)
    assert [p.periods for p in points] == list(range(1, 9))
    assert [p.window_s for p in points[:3]] == [0.5, 1.0, 1.5]
    assert [p.mean_pages for p in points] == [100, 200, 300, 300, 300, 300, 300, 300]
    assert [p.windows for p in points] == [8, 7, 6, 5, 4, 3, 2, 1]
    assert points[0].rate_bytes_per_s(4096) == 100 * 4096 / 0.5


def test_a_hot_set_does_not_grow_and_windows_average() -> None:
    hot = np.arange(10, 20)
    harvests = [Harvest(float(i), 1.0, hot if i % 2 else np.array([], np.int64)) for i in range(4)]
    points = working_set(harvests, NPAGES, 1.0, [1, 2, 4])
    assert [(p.mean_pages, p.max_pages) for p in points] == [(5.0, 10), (10.0, 10), (10.0, 10)]


def test_what_is_not_a_probe_is_refused() -> None:
    migration = Trace(TraceHeader(TraceKind.MIGRATION, 4096, NPAGES * 4096, NPAGES), [])
    with pytest.raises(ExperimentError, match="probe trace"):
        working_set_of(migration)
    empty = Trace(TraceHeader(TraceKind.PROBE, 4096, NPAGES * 4096, NPAGES, period_s=0.5), [])
    with pytest.raises(ExperimentError, match="no harvests"):
        working_set_of(empty)
    with pytest.raises(ExperimentError, match="windows of"):
        working_set(sweep(2, 10, 50), NPAGES, 0.5, [3])


@pytest.mark.parametrize(
    ("more", "message"),
    [
        (["--duration", "1", "--period", "2"], "longer than --duration"),
        (["--duration", "0"], "--duration must be"),
        (["--duration", "1", "--period", "nan"], "--period must be"),
    ],
)
def test_probe_arguments_are_checked_before_anything(tmp_path, capsys, more, message) -> None:
    argv = ["probe", "--qmp", str(tmp_path / "none.sock"), "--ram", str(tmp_path / "ram"), "--trace"]
    assert main([*argv, str(tmp_path / "t.jsonl"), *more]) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not (tmp_path / "t.jsonl").exists()
    assert main([*argv, str(tmp_path), "--duration", "1"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "--trace" in err and "is a directory" in err
