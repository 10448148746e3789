"""Plots are PNGs with something in them, whatever kind of file they come from."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from matplotlib import image

from orchestrator.experiments.errors import ExperimentError
from orchestrator.experiments.model import GuestWorkload, LinkModel
from orchestrator.experiments.plots import plot_file, plot_report
from orchestrator.experiments.simulator import Scenario, Simulation
from orchestrator.migration.engine import DowntimePolicy
from tests.experiments.recording import record

RAM = 64 << 20


def drawn(path) -> bool:
    pixels = image.imread(path)
    h, w, _ = pixels.shape
    return h > 100 and w > 100 and np.ptp(pixels) > 0  # not one flat colour


@pytest.fixture
def run(tmp_path):
    sc = Scenario(GuestWorkload.from_command_line("pattern=random wss=16M rate=16M", RAM), RAM, link=LinkModel(5e7))
    trace = tmp_path / "run.jsonl"
    rep = asyncio.run(record(Simulation(sc, DowntimePolicy(downtime_limit_s=0.05)), trace))
    report = tmp_path / "run.json"
    report.write_text(json.dumps(rep.as_dict()))
    return report, trace


def test_a_report_and_a_trace_are_plotted(run, tmp_path):
    report, trace = run
    assert drawn(plot_file(report, tmp_path / "report.png"))
    assert drawn(plot_file(trace, tmp_path / "trace.png"))


def test_what_is_not_plottable_is_named(tmp_path):
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    with pytest.raises(ExperimentError, match="not a migration report"):
        plot_file(other, tmp_path / "x.png")
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(ExperimentError, match="neither"):
        plot_file(text, tmp_path / "x.png")
    with pytest.raises(ExperimentError, match="without rounds"):
        plot_report({"rounds": []}, tmp_path / "x.png")
