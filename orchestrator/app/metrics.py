"""Prometheus metrics of migrations and receivers, in a registry of their own.

Every number comes from what a migration already tells its watchers: counters move on its
events (`MIGRATION_PASS` for pages, bytes and rounds; `MIGRATION` for the outcome), gauges
are refreshed from `info()` on each event, and tracker counters follow the tracker set's own
counts, so a scrape agrees with the final report. Nothing here is global: each `Metrics`
owns a `CollectorRegistry`, so tests and a long-running process that attaches migration after
migration (`serve`) never clash. Updates happen on the event loop's thread; the HTTP server
reads them from its own (prometheus_client's metrics lock for that).
"""

from __future__ import annotations

import contextlib
import math
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, make_wsgi_app
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer

from orchestrator.migration.driver import Migration, Watch
from orchestrator.migration.engine.sequence import JobStatus, Phase
from orchestrator.migration.events import EventName, MigrationEvent
from orchestrator.migration.info import MigrationInfo
from orchestrator.trackers.events import TrackerState, TrackerStats
from orchestrator.transport.endpoint import Endpoint
from orchestrator.transport.receiver import Receiver

#: How a migration ends, as `orchestrator_migrations_total{outcome}` counts it.
OUTCOMES = (JobStatus.COMPLETED, JobStatus.CANCELLED, JobStatus.FAILED)
#: Final downtimes, in seconds: from a few milliseconds (an idle guest) to a stalled switchover.
DOWNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0)
#: How many migrations' gauges a long-running process keeps exporting (their counts add up forever).
KEPT_MIGRATIONS = 32
#: The events after which the gauges are read again from `info()`.
REFRESHING = (EventName.MIGRATION, EventName.MIGRATION_PASS, EventName.DECISION, EventName.TRACKER)
#: How often the HTTP server's thread looks for the request to stop: bounds the wait on exit.
_POLL_S = 0.05


class _ReceiverCollector:
    """Reads the receivers' own counters at scrape time (the transport knows nothing of
    Prometheus); receivers that have closed keep counting in the totals."""

    def __init__(self) -> None:
        self.receivers: list[Receiver] = []

    def describe(self) -> list[CounterMetricFamily]:
        return self._families()

    def collect(self) -> list[CounterMetricFamily]:
        return self._families()

    def _families(self) -> list[CounterMetricFamily]:
        counts = [r.counters for r in self.receivers]
        return [
            CounterMetricFamily(
                "orchestrator_receiver_connections",
                "Connections a page-stream receiver accepted, authenticated or not",
                sum(c.connections for c in counts),
            ),
            CounterMetricFamily(
                "orchestrator_receiver_auth_failures",
                "Connections a receiver refused for a wrong token proof or a replayed nonce",
                sum(c.auth_failures for c in counts),
            ),
        ]


class Metrics:
    """The metrics of one process. `attach` (or `watch`, a `Watch`) feeds a migration into
    them; `add_receiver` exports a receiver's counters. Counters add up over every migration
    attached; gauges are per migration, labelled `migration` with its number in this process
    (1, 2, ...), the last `KEPT_MIGRATIONS` of them kept."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.migrations = Counter(
            "orchestrator_migrations", "Migrations ended, by how they ended", ["outcome"], registry=r
        )
        for outcome in OUTCOMES:
            self.migrations.labels(outcome.value)
        self.status = Gauge(
            "orchestrator_migration_status",
            "1 for each migration's status (QEMU's MigrationStatus values), 0 for the others",
            ["migration", "status"],
            registry=r,
        )
        self.sent_bytes = Counter("orchestrator_sent_bytes", "Bytes of guest pages sent", registry=r)
        self.sent_pages = Counter("orchestrator_sent_pages", "Guest pages sent", registry=r)
        self.rounds = Counter("orchestrator_rounds", "Rounds sent, round 0 and the final copy included", registry=r)
        self.dirty_rate = Gauge(
            "orchestrator_dirty_pages_per_second",
            "Pages the trackers found dirty per second, last round",
            ["migration"],
            registry=r,
        )
        self.expected_downtime = Gauge(
            "orchestrator_expected_downtime_seconds",
            "What the final copy would take now (NaN until a bandwidth is measured)",
            ["migration"],
            registry=r,
        )
        self.downtime_limit = Gauge(
            "orchestrator_downtime_limit_seconds",
            "The policy's downtime limit (NaN: its policy has none)",
            ["migration"],
            registry=r,
        )
        self.downtime = Histogram(
            "orchestrator_downtime_seconds",
            "Measured downtime of each completed migration (source STOP to destination RESUME)",
            buckets=DOWNTIME_BUCKETS,
            registry=r,
        )
        self.ram_total = Gauge("orchestrator_ram_total_bytes", "The migration's guest RAM", ["migration"], registry=r)
        self.ram_remaining = Gauge(
            "orchestrator_ram_remaining_bytes",
            "Bytes known dirty and not sent yet (all of RAM before round 0)",
            ["migration"],
            registry=r,
        )
        self.tracker_errors = Counter(
            "orchestrator_tracker_errors", "Failed tracker calls (start, report, restart)", ["tracker"], registry=r
        )
        self.tracker_fallbacks = Counter(
            "orchestrator_tracker_fallbacks",
            "Times a tracker's whole range was marked dirty instead of reported",
            ["tracker"],
            registry=r,
        )
        self.tracker_restarts = Counter(
            "orchestrator_tracker_restarts", "Successful tracker restarts after a failure", ["tracker"], registry=r
        )
        self.tracker_state = Gauge(
            "orchestrator_tracker_state",
            "1 for each tracker's current state in each migration",
            ["migration", "tracker", "state"],
            registry=r,
        )
        self._receivers = _ReceiverCollector()
        r.register(self._receivers)
        self._attached = 0
        self._kept: list[_Feed] = []  # whose gauge series are still exported, oldest first

    def attach(self, mig: Migration) -> None:
        """Feed `mig`'s events into these metrics from now on (before `run()` to see it all)."""
        self._feed(mig)

    @contextlib.asynccontextmanager
    async def watch(self, mig: Migration) -> AsyncIterator[Metrics]:
        """`attach` as a `Watch`; on the way out the outcome is counted even if `run()` ended
        without a final status."""
        feed = self._feed(mig)
        try:
            yield self
        finally:
            feed.finish()

    def _feed(self, mig: Migration) -> _Feed:
        self._attached += 1
        feed = _Feed(self, mig, str(self._attached))
        self._kept.append(feed)
        if len(self._kept) > KEPT_MIGRATIONS:  # a long-running serve: the oldest's gauges go
            self._kept.pop(0).forget()
        mig.listen(feed)
        feed.refresh(mig.info())
        return feed

    def add_receiver(self, receiver: Receiver) -> None:
        self._receivers.receivers.append(receiver)

    def exposition(self) -> bytes:
        """What `/metrics` serves, in Prometheus' text format."""
        return bytes(generate_latest(self.registry))


@dataclass
class _Feed:
    """One migration's contribution: what of its tracker counts is already added, and
    whether its outcome has been counted."""

    metrics: Metrics
    mig: Migration
    name: str  # the `migration` label of its gauges
    counted: dict[int, TrackerStats] = field(default_factory=dict)
    ended: bool = False

    def __call__(self, ev: MigrationEvent) -> None:
        m = self.metrics
        if ev.name is EventName.MIGRATION_PASS:
            m.rounds.inc()
            m.sent_pages.inc(ev.data["sent_pages"])
            m.sent_bytes.inc(ev.data["sent_bytes"])
        if ev.name not in REFRESHING:
            return  # steps and harvests change nothing a gauge shows: no info() in the downtime for them
        info = self.mig.info()
        self.refresh(info)
        if ev.name is EventName.MIGRATION and info.status in OUTCOMES:
            self._end(info.status, info.downtime_ms)

    def refresh(self, info: MigrationInfo) -> None:
        m, n = self.metrics, self.name
        for status in JobStatus:
            m.status.labels(n, status.value).set(1 if status is info.status else 0)
        m.dirty_rate.labels(n).set(info.ram.dirty_pages_rate)
        expected = info.expected_downtime_ms
        m.expected_downtime.labels(n).set(math.nan if expected is None else expected / 1e3)
        m.downtime_limit.labels(n).set(math.nan if info.downtime_limit_ms is None else info.downtime_limit_ms / 1e3)
        m.ram_total.labels(n).set(info.ram.total)
        m.ram_remaining.labels(n).set(info.ram.remaining)
        self._trackers(info.trackers)

    def forget(self) -> None:
        """Stop exporting this migration's gauges (its counts stay in the totals)."""
        m, n = self.metrics, self.name
        for status in JobStatus:
            m.status.remove(n, status.value)
        for gauge in (m.dirty_rate, m.expected_downtime, m.downtime_limit, m.ram_total, m.ram_remaining):
            gauge.remove(n)
        for stats in self.counted.values():
            for state in TrackerState:
                m.tracker_state.remove(n, stats.name, state.value)

    def _trackers(self, stats: tuple[TrackerStats, ...]) -> None:
        """Add what each tracker counted since the last look (the set's counts only grow)."""
        m = self.metrics
        for i, now in enumerate(stats):
            before = self.counted.get(i, TrackerStats(now.name, now.kind))
            m.tracker_errors.labels(now.name).inc(now.errors - before.errors)
            m.tracker_fallbacks.labels(now.name).inc(now.fallbacks - before.fallbacks)
            m.tracker_restarts.labels(now.name).inc(now.restarts - before.restarts)
            for state in TrackerState:
                m.tracker_state.labels(self.name, now.name, state.value).set(1 if state is now.state else 0)
            self.counted[i] = now

    def _end(self, outcome: JobStatus, downtime_ms: float | None) -> None:
        if self.ended:
            return
        self.ended = True
        self.metrics.migrations.labels(outcome.value).inc()
        if outcome is JobStatus.COMPLETED and downtime_ms is not None:
            self.metrics.downtime.observe(downtime_ms / 1e3)

    def finish(self) -> None:
        """The watch's exit: a migration that ran but sent no final status (something raised
        out of `run()`) ended all the same, and failed; one that never ran ended nothing."""
        info = self.mig.info()
        self.refresh(info)
        if not self.ended and self.mig.sequence.phase is not Phase.IDLE:
            status = JobStatus(self.mig.report.status.value)
            self._end(status if status in OUTCOMES else JobStatus.FAILED, info.downtime_ms)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """A scrape is not news: nothing on stderr per request."""


def _server_class(host: str) -> type[WSGIServer]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})


@contextlib.contextmanager
def serving(metrics: Metrics, where: Endpoint) -> Iterator[Endpoint]:
    """Serve `metrics` over HTTP at `where` (port 0: any free one) until the block ends;
    yields the bound address. A port in use or a host that does not resolve is the OSError
    the bind raised, before anything is served."""
    server = make_server(where.host, where.port, make_wsgi_app(metrics.registry), _server_class(where.host), _Quiet)
    thread = threading.Thread(
        target=server.serve_forever, args=(_POLL_S,), name="metrics-http", daemon=True
    )  # daemon: a scrape in flight never holds up the exit
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield Endpoint(str(host), int(port))
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def metrics_watch(where: Endpoint, notice: Callable[[str], None]) -> Watch:
    """For a one-migration command: fresh metrics served at `where` while the migration runs,
    their address told through `notice`; the server stops when the migration has ended."""

    @contextlib.asynccontextmanager
    async def watch(mig: Migration) -> AsyncIterator[Metrics]:
        metrics = Metrics()
        with serving(metrics, where) as bound:
            notice(f"metrics: http://{bound}/metrics")
            async with metrics.watch(mig):
                yield metrics

    return watch


@contextlib.contextmanager
def receiver_metrics(receiver: Receiver, where: Endpoint | None) -> Iterator[Endpoint | None]:
    """For `receive --metrics`: the receiver's counters served at `where` (None: not asked)."""
    if where is None:
        yield None
        return
    metrics = Metrics()
    metrics.add_receiver(receiver)
    with serving(metrics, where) as bound:
        yield bound
