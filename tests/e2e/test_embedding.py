"""Embedding, end to end on real QEMU: a running migration watched and steered through the
library (`Migration.info()`, listeners, `set_parameters`, `force_switchover`, `cancel`) and
through the control socket with qemu.qmp's client (`migrate --control` and `serve`). Each
steering lands where it should (a lowered limit holds the switchover back until one fits), each
cancel leaves the source running, and nothing is left behind."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import statistics
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from orchestrator.experiments.trace import read_trace
from orchestrator.lab.demo import guest_pair, wait_progress
from orchestrator.lab.workload import parse_progress
from orchestrator.migration.driver import GuestHome, Migration, MigrationOptions
from orchestrator.migration.engine.sequence import JobStatus
from orchestrator.migration.events import EventName, MigrationEvent

from .test_cli_migrate import pair
from .test_reliability import Cli, migrate_args

pytestmark = pytest.mark.slow
MEM = 128 << 20
#: A limit no round meets, with room for many rounds: any switchover is the caller's.
NEVER_MS = 1e-6
ROOMY = MigrationOptions(downtime_limit_ms=NEVER_MS, max_rounds=400, max_time_s=120)


async def source_runs_on(qmp: Any, serial: Any) -> None:
    """The source is running and its guest still makes progress."""
    assert (await qmp.execute("query-status"))["running"]
    before = len(parse_progress(serial.read_serial()))
    await wait_progress(serial, before + 1, 30)


def on(mig: Migration, name: EventName, act: Any) -> None:
    mig.listen(lambda ev: act(ev) if ev.name is name else None)


def fits(decision: dict[str, Any], limit_ms: float) -> bool:
    return decision["expected-downtime-ms"] <= limit_ms


# -- (a) the library ------------------------------------------------------------------------
async def test_library_info_every_round_and_a_lowered_limit() -> None:
    """At the default 300 ms the first decision would switch over; the limit lowered before
    it (round 0) to one no round meets holds the migration in precopy although each round
    fits the old limit; at round 4 the limit becomes the median expected downtime so far,
    and the switchover comes at the first decision that fits it, not before."""
    async with guest_pair("light", MEM) as pair_:
        mig = pair_.migration(MigrationOptions(max_rounds=400, max_time_s=120))
        infos: list[tuple[int, Any]] = []
        decisions: list[dict[str, Any]] = []
        limits: dict[int, float] = {}  # round of the change -> new limit

        def each_round(ev: MigrationEvent) -> None:
            n = ev.data["pass"]
            infos.append((n, mig.info()))
            if n == 0:
                limits[0] = NEVER_MS
            elif n == 4:
                limits[4] = statistics.median(d["expected-downtime-ms"] for d in decisions)
            else:
                return
            mig.set_parameters(downtime_limit_ms=limits[n])

        on(mig, EventName.MIGRATION_PASS, each_round)
        on(mig, EventName.DECISION, lambda ev: decisions.append(ev.data))
        rep = await mig.run()
        assert rep.ok and rep.guest is GuestHome.DESTINATION, rep.error
        for n, info in infos:
            assert info.ram.dirty_sync_count == n + 1
            assert info.ram.transferred == sum(r.sent_bytes for r in rep.rounds[: n + 1])
        held, after = decisions[:4], decisions[4:]
        assert [d["decision"] for d in held] == ["continue"] * 4
        assert all(fits(d, 300) for d in held), "each would have switched over at the old limit"
        assert [fits(d, limits[4]) for d in after] == [d["decision"] == "switchover" for d in after]
        assert after[-1]["decision"] == "switchover" and f"<= limit {limits[4]:.0f} ms" in rep.decision
        print(f"\nlowered limit: {len(held)} rounds held, {len(after)} decisions at {limits[4]:.3f} ms")


async def test_library_force_switchover() -> None:
    async with guest_pair("light", MEM) as pair_:
        mig = pair_.migration(MigrationOptions(NEVER_MS, 400, 120, verify=True))
        on(mig, EventName.MIGRATION_PASS, lambda ev: mig.force_switchover() if ev.data["pass"] == 2 else None)
        rep = await mig.run()
        assert rep.ok and rep.verified is True and "forced by the caller" in rep.decision
        assert len(rep.rounds) == 4  # rounds 0-2, then the final copy
        assert (await pair_.dst.qmp.execute("query-status"))["status"] == "running"


@pytest.mark.parametrize("where", ["precopy", "switchover"])
async def test_library_cancel_leaves_the_source_running_and_nothing_behind(where: str) -> None:
    async with guest_pair("light", MEM) as pair_:
        mig = pair_.migration(dataclasses.replace(ROOMY, verify=True))
        if where == "precopy":
            on(mig, EventName.MIGRATION_PASS, lambda ev: mig.cancel() if ev.data["pass"] == 2 else None)
        else:  # at the final verification: QEMU has paused the source in pre-switchover
            mig.force_switchover()
            on(mig, EventName.STEP, lambda ev: mig.cancel() if ev.data["action"] == "Verify" else None)
        rep = await mig.run()
        assert rep.status == "cancelled" and rep.guest is GuestHome.SOURCE, rep.error
        assert mig.info().status is JobStatus.CANCELLED and rep.trackers[0].state == "stopped"
        if where == "switchover":
            assert rep.interrupted == "before migrate-continue"
        await source_runs_on(pair_.src.qmp, pair_.src)
        left = [pair_.src.ram_path, pair_.dst.ram_path, pair_.src.paths.workdir, pair_.dst.paths.workdir]
    assert not any(os.path.exists(p) for p in left), "RAM files, QMP and migration sockets removed"


# -- (b) the control socket -------------------------------------------------------------
async def qmp_client(sock: Path, proc: Any, timeout: float = 60) -> QMPClient:
    """Connect once the socket is there (the command makes it after attaching)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not sock.exists():
        assert proc.returncode is None, "the command ended before serving its control socket"
        assert loop.time() < deadline, f"no control socket {sock} within {timeout} s"
        await asyncio.sleep(0.01)
    client = QMPClient("stack")
    await client.connect(str(sock))
    return client


async def hang_up(client: QMPClient) -> None:
    with contextlib.suppress(EOFError, ConnectionError):  # the server may have gone first
        await client.disconnect()


@contextlib.asynccontextmanager
async def qemu_pair(tmp_path: Path) -> AsyncIterator[tuple[Any, Any, Path, Path]]:
    src_cm, dst_cm, s, d = await pair(tmp_path)
    async with src_cm as src, dst_cm as dst:
        await wait_progress(src, 1, 60)
        yield src, dst, s, d


async def test_control_socket_info_every_round_and_a_new_limit(tmp_path: Path) -> None:
    """`migrate --control`: query-migrate at every round, then a limit that fits the median
    round: the switchover comes at the first decision that fits it, not before; socket and
    directory are gone when the command exits."""
    sock = tmp_path / "ctl" / "q.sock"
    async with qemu_pair(tmp_path) as (src, dst, s, d):
        args = ("--downtime-limit", str(NEVER_MS), "--max-rounds", "400", "--max-time", "120", "--control", str(sock))
        cli = await Cli(tmp_path).start(*migrate_args(s, d, src, dst, *args))
        client = await qmp_client(sock, cli.proc)
        try:
            decisions: list[dict[str, Any]] = []
            synced: list[int] = []
            limit, changed_after = None, None
            async for ev in client.events:
                if ev["event"] == "ORCH_DECISION":
                    decisions.append(ev["data"])
                if ev["event"] == "MIGRATION_PASS":
                    info = await client.execute("query-migrate")
                    assert info["ram"]["dirty-sync-count"] >= ev["data"]["pass"] + 1
                    synced.append(info["ram"]["dirty-sync-count"])
                    if limit is None and len(decisions) >= 4:
                        limit = statistics.median(x["expected-downtime-ms"] for x in decisions)
                        await client.execute("migrate-set-parameters", {"downtime-limit": limit})
                        assert (await client.execute("query-migrate-parameters"))["downtime-limit"] == limit
                        changed_after = (await client.execute("query-migrate"))["ram"]["dirty-sync-count"]
                if ev["event"] == "MIGRATION" and ev["data"]["status"] in ("completed", "cancelled", "failed"):
                    assert ev["data"]["status"] == "completed"
                    break
        finally:
            await hang_up(client)
        assert await cli.exit_code() == 0, cli.out
        assert synced == sorted(synced) and len(synced) >= 5
        assert limit is not None and changed_after is not None
        assert decisions[-1]["decision"] == "switchover" and fits(decisions[-1], limit)
        for x in decisions:
            if x["round"] > changed_after:  # surely decided with the new limit
                assert (x["decision"] == "switchover") == fits(x, limit), x
            elif x["decision"] == "switchover":  # decided while the change was on its way
                assert x["round"] == changed_after and fits(x, limit), x
        assert not sock.parent.exists() and cli.left_behind() == []
        assert (await dst.qmp.execute("query-status"))["status"] == "running"


async def test_control_socket_cancel_in_switchover_gives_the_source_back(tmp_path: Path) -> None:
    """Forced over at a round from 2 on, the final copy slowed to a crawl by a bandwidth cap set once
    the switchover is decided, and cancelled while QEMU holds the source in pre-switchover."""
    sock = tmp_path / "ctl" / "q.sock"
    report = tmp_path / "report.json"
    async with qemu_pair(tmp_path) as (src, dst, s, d):
        args = ("--downtime-limit", str(NEVER_MS), "--max-rounds", "400", "--verify", "--json", str(report))
        cli = await Cli(tmp_path).start(*migrate_args(s, d, src, dst, *args, "--control", str(sock)))
        client = await qmp_client(sock, cli.proc)
        statuses: list[str] = []
        forced = False
        try:
            async for ev in client.events:
                if ev["event"] == "MIGRATION_PASS" and ev["data"]["pass"] >= 2 and not forced:
                    await client.execute("x-orch-force-switchover")
                    forced = True
                if ev["event"] == "ORCH_STEP" and ev["data"]["action"] == "Listen":
                    await client.execute("migrate-set-parameters", {"max-bandwidth": 64 << 10})
                if ev["event"] == "MIGRATION":
                    statuses.append(ev["data"]["status"])
                    if ev["data"]["status"] == "pre-switchover":
                        await client.execute("migrate_cancel")
                    if ev["data"]["status"] in ("cancelled", "completed", "failed"):
                        break
        finally:
            await hang_up(client)
        assert await cli.exit_code() == 1, cli.out
        assert forced and statuses[-3:] == ["pre-switchover", "cancelling", "cancelled"], statuses
        rep = json.loads(report.read_text())
        assert rep["interrupted"] == "before migrate-continue" and rep["guest"] == "source"
        await source_runs_on(src.qmp, src)
        assert not sock.parent.exists() and cli.left_behind() == []


class ServeProcess(Cli):
    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return await self.exit_code()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """The samples of /metrics by series (name and labels as written)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    series = (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {name: float(value) for name, value in series}


async def next_event(client: QMPClient, name: str, **data: Any) -> dict[str, Any]:
    async for ev in client.events:
        if ev["event"] == name and all(ev["data"].get(k) == v for k, v in data.items()):
            return dict(ev)
    raise AssertionError("events ended")


async def test_serve_cancel_in_precopy_then_a_forced_retry_on_the_same_pair(tmp_path: Path) -> None:
    """`serve`: a migration started over the socket is cancelled in precopy (the source runs,
    the destination still waits), a second one on the same pair is forced over; serve's
    metrics count both; SIGTERM then ends serve with nothing left."""
    sock = tmp_path / "srv" / "q.sock"
    port = free_port()
    async with qemu_pair(tmp_path) as (src, dst, s, d):
        serve = await ServeProcess(tmp_path).start("serve", "--control", str(sock), "--metrics", f"127.0.0.1:{port}")
        client = await qmp_client(sock, serve.proc)
        try:
            start = {"src-qmp": str(s), "dst-qmp": str(d), "src-ram": str(src.ram_path), "dst-ram": str(dst.ram_path)}
            start |= {"downtime-limit": NEVER_MS, "max-rounds": 400, "max-time": 120}
            assert await client.execute("x-orch-migrate", start) == {"id": "m1"}
            await next_event(client, "MIGRATION_PASS", id="m1", **{"pass": 2})
            await client.execute("migrate_cancel", {"id": "m1"})
            await next_event(client, "MIGRATION", id="m1", status="cancelled")
            await source_runs_on(src.qmp, src)
            assert (await dst.qmp.execute("query-status"))["status"] == "inmigrate"
            traced = {**start, "verify": True, "trace": str(tmp_path / "m2.jsonl")}
            assert await client.execute("x-orch-migrate", traced) == {"id": "m2"}
            await next_event(client, "MIGRATION_PASS", id="m2", **{"pass": 2})
            await client.execute("x-orch-force-switchover")  # no id: the latest
            await next_event(client, "MIGRATION", id="m2", status="completed")
            listed = await client.execute("x-orch-query-migrations")
            assert [(m["id"], m["status"], m["guest"]) for m in listed] == [
                ("m1", "cancelled", "source"),
                ("m2", "completed", "destination"),
            ]
            assert "forced by the caller" in (await client.execute("query-migrate"))["x-orch"]["decision"]
            scraped = await asyncio.to_thread(scrape, port)
            assert scraped['orchestrator_migrations_total{outcome="cancelled"}'] == 1
            assert scraped['orchestrator_migrations_total{outcome="completed"}'] == 1
            assert scraped["orchestrator_sent_pages_total"] > 0
        finally:
            await hang_up(client)
        assert await serve.stop() == 0, serve.out
        # closed with its migration's watches, which serve has waited for: the report is last
        end = read_trace(tmp_path / "m2.jsonl").end
        assert end is not None and end.report["status"] == "completed", "a served migration's own trace"
        assert (await dst.qmp.execute("query-status"))["status"] == "running"
        assert not sock.parent.exists() and serve.left_behind() == []
