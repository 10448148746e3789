"""`simulate`, `sweep` and `plot` from the command line, and `--policy`/`--set` on migrate/demo."""

from __future__ import annotations

import json

import pytest

from orchestrator.app import cli
from orchestrator.migration.engine import DowntimePolicy, OnLimit, PolicyError
from orchestrator.migration.engine.policies import DowntimeRamp

REPORT_KEYS = {"status", "total_ms", "downtime_ms", "rounds", "bytes_sent", "decision"}


def test_simulate_prints_migrates_report(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    args = ["simulate", "--workload", "light", "--bandwidth", "100M", "--json", str(out), "--plot", str(png)]
    assert cli.main(args) == 0
    report = json.loads(out.read_text())
    assert report.keys() >= REPORT_KEYS and report["status"] == "completed"
    assert png.stat().st_size > 0
    capsys.readouterr()
    assert cli.main(["simulate", "--workload", "heavy", "--policy", "nova", "--set", "steps=3", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] in ("completed", "cancelled")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workload", "heavy", "--set", "stepz=1"], "no setting 'stepz'"),
        (["--workload", "heavy", "--policy", "nova", "--max-rounds", "3"], "--max-rounds does not apply"),
        (["--workload", "pattern=zigzag"], "zigzag"),
        (["--workload", "heavy", "--bandwidth", "0"], "--bandwidth"),
        (["--workload", "heavy", "--recorded"], "needs --trace"),
        (["--trace", "/nonexistent/trace.jsonl"], "trace.jsonl"),
    ],
)
def test_simulate_refuses_bad_input_with_exit_2(args, message, capsys):
    assert cli.main(["simulate", *args]) == 2
    assert message in capsys.readouterr().err


def test_sweep_and_plot_commands(tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text('[[scenario]]\nworkload = "sweep"\n[grid]\ndowntime_limit_s = [0.01, 0.3]\n')
    table, png = tmp_path / "t.csv", tmp_path / "t.png"
    assert cli.main(["sweep", str(spec), "--out", str(table), "--plot", str(png), "--jobs", "1"]) == 0
    assert table.read_text().count("\n") == 3 and png.stat().st_size > 0
    assert cli.main(["plot", str(table), "--out-dir", str(tmp_path / "")]) == 0
    assert (tmp_path / "t.png").stat().st_size > 0
    spec.write_text("policy = 3\n[[[")
    assert cli.main(["sweep", str(spec), "--out", str(table)]) == 2
    assert "not TOML" in capsys.readouterr().err


def options(*argv: str):
    args = cli.parser().parse_args(["demo", *argv])
    return cli.options_from(args, False)


def test_migrate_and_demo_take_a_policy_by_name():
    assert options().custom_policy is None and options().policy() == DowntimePolicy()
    assert options("--downtime-limit", "100").policy() == DowntimePolicy(downtime_limit_s=0.1)
    chosen = options("--policy", "nova", "--set", "steps=5", "--downtime-limit", "800", "--on-limit", "force")
    assert chosen.custom_policy == DowntimeRamp(downtime_limit_s=0.8, steps=5, on_limit=OnLimit.FORCE)
    assert options("--set", "max_rounds=4").custom_policy == DowntimePolicy(max_rounds=4)
    with pytest.raises(PolicyError, match="--max-time does not apply to policy 'nova'"):
        options("--policy", "nova", "--max-time", "10")


def test_simulate_json_on_stdout_is_the_report_alone_with_a_plot(tmp_path, capsys):
    png = tmp_path / "r.png"
    assert cli.main(["simulate", "--workload", "light", "--json", "-", "--plot", str(png)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["status"] == "completed", "stdout parses as one JSON document"
    assert f"plot: {png}" in err and png.stat().st_size > 0
