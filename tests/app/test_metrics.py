"""Prometheus metrics against the QEMU doubles: `/metrics` scraped over HTTP while a migration
runs and after it, counters that move, never go down and end equal to the report; metrics
that outlive one migration; a receiver's connections and refused tokens; the server's life."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import socket
from collections.abc import Callable

import pytest

from orchestrator.app import metrics as metrics_module
from orchestrator.app.cli import EXIT_BAD_INPUT, main
from orchestrator.app.metrics import Metrics, metrics_watch, receiver_metrics, serving
from orchestrator.dirty.memory import MemoryLayout
from orchestrator.migration.driver import MigrationReport, run_watched
from orchestrator.migration.engine.sequence import JobStatus
from orchestrator.migration.events import EventName, MigrationEvent
from orchestrator.transport.endpoint import Endpoint
from orchestrator.transport.receiver import Receiver
from orchestrator.transport.tcp import ReceiverRefused, TcpSink
from tests.fakes.rig import OPTIONS, Rig
from tests.transport.conftest import FAST, NPAGES, PAGE, TOKEN, open_sink, ram, random_ram

from .scrape import Series, counters, scrape, value

pytestmark = pytest.mark.timeout(30)
MakeRig = Callable[..., Rig]
ANY_PORT = Endpoint("127.0.0.1", 0)


def assert_matches_report(samples: dict[Series, float], reports: list[MigrationReport]) -> None:
    """The totals of a scrape are the reports' sums."""
    assert value(samples, "orchestrator_sent_pages_total") == sum(r.pages_sent for r in reports)
    assert value(samples, "orchestrator_sent_bytes_total") == sum(r.bytes_sent for r in reports)
    assert value(samples, "orchestrator_rounds_total") == sum(len(r.rounds) for r in reports)
    for outcome in ("completed", "cancelled", "failed"):
        ended = sum(r.status.value == outcome for r in reports)
        assert value(samples, "orchestrator_migrations_total", outcome=outcome) == ended
    downtimes = [r.downtime_ms / 1e3 for r in reports if r.downtime_ms is not None]
    assert value(samples, "orchestrator_downtime_seconds_count") == len(downtimes)
    assert value(samples, "orchestrator_downtime_seconds_sum") == pytest.approx(sum(downtimes))


async def test_scrapes_during_a_migration_move_and_end_equal_to_the_report(make_rig: MakeRig) -> None:
    rig = make_rig()
    mig = rig.migration()
    metrics = Metrics()
    metrics.attach(mig)
    seen: list[tuple[MigrationEvent, dict[Series, float]]] = []
    with serving(metrics, ANY_PORT) as where:
        before = scrape(where)
        # The metrics' listener came first: at each pass a scrape sees that pass counted.
        mig.listen(lambda ev: seen.append((ev, scrape(where))) if ev.name is EventName.MIGRATION_PASS else None)
        rep = await mig.run()
        after = scrape(where)
    assert rep.ok and len(seen) == len(rep.rounds) >= 3
    assert all(v == 0 for v in counters(before).values()), "nothing counted before the migration ran"
    assert value(before, "orchestrator_migration_status", migration="1", status="setup") == 1
    sent = 0
    previous = counters(before)
    for ev, samples in seen:
        sent += ev.data["sent_pages"]
        assert value(samples, "orchestrator_rounds_total") == ev.data["pass"] + 1
        assert value(samples, "orchestrator_sent_pages_total") == sent
        now = counters(samples)
        assert all(now[k] >= v for k, v in previous.items()), "a counter went down"
        previous = now
        statuses = [value(samples, "orchestrator_migration_status", migration="1", status=s.value) for s in JobStatus]
        assert sorted(statuses) == [0] * (len(JobStatus) - 1) + [1]
        assert value(samples, "orchestrator_ram_total_bytes", migration="1") == mig.info().ram.total
    assert value(seen[0][1], "orchestrator_sent_pages_total") > 0, "round 0 already counted pages"
    assert_matches_report(after, [rep])
    assert value(after, "orchestrator_migration_status", migration="1", status="completed") == 1
    assert value(after, "orchestrator_downtime_seconds_count") == 1
    tracker = rep.trackers[0]
    assert value(after, "orchestrator_tracker_state", migration="1", tracker=tracker.name, state="stopped") == 1
    assert value(after, "orchestrator_tracker_errors_total", tracker=tracker.name) == 0
    limit = value(after, "orchestrator_downtime_limit_seconds", migration="1")
    assert limit == pytest.approx(OPTIONS.downtime_limit_ms / 1e3)


async def test_tracker_failures_are_counted_as_the_report_counts_them(make_rig: MakeRig) -> None:
    rig = make_rig(collect=["ok", errno.EIO])
    mig = rig.migration()
    metrics = Metrics()
    with serving(metrics, ANY_PORT) as where:
        rep = await run_watched(mig, [metrics.watch])
        after = scrape(where)
    t = rep.trackers[0]
    assert rep.ok and t.errors == 1 and t.restarts == 1 and t.fallbacks >= 1
    assert value(after, "orchestrator_tracker_errors_total", tracker=t.name) == t.errors
    assert value(after, "orchestrator_tracker_fallbacks_total", tracker=t.name) == t.fallbacks
    assert value(after, "orchestrator_tracker_restarts_total", tracker=t.name) == t.restarts
    assert_matches_report(after, [rep])


async def test_metrics_outlive_a_migration_and_count_only_what_is_attached(make_rig: MakeRig) -> None:
    """One registry for a long-running process: totals add up over the migrations attached to
    it, whatever their outcome; a migration nobody attached (the negative control) adds nothing."""
    metrics = Metrics()
    unattached = await make_rig().migration().run()
    assert unattached.ok and unattached.pages_sent > 0
    completed = make_rig().migration()
    metrics.attach(completed)
    first = await completed.run()
    cancelling = make_rig().migration(dataclasses.replace(OPTIONS, max_rounds=2, on_limit="cancel"))
    metrics.attach(cancelling)
    second = await cancelling.run()
    assert first.status == "completed" and second.status == "cancelled"
    with serving(metrics, ANY_PORT) as where:
        samples = scrape(where)
    assert_matches_report(samples, [first, second])
    # each migration's own gauges, side by side
    assert value(samples, "orchestrator_migration_status", migration="1", status="completed") == 1
    assert value(samples, "orchestrator_migration_status", migration="2", status="cancelled") == 1
    assert value(samples, "orchestrator_migration_status", migration="2", status="completed") == 0


async def test_a_long_running_process_keeps_the_gauges_of_its_last_migrations_only(
    make_rig: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_module, "KEPT_MIGRATIONS", 2)
    metrics = Metrics()
    reports = []
    for _ in range(3):
        mig = make_rig().migration()
        metrics.attach(mig)
        reports.append(await mig.run())
    with serving(metrics, ANY_PORT) as where:
        samples = scrape(where)
    kept = {dict(labels).get("migration") for name, labels in samples if name == "orchestrator_ram_total_bytes"}
    assert kept == {"2", "3"}, "the first one's gauges are gone"
    assert not any(dict(labels).get("migration") == "1" for _, labels in samples)
    assert value(samples, "orchestrator_migrations_total", outcome="completed") == 3, "its count stays"


def outcomes(metrics: Metrics) -> dict[str, float]:
    return {
        s.labels["outcome"]: s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == "orchestrator_migrations_total"
    }


async def test_the_watch_counts_each_outcome_once(make_rig: MakeRig) -> None:
    metrics = Metrics()
    rep = await run_watched(make_rig().migration(), [metrics.watch])
    assert rep.ok and outcomes(metrics) == {"completed": 1, "cancelled": 0, "failed": 0}


async def test_a_run_that_raises_counts_as_failed_and_one_never_run_counts_nothing(make_rig: MakeRig) -> None:
    metrics = Metrics()
    mig = make_rig().migration()
    real_send, answers = mig.sequence.send, []

    def send(event):
        answers.append(event)
        if len(answers) == 4:
            raise RuntimeError("a bug in the middle of precopy")
        return real_send(event)

    mig.sequence.send = send  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="a bug"):
        await run_watched(mig, [metrics.watch])
    assert outcomes(metrics) == {"completed": 0, "cancelled": 0, "failed": 1}

    @contextlib.asynccontextmanager
    async def refuses(mig):
        raise OSError(errno.EADDRINUSE, "port in use")
        yield

    with pytest.raises(OSError, match="port in use"):
        await run_watched(make_rig().migration(), [metrics.watch, refuses])
    assert outcomes(metrics) == {"completed": 0, "cancelled": 0, "failed": 1}


async def test_the_cli_watch_serves_while_the_migration_runs_then_stops(make_rig: MakeRig) -> None:
    notices: list[str] = []
    mig = make_rig().migration()
    scraped: list[dict[Series, float]] = []

    def scrape_once(ev: MigrationEvent) -> None:
        # Listening before the watch is entered, this scrape comes before the metrics see
        # the pass: at pass 1, round 0 alone is counted.
        if ev.name is EventName.MIGRATION_PASS and ev.data["pass"] == 1:
            url = notices[0].removeprefix("metrics: http://").removesuffix("/metrics")
            host, port = url.rsplit(":", 1)
            scraped.append(scrape(Endpoint(host, int(port))))

    mig.listen(scrape_once)
    rep = await run_watched(mig, [metrics_watch(ANY_PORT, notices.append)])
    assert rep.ok and len(notices) == 1 and notices[0].startswith("metrics: http://127.0.0.1:")
    assert value(scraped[0], "orchestrator_rounds_total") == 1
    port = int(notices[0].rsplit(":", 1)[1].removesuffix("/metrics"))
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass


def test_a_port_in_use_is_the_bind_error() -> None:
    metrics = Metrics()
    with serving(metrics, ANY_PORT) as where, pytest.raises(OSError) as exc, serving(metrics, where):
        pass
    assert exc.value.errno == errno.EADDRINUSE


async def test_receiver_counts_connections_and_refused_tokens(tmp_path) -> None:
    dst = ram(tmp_path / "dst")
    async with Receiver(str(dst), TOKEN) as receiver:
        host, port = await receiver.start("127.0.0.1", 0)
        with receiver_metrics(receiver, ANY_PORT) as where:
            assert where is not None
            start = scrape(where)
            src = tmp_path / "src"
            random_ram(src)
            layout = MemoryLayout.flat(NPAGES * PAGE)
            with pytest.raises(ReceiverRefused, match="authentication failed"):
                await TcpSink.connect(layout, str(src), Endpoint(host, port), b"not-the-token-of-this-receiver", FAST)
            refused = scrape(where)
            sink, _, _ = await open_sink(tmp_path, Endpoint(host, port))
            sink.close()
            served = scrape(where)
    assert value(start, "orchestrator_receiver_connections_total") == 0
    assert value(start, "orchestrator_receiver_auth_failures_total") == 0
    # The wrong sender opens every lane at once, and each is refused.
    assert value(refused, "orchestrator_receiver_auth_failures_total") == FAST.streams
    assert value(refused, "orchestrator_receiver_connections_total") == FAST.streams
    assert value(served, "orchestrator_receiver_auth_failures_total") == FAST.streams, "the right token is no failure"
    assert value(served, "orchestrator_receiver_connections_total") == 2 * FAST.streams


@pytest.mark.parametrize("command", ["migrate", "receive"])
def test_a_bad_metrics_address_is_bad_input(command: str, tmp_path, capsys) -> None:
    if command == "migrate":
        argv = ["migrate", "--src-qmp", "/nope-src.sock", "--dst-qmp", "/nope-dst.sock", "--src-ram", "/nope"]
        argv += ["--dst-ram", "/nope-dst"]
    else:
        token = tmp_path / "token"
        token.write_bytes(b"x" * 32)
        token.chmod(0o600)
        argv = ["receive", "--listen", "127.0.0.1:0", "--ram", str(ram(tmp_path / "dst")), "--token-file", str(token)]
    assert main([*argv, "--metrics", "localhost"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "bad address 'localhost': use HOST:PORT" in err and "does not exist" not in err
