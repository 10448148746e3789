"""What people (and programs) watching a terminal see of a migration against the doubles: the
JSON stream parses and ends with the summary, the live panel shows its fields, text is the
classic lines, quiet is silent, and auto picks by whether the output is a terminal."""

from __future__ import annotations

import errno
import io
import json
import sys
from collections.abc import Callable

import pytest
from rich.console import Console

from orchestrator.app import progress
from orchestrator.app.cli import display_from, parser
from orchestrator.app.output import event_line, round_line
from orchestrator.app.progress import NOTE, SUMMARY, Display, ProgressMode, choose, live_panel
from orchestrator.migration.driver import run_watched
from orchestrator.migration.events import EventName, MigrationEvent
from orchestrator.migration.info import MigrationInfo
from tests.fakes.rig import OPTIONS, Rig

pytestmark = pytest.mark.timeout(30)
MakeRig = Callable[..., Rig]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_json_lines_parse_follow_the_events_and_end_with_the_summary(make_rig: MakeRig) -> None:
    out = io.StringIO()
    display = Display(ProgressMode.JSON, out)
    mig = make_rig().migration()
    rep = await run_watched(mig, [display.watch])
    display.note("a word from the command")
    display.summary(rep, ["a line only text shows"], {"device_checks": {}})
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    events, note, last = lines[:-2], lines[-2], lines[-1]
    assert [e["name"] for e in events] == [ev.name.value for ev in mig.events.history]
    assert [e["data"]["pass"] for e in events if e["name"] == "MIGRATION_PASS"] == list(range(len(rep.rounds)))
    elapsed = [e["elapsed_s"] for e in events]
    assert elapsed == sorted(elapsed)
    assert all(set(e["timestamp"]) == {"seconds", "microseconds"} for e in events)
    assert note == {"name": NOTE, "data": {"text": "a word from the command"}}
    assert last["name"] == SUMMARY
    data = last["data"]
    assert data["status"] == "completed" and data["guest"] == "destination" and data["device_checks"] == {}
    assert (data["pages_sent"], data["bytes_sent"], data["rounds"]) == (rep.pages_sent, rep.bytes_sent, len(rep.rounds))
    assert data["trackers"][0]["state"] == "stopped"


async def test_text_is_the_round_and_tracker_lines_from_the_events(make_rig: MakeRig) -> None:
    out = io.StringIO()
    display = Display(ProgressMode.TEXT, out)
    rep = await run_watched(make_rig(collect=["ok", errno.EIO]).migration(), [display.watch])
    expected = io.StringIO()
    for rec in rep.rounds:
        round_line(rec, expected)
    printed = out.getvalue().splitlines()
    assert [line for line in printed if line.startswith("round")] == expected.getvalue().splitlines()
    tracker_lines = io.StringIO()
    for ev in rep.events:
        event_line(ev, tracker_lines)
    assert [line for line in printed if line.startswith("  [")] == tracker_lines.getvalue().splitlines()
    assert any("report-error" in line for line in printed), "the failure is shown as it happens"
    display.summary(rep, ["device x: fine"])
    assert "status:     completed" in out.getvalue() and out.getvalue().endswith("device x: fine\n")


async def test_live_shows_the_fields_and_leaves_the_last_panel(make_rig: MakeRig) -> None:
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=160)
    display = Display(ProgressMode.LIVE, io.StringIO(), console)
    rig = make_rig(collect=["ok", errno.EIO])
    mig = rig.migration()
    rep = await run_watched(mig, [display.watch])
    shown = screen.getvalue()
    assert "\x1b[" in shown, "drawn for a terminal"
    for field in ("status", "round", "% of RAM sent", "dirty rate", "expected", "limit", "tracker", "decision"):
        assert field in shown, field
    assert "completed" in shown and f"measured {rep.downtime_ms:.1f} ms" in shown
    assert "report-error" in shown, "a tracker failure is printed above the panel"


async def test_the_panel_is_never_drawn_while_the_guest_is_stopped(
    make_rig: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A redraw costs milliseconds of the loop's thread: in the switchover they would be downtime."""
    drawn: list[str] = []
    mig = make_rig().migration()
    real = progress.live_panel
    monkeypatch.setattr(progress, "live_panel", lambda info: drawn.append(mig.sequence.job_status.value) or real(info))
    monkeypatch.setattr(progress, "LIVE_REFRESH_S", 0.001)  # the ticker too
    display = Display(ProgressMode.LIVE, io.StringIO(), Console(file=io.StringIO(), force_terminal=True))
    rep = await run_watched(mig, [display.watch])
    assert rep.ok and "active" in drawn and "completed" in drawn
    assert not {"pre-switchover", "device"} & set(drawn), drawn


async def test_the_panel_tells_one_moment(make_rig: MakeRig) -> None:
    mig = make_rig().migration()
    moments: list[MigrationInfo] = []

    def keep(ev: MigrationEvent) -> None:
        if ev.name is EventName.MIGRATION_PASS and ev.data["pass"] == 1:
            moments.append(mig.info())

    mig.listen(keep)
    await mig.run()
    info = moments[0]
    out = io.StringIO()
    Console(file=out, width=160, color_system=None).print(live_panel(info))
    text = out.getvalue()
    assert f"rounds      {info.ram.dirty_sync_count}" in text
    assert f"{info.ram.transferred / info.ram.total:.0%} of RAM sent" in text
    assert f"{info.ram.dirty_pages_rate:.0f} pages/s" in text
    limit = OPTIONS.downtime_limit_ms
    assert f"expected {info.expected_downtime_ms:.1f} ms / limit {limit:.1f} ms" in text
    assert "guest: running" in text and info.status.value in text


async def test_quiet_prints_nothing(make_rig: MakeRig) -> None:
    stdout, stderr = io.StringIO(), io.StringIO()
    display = choose(ProgressMode.JSON, True, False, stdout, stderr)
    rep = await run_watched(make_rig().migration(), [display.watch])
    display.note("the banner")
    display.summary(rep, ["a demo line"], {"device_checks": {}})
    assert rep.ok and display.mode is ProgressMode.QUIET
    assert stdout.getvalue() == "" and stderr.getvalue() == ""


@pytest.mark.parametrize(
    "out,mode,expected",
    [
        (io.StringIO, ProgressMode.AUTO, ProgressMode.TEXT),
        (Terminal, ProgressMode.AUTO, ProgressMode.LIVE),
        (Terminal, ProgressMode.TEXT, ProgressMode.TEXT),
        (io.StringIO, ProgressMode.LIVE, ProgressMode.LIVE),
        (io.StringIO, ProgressMode.JSON, ProgressMode.JSON),
    ],
)
def test_auto_picks_live_only_on_a_terminal(out: type[io.StringIO], mode: ProgressMode, expected: ProgressMode) -> None:
    assert choose(mode, False, False, out(), io.StringIO()).mode is expected


def test_a_report_on_stdout_sends_the_display_to_stderr() -> None:
    stdout, stderr = Terminal(), io.StringIO()
    display = choose(ProgressMode.AUTO, False, True, stdout, stderr)
    assert display.out is stderr and display.mode is ProgressMode.TEXT  # stderr is no terminal here
    display.note("said")
    assert stdout.getvalue() == "" and stderr.getvalue() == "said\n"


def test_the_cli_options_choose_the_display(capsys) -> None:
    base = ["demo", "--devices", "none"]
    assert display_from(parser().parse_args([*base, "--progress", "json"])).mode is ProgressMode.JSON
    assert display_from(parser().parse_args([*base, "--progress", "json", "-q"])).mode is ProgressMode.QUIET
    assert display_from(parser().parse_args(base)).mode is ProgressMode.TEXT  # pytest's stdout is no terminal
    to_stderr = display_from(parser().parse_args([*base, "--json", "-", "--progress", "json"]))
    assert to_stderr.mode is ProgressMode.JSON and to_stderr.out is sys.stderr
    with pytest.raises(SystemExit) as exc:
        parser().parse_args([*base, "--progress", "quiet"])
    assert exc.value.code == 2 and "invalid choice: 'quiet'" in capsys.readouterr().err


def test_json_lines_are_strict_json_even_for_an_estimate_without_bandwidth() -> None:
    ev = MigrationEvent(EventName.DECISION, {"expected-downtime-ms": float("inf"), "x": float("nan")}, 0.5)
    line = progress.event_json(ev)
    assert json.loads(line)["data"] == {"expected-downtime-ms": None, "x": None}
    assert "Infinity" not in line and "NaN" not in line
