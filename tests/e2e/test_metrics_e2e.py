"""Metrics and progress on real migrations: `/metrics` scraped while two QEMUs migrate a busy
guest, a receiver counting the connections of a sender with the wrong token and of one with
the right token (`receive --metrics`, `migrate --progress json`), and a quiet demo."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import threading
from pathlib import Path

import pytest

from orchestrator.app.metrics import Metrics, serving
from orchestrator.lab.demo import guest_pair, wait_progress
from orchestrator.lab.launcher import Role, VmConfig, launch
from orchestrator.lab.workload import GUEST_ELF, WORKLOADS
from orchestrator.migration.driver import MigrationOptions
from orchestrator.migration.events import EventName, MigrationEvent
from orchestrator.transport.auth import write_token
from orchestrator.transport.endpoint import Endpoint, parse_endpoint
from tests.app.scrape import Series, counters, scrape, value

from .conftest import REPO

pytestmark = pytest.mark.slow
MEM = 128 << 20


def poll(where: Endpoint, stop: threading.Event) -> list[dict[Series, float]]:
    """Scrape as a Prometheus server would, only much more often, until told to stop."""
    seen = []
    while not stop.is_set():
        seen.append(scrape(where))
        stop.wait(0.02)
    return seen


async def test_metrics_follow_a_real_migration_and_end_equal_to_its_report():
    async with guest_pair("light", MEM) as pair:
        mig = pair.migration(MigrationOptions(verify=True))
        metrics = Metrics()
        metrics.attach(mig)
        at_pass: list[tuple[int, dict[Series, float]]] = []
        with serving(metrics, Endpoint("127.0.0.1", 0)) as where:

            def on_pass(ev: MigrationEvent) -> None:
                if ev.name is EventName.MIGRATION_PASS:
                    at_pass.append((ev.data["sent_pages"], scrape(where)))

            mig.listen(on_pass)
            stop = threading.Event()
            poller = asyncio.ensure_future(asyncio.to_thread(poll, where, stop))
            try:
                rep = await mig.run()
            finally:
                stop.set()
                polled = await poller
            final = scrape(where)
    assert rep.ok and rep.verified is True, rep.error
    sent = 0
    for n, (pages, samples) in enumerate(at_pass):
        sent += pages
        assert value(samples, "orchestrator_rounds_total") == n + 1
        assert value(samples, "orchestrator_sent_pages_total") == sent
    for earlier, later in zip(polled, [*polled[1:], final], strict=True):
        now = counters(later)
        assert all(now[k] >= v for k, v in counters(earlier).items()), "a counter went down"
    assert len({value(s, "orchestrator_sent_pages_total") for s in polled}) > 1, "the counters moved while it ran"
    assert value(final, "orchestrator_sent_pages_total") == rep.pages_sent
    assert value(final, "orchestrator_sent_bytes_total") == rep.bytes_sent
    assert value(final, "orchestrator_rounds_total") == len(rep.rounds)
    assert value(final, "orchestrator_migrations_total", outcome="completed") == 1
    assert value(final, "orchestrator_migrations_total", outcome="failed") == 0
    assert value(final, "orchestrator_migration_status", migration="1", status="completed") == 1
    assert value(final, "orchestrator_downtime_seconds_count") == 1
    assert value(final, "orchestrator_downtime_seconds_sum") == pytest.approx(rep.downtime_ms / 1e3)
    for t in rep.trackers:
        assert value(final, "orchestrator_tracker_errors_total", tracker=t.name) == t.errors
        assert value(final, "orchestrator_tracker_fallbacks_total", tracker=t.name) == t.fallbacks
        assert value(final, "orchestrator_tracker_state", migration="1", tracker=t.name, state="stopped") == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def orchestrator(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator",
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def announced(proc: asyncio.subprocess.Process, *prefixes: str) -> dict[str, str]:
    """The first stdout line starting with each prefix (what a command says when it is up)."""
    found: dict[str, str] = {}
    while len(found) < len(prefixes):
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line, f"the command ended before saying {prefixes}"
        for p in prefixes:
            if line.startswith(p) and p not in found:
                found[p] = line.removeprefix(p).split()[0]
    return found


async def test_receiver_counts_a_wrong_token_and_a_migration_over_the_cli(tmp_path: Path):
    token, wrong = tmp_path / "token", tmp_path / "wrong"
    write_token(token)
    write_token(wrong)
    src_qmp, dst_qmp, report_path = tmp_path / "src.qmp", tmp_path / "dst.qmp", tmp_path / "report.json"
    append = WORKLOADS["light"].replace("32M", "16M")
    src_cfg = VmConfig(
        "src", 128, kernel=GUEST_ELF, append=append, extra_args=("-qmp", f"unix:{src_qmp},server=on,wait=off")
    )
    dst_cfg = VmConfig(
        "dst", 128, Role.DESTINATION, kernel=GUEST_ELF, extra_args=("-qmp", f"unix:{dst_qmp},server=on,wait=off")
    )
    async with launch(src_cfg) as src, launch(dst_cfg) as dst:
        await wait_progress(src, 1, 60)
        receiver = await orchestrator(
            "receive",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--ram",
            str(dst.ram_path),
            "--token-file",
            str(token),
        )
        try:
            said = await announced(receiver, "receiving on ", "metrics: http://")
            listening = said["receiving on "]
            where = parse_endpoint(said["metrics: http://"].removesuffix("/metrics"))
            assert value(scrape(where), "orchestrator_receiver_connections_total") == 0

            def migrate(token_file: Path, *more: str):
                return orchestrator(
                    "migrate",
                    "--src-qmp",
                    str(src_qmp),
                    "--dst-qmp",
                    str(dst_qmp),
                    "--src-ram",
                    str(src.ram_path),
                    "--dst-receiver",
                    listening,
                    "--token-file",
                    str(token_file),
                    "--uri",
                    f"tcp:127.0.0.1:{free_port()}",
                    "--streams",
                    "2",
                    *more,
                )

            refused = await migrate(wrong)
            out, err = await asyncio.wait_for(refused.communicate(), 60)
            assert refused.returncode == 2 and b"authentication failed" in err, err.decode()
            after_refusal = scrape(where)
            failures = value(after_refusal, "orchestrator_receiver_auth_failures_total")
            assert failures >= 1
            # Every lane connected; the sender may drop the others once the first is refused.
            assert value(after_refusal, "orchestrator_receiver_connections_total") >= failures
            connected = value(after_refusal, "orchestrator_receiver_connections_total")

            accepted = await migrate(token, "--verify", "--progress", "json", "--json", str(report_path))
            out, err = await asyncio.wait_for(accepted.communicate(), 240)
            assert accepted.returncode == 0, err.decode()
            served = scrape(where)
        finally:
            if receiver.returncode is None:
                receiver.send_signal(signal.SIGTERM)
            await asyncio.wait_for(receiver.communicate(), 30)
    assert receiver.returncode == 0
    assert value(served, "orchestrator_receiver_auth_failures_total") == failures, "the right token is no failure"
    assert value(served, "orchestrator_receiver_connections_total") >= connected + 2  # both lanes of the migration
    lines = [json.loads(line) for line in out.decode().splitlines()]
    report = json.loads(report_path.read_text())
    assert report["status"] == "completed" and report["verified"] is True, report["error"]
    assert lines[-1]["name"] == "SUMMARY"
    summary = lines[-1]["data"]
    assert (summary["status"], summary["pages_sent"], summary["rounds"]) == (
        "completed",
        report["pages_sent"],
        len(report["rounds"]),
    )
    passes = [line["data"] for line in lines if line["name"] == "MIGRATION_PASS"]
    assert [p["pass"] for p in passes] == list(range(len(report["rounds"])))
    assert sum(p["sent_pages"] for p in passes) == report["pages_sent"]


async def test_a_quiet_demo_prints_nothing_on_stdout(tmp_path: Path):
    report_path = tmp_path / "report.json"
    demo = await orchestrator(
        "demo", "-q", "--workload", "idle", "--mem", "128M", "--devices", "none", "--json", str(report_path)
    )
    out, err = await asyncio.wait_for(demo.communicate(), 240)
    assert demo.returncode == 0, err.decode()
    assert out == b""
    assert json.loads(report_path.read_text())["status"] == "completed"
