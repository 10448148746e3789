"""Sweeps: the spec's checks, and at least 200 simulations run locally and on a Dask cluster
the test starts, with the same rows either way, written as a table and a plot."""

from __future__ import annotations

import pytest
from matplotlib import image

from orchestrator.experiments.errors import ExperimentError
from orchestrator.experiments.plots import plot_file, plot_sweep
from orchestrator.experiments.sweep import load_spec, parse_spec, read_table, run_dask, run_local, write_table

SPEC = """
policy = "downtime"
search = "grid"

[[scenario]]
workload = "heavy"
mem = "256M"
bandwidth = "1G"

[[scenario]]
name = "light-slow"
workload = "light"
bandwidth = "100M"

[grid]
downtime_limit_s = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0]
bandwidth_cap = ["20M", "50M", "100M", "200M", "400M", "800M", "1G", "2G", "4G", "8G"]
max_rounds = [8]
on_limit = ["force"]
"""


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(SPEC)
    return path


def test_a_sweep_locally_and_on_a_dask_cluster_gives_the_same_rows(spec_file, tmp_path):
    from distributed import LocalCluster

    spec = load_spec(spec_file)
    runs = spec.runs()
    assert len(runs) == 200
    local = run_local(runs, jobs=2)
    with LocalCluster(n_workers=2, processes=False, dashboard_address=None) as cluster:
        remote = run_dask(runs, cluster.scheduler_address)
    assert remote == local
    assert [r["index"] for r in local] == list(range(200))
    assert {r["status"] for r in local} == {"completed"}  # forced at the cap when not converged
    assert 0 < sum(r["converged"] for r in local) < 200  # both sides of the boundary are in the grid
    table = tmp_path / "sweep.csv"
    write_table(local, table)
    back = read_table(table)
    assert len(back) == 200 and back[0]["scenario"] == "heavy" and back[-1]["scenario"] == "light-slow"
    assert [r["total_ms"] for r in back] == pytest.approx([r["total_ms"] for r in local])
    png = plot_file(table, tmp_path / "sweep.png")
    h, w, _ = image.imread(png).shape
    assert h > 100 and w > 100


def test_a_random_search_is_reproducible():
    doc = {
        "policy": "nova",
        "search": "random",
        "samples": 12,
        "seed": 3,
        "scenario": [{"workload": "hotcold"}],
        "random": {
            "downtime_limit_s": {"low": 0.05, "high": 1.0, "log": True},
            "steps": {"low": 1, "high": 20, "int": True},
        },
    }
    a, b = parse_spec(doc), parse_spec(doc)
    assert a.points == b.points and len(a.runs()) == 12
    assert all(0.05 <= dict(p)["downtime_limit_s"] <= 1.0 and isinstance(dict(p)["steps"], int) for p in a.points)
    rows = run_local(a.runs(), jobs=1)
    assert len(rows) == 12 and all(r["scenario"] == "hotcold" for r in rows)


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"scenario": [{"workload": "heavy"}], "colour": 1}, "no key 'colour'"),
        ({}, "at least one [[scenario]]"),
        ({"scenario": [{"workload": "heavy", "trace": "x"}]}, "either workload"),
        ({"scenario": [{"workload": "pattern=zigzag"}]}, "zigzag"),
        ({"scenario": [{"trace": "missing.jsonl"}]}, "no trace file"),
        ({"scenario": [{"workload": "heavy"}], "grid": {"stepz": [1]}}, "'stepz' is neither"),
        ({"scenario": [{"workload": "heavy"}], "grid": {"max_rounds": [0]}}, "sweep point"),
        ({"scenario": [{"workload": "heavy"}], "grid": {"max_rounds": 3}}, "non-empty list"),
        ({"scenario": [{"workload": "heavy"}], "search": "bayes"}, "grid or random"),
        ({"scenario": [{"workload": "heavy"}], "policy": "nope"}, "no policy named"),
    ],
)
def test_bad_specs_are_refused_naming_the_problem(doc, message, tmp_path):
    with pytest.raises(ExperimentError) as err:
        parse_spec(doc, tmp_path)
    assert message in str(err.value)


def test_a_sweep_where_nothing_completed_has_no_plot(tmp_path):
    with pytest.raises(ExperimentError, match="no run of the sweep completed"):
        plot_sweep([{"scenario": "a", "total_ms": 1.0, "downtime_ms": None, "converged": False}], tmp_path / "x.png")


def _capped(search: dict) -> dict:
    return {"scenario": [{"workload": "light", "bandwidth": "1G"}], "grid": {"max_rounds": [4]}, **search}


def test_a_random_search_over_the_bandwidth_cap_runs():
    doc = _capped({"search": "random", "samples": 3, "seed": 1, "random": {"bandwidth_cap": ["100M", "1G"]}})
    spec = parse_spec(doc)
    caps = [dict(p)["bandwidth_cap"] for p in spec.points]
    assert all(isinstance(c, float) and c != int(c) for c in caps), "draws are fractional bytes per second"
    rows = run_local(spec.runs(), jobs=1)
    assert [r["bandwidth_cap"] for r in rows] == caps and {r["status"] for r in rows} <= {"completed", "cancelled"}


def test_grid_caps_may_be_numbers_and_zero_is_uncapped():
    rows = run_local(parse_spec(_capped({"grid": {"bandwidth_cap": [104857600.0, 0, "100M"]}})).runs(), jobs=1)
    uncapped = run_local(parse_spec(_capped({})).runs(), jobs=1)[0]
    by_cap = {r["bandwidth_cap"]: r for r in rows}
    assert by_cap[0]["total_ms"] == uncapped["total_ms"]
    assert by_cap[104857600.0]["total_ms"] == by_cap["100M"]["total_ms"], "a number is bytes per second"
    assert by_cap["100M"]["total_ms"] > uncapped["total_ms"], "a cap below the link slows the run"


@pytest.mark.parametrize("cap", [-1, "fast", True, float("nan"), float("inf"), [1]])
def test_a_bad_cap_is_refused_before_any_run(cap):
    with pytest.raises(ExperimentError, match=r"sweep point .*bandwidth_cap"):
        parse_spec(_capped({"grid": {"bandwidth_cap": [1e8, cap]}}))
