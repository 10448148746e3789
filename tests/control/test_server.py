"""The control socket against the QEMU doubles, through qemu.qmp's QMPClient: greeting and
negotiation, every command, events in QEMU's order, steering mid-way, and what is refused."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from orchestrator.control.commands import Context
from orchestrator.control.errors import CommandError, ControlError
from orchestrator.control.registry import Migrations
from orchestrator.control.server import ControlServer
from orchestrator.migration.driver import GuestHome, Migration
from tests.fakes.rig import OPTIONS, Rig

from .conftest import Pace, client_of, served

pytestmark = pytest.mark.timeout(30)
MakeRig = Callable[..., Rig]
#: Never converges by itself, cancels at its cap: any switchover is the client's doing.
STUBBORN = dataclasses.replace(OPTIONS, max_rounds=12, on_limit="cancel")
#: Converges at the first decision unless someone lowers the limit first.
EASY = dataclasses.replace(STUBBORN, downtime_limit_ms=60_000)
PER_MIGRATION = ["query-migrate", "migrate-set-parameters", "query-migrate-parameters", "migrate_cancel"]


async def refused(client: QMPClient, command: str, **arguments: Any) -> ExecuteError:
    with pytest.raises(ExecuteError) as caught:
        await client.execute(command, arguments)
    return caught.value


async def test_greeting_negotiation_and_the_command_list(make_rig: MakeRig, short_dir: Path) -> None:
    async with served(make_rig(), short_dir) as s:
        greeting = s.client.greeting
        assert greeting is not None and greeting.QMP.capabilities == []
        assert str(greeting.QMP.version["package"]).startswith("orchestrator ")
        names = [c["name"] for c in await s.client.execute("query-commands")]
        assert names == ["qmp_capabilities", *PER_MIGRATION, "x-orch-force-switchover", "query-commands"]
        # a command of serve only is not there
        err = await refused(s.client, "x-orch-migrate", **{"src-qmp": "a"})
        assert err.error_class == "CommandNotFound"
        err = await refused(s.client, "no-such-command")
        assert err.error_class == "CommandNotFound" and "no-such-command" in err.error.error.desc


async def test_query_migrate_every_round_and_events_in_qemus_order(make_rig: MakeRig, short_dir: Path) -> None:
    async with served(make_rig(), short_dir) as s:
        before = await s.client.execute("query-migrate")
        assert before["status"] == "setup" and before["ram"]["remaining"] == before["ram"]["total"]
        infos: list[tuple[int, dict[str, Any]]] = []

        async def query(n: int) -> None:
            infos.append((n, await s.client.execute("query-migrate")))

        run = s.run()
        events = await s.drive(query)
        rep = await run
        assert rep.ok and [n for n, _ in infos] == list(range(len(rep.rounds)))
        for n, info in infos:
            assert info["ram"]["dirty-sync-count"] == n + 1  # the migration waits for the next go
            assert info["ram"]["transferred"] == sum(r.sent_bytes for r in rep.rounds[: n + 1])
            assert info["status"] in ("active", "pre-switchover")
        statuses = [e["data"]["status"] for e in events if e["event"] == "MIGRATION"]
        assert statuses == ["active", "pre-switchover", "device", "completed"]
        passes = [e["data"]["pass"] for e in events if e["event"] == "MIGRATION_PASS"]
        assert passes == list(range(len(rep.rounds)))
        names = {e["event"] for e in events}
        assert {"ORCH_STEP", "ORCH_DECISION", "ORCH_TRACKER", "ORCH_HARVEST"} <= names
        assert all(set(e["timestamp"]) == {"seconds", "microseconds"} for e in events)
        assert all("id" not in e["data"] for e in events)  # one migration: no ids
        end = await s.client.execute("query-migrate")
        assert end["status"] == "completed" and end["ram"]["transferred"] == rep.bytes_sent


async def test_a_limit_lowered_before_the_first_decision_holds_the_switchover_back(
    make_rig: MakeRig, short_dir: Path
) -> None:
    """EASY would switch over at round 1; lowered at round 0 it iterates to its cap (the
    source keeps the guest)."""
    async with served(make_rig(), short_dir, EASY) as s:
        assert (await s.client.execute("query-migrate-parameters"))["downtime-limit"] == 60_000

        async def lower(n: int) -> None:
            if n == 0:
                await s.client.execute("migrate-set-parameters", {"downtime-limit": 1e-6})

        run = s.run()
        events = await s.drive(lower)
        rep = await run
        assert rep.status == "cancelled" and "round cap 12" in rep.decision and rep.guest is GuestHome.SOURCE
        decisions = [e["data"]["decision"] for e in events if e["event"] == "ORCH_DECISION"]
        assert decisions == ["continue"] * 11 + ["cancel"]
        await s.rig.check_guest_home(rep)


async def test_a_control_run_of_easy_switches_at_the_first_decision(make_rig: MakeRig, short_dir: Path) -> None:
    """Negative control of the test above: the same options, nobody lowers the limit."""
    async with served(make_rig(), short_dir, EASY) as s:
        run = s.run()
        await s.drive()
        rep = await run
        assert rep.ok and len(rep.rounds) == 2 and "<= limit 60000 ms" in rep.decision  # round 0, final


async def test_a_new_limit_mid_way_switches_over_once_it_fits(make_rig: MakeRig, short_dir: Path) -> None:
    async with served(make_rig(), short_dir, STUBBORN) as s:

        async def relax(n: int) -> None:
            if n == 2:
                await s.client.execute("migrate-set-parameters", {"downtime-limit": 60_000, "max-bandwidth": 1 << 30})
                params = await s.client.execute("query-migrate-parameters")
                assert params == {"downtime-limit": 60_000, "max-bandwidth": 1 << 30}

        run = s.run()
        events = await s.drive(relax)
        rep = await run
        assert rep.ok and len(rep.rounds) == 4 and "<= limit 60000 ms" in rep.decision
        decisions = [e["data"]["decision"] for e in events if e["event"] == "ORCH_DECISION"]
        assert decisions == ["continue", "continue", "switchover"]


async def test_force_switchover(make_rig: MakeRig, short_dir: Path) -> None:
    async with served(make_rig(), short_dir, STUBBORN) as s:

        async def force(n: int) -> None:
            if n == 1:
                assert await s.client.execute("x-orch-force-switchover") == {}

        run = s.run()
        await s.drive(force)
        rep = await run
        assert rep.ok and "forced by the caller" in rep.decision and len(rep.rounds) == 3


async def test_cancel_in_precopy_leaves_the_source_running(make_rig: MakeRig, short_dir: Path) -> None:
    async with served(make_rig(), short_dir, STUBBORN) as s:

        async def cancel(n: int) -> None:
            if n == 1:
                assert await s.client.execute("migrate_cancel") == {}

        run = s.run()
        events = await s.drive(cancel)
        rep = await run
        assert rep.status == "cancelled" and rep.guest is GuestHome.SOURCE
        statuses = [e["data"]["status"] for e in events if e["event"] == "MIGRATION"]
        assert statuses == ["active", "cancelling", "cancelled"]
        await s.rig.check_guest_home(rep)
        assert await s.client.execute("migrate_cancel") == {}  # QEMU's way: nothing to cancel is no error


async def test_cancel_in_the_switchover_gives_the_source_back(make_rig: MakeRig, short_dir: Path) -> None:
    """The final collect waits until the client has tried what pre-switchover allows
    (steering refused, the bandwidth cap still taken) and cancelled."""
    async with served(make_rig(), short_dir) as s:
        run = s.run()
        async for ev in s.client.events:
            if ev["event"] == "ORCH_STEP" and ev["data"]["action"] == "Collect":
                s.collects.go()
            if ev["event"] == "MIGRATION" and ev["data"]["status"] == "pre-switchover":
                break
        err = await refused(s.client, "x-orch-force-switchover")
        assert err.error_class == "GenericError" and "the migration is pre-switchover" in err.error.error.desc
        err = await refused(s.client, "migrate-set-parameters", **{"downtime-limit": 500})
        assert "the migration is pre-switchover" in err.error.error.desc
        await s.client.execute("migrate-set-parameters", {"max-bandwidth": 0})  # the stream's cap: any time
        await s.client.execute("migrate_cancel")
        rep = await run
        assert rep.status == "cancelled" and rep.guest is GuestHome.SOURCE
        assert rep.interrupted == "before migrate-continue"
        await s.rig.check_guest_home(rep)


@pytest.mark.parametrize(
    "command,arguments,needle",
    [
        ("migrate-set-parameters", {"downtime-limit": "fast"}, "parameter 'downtime-limit' must be a number"),
        ("migrate-set-parameters", {"downtime-limit": 0}, "must be from 1e-06 to 2e+06 ms"),
        ("migrate-set-parameters", {"downtime-limit": True}, "must be a number"),
        ("migrate-set-parameters", {"max-bandwidth": -1}, "'max-bandwidth' must be from 0"),
        ("migrate-set-parameters", {"max-bandwidth": 1.5}, "must be an integer"),
        ("migrate-set-parameters", {"xbzrle-cache-size": 1}, "no parameter 'xbzrle-cache-size'"),
        ("query-migrate", {"id": "m9"}, "no migration 'm9'"),
        ("query-migrate", {"id": 1}, "'id' must be a string"),
        ("query-commands", {"x": 1}, "it takes: none"),
    ],
)
async def test_bad_arguments_are_generic_errors_naming_them(
    make_rig: MakeRig, short_dir: Path, command: str, arguments: dict[str, Any], needle: str
) -> None:
    async with served(make_rig(), short_dir) as s:
        err = await refused(s.client, command, **arguments)
        assert err.error_class == "GenericError" and needle in err.error.error.desc, err.error.error.desc
        assert (await s.client.execute("query-migrate-parameters"))["downtime-limit"] == OPTIONS.downtime_limit_ms


async def test_several_clients_at_once_each_get_the_events(make_rig: MakeRig, short_dir: Path) -> None:
    async with served(make_rig(), short_dir) as s:
        other = await client_of(s.server.path, "other")
        try:
            run = s.run()
            seen = await s.drive()
            theirs = []
            async for ev in other.events:
                theirs.append(ev["event"])
                if ev["event"] == "MIGRATION" and ev["data"]["status"] == "completed":
                    break
            assert theirs == [e["event"] for e in seen]
            assert (await other.execute("query-migrate"))["status"] == "completed"
            assert (await run).ok
        finally:
            await other.disconnect()


async def test_socket_and_directory_are_private_and_removed(make_rig: MakeRig, short_dir: Path) -> None:
    path = short_dir / "made" / "q.sock"
    server = ControlServer(path, Context(Migrations()))
    async with server:
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600 and stat.S_ISSOCK(os.lstat(path).st_mode)
        with pytest.raises(ControlError, match="exists: another control socket"):
            await ControlServer(path, Context(Migrations())).start()
    assert not path.parent.exists()
    # A private directory that was there stays; only the socket goes.
    kept = short_dir / "kept"
    kept.mkdir(mode=0o700)
    async with ControlServer(kept / "q.sock", Context(Migrations())):
        assert (kept / "q.sock").exists()
    assert kept.exists() and list(kept.iterdir()) == []


@pytest.mark.parametrize("mode", [0o750, 0o701])
async def test_a_directory_others_can_enter_is_refused(short_dir: Path, mode: int) -> None:
    shared = short_dir / "shared"
    shared.mkdir()
    shared.chmod(mode)
    with pytest.raises(ControlError, match="is not private"):
        await ControlServer(shared / "q.sock", Context(Migrations())).start()
    assert list(shared.iterdir()) == []


async def test_a_path_too_long_or_without_parent_is_refused(short_dir: Path) -> None:
    with pytest.raises(ControlError, match="longer than 107 bytes"):
        await ControlServer(short_dir / ("x" * 120) / "q.sock", Context(Migrations())).start()
    with pytest.raises(ControlError, match="its parent is missing"):
        await ControlServer(short_dir / "a" / "b" / "q.sock", Context(Migrations())).start()


async def test_no_migration_yet_is_a_clear_error(short_dir: Path) -> None:
    async with ControlServer(short_dir / "c" / "q.sock", Context(Migrations())) as server:
        client = await client_of(server.path)
        try:
            err = await refused(client, "query-migrate")
            assert err.error_class == "GenericError" and err.error.error.desc == "no migration has been started"
        finally:
            await client.disconnect()


async def test_a_serving_socket_starts_migrations_and_tags_their_events(make_rig: MakeRig, short_dir: Path) -> None:
    """With a launcher, x-orch-migrate starts one (its arguments checked for type first),
    per-migration commands take its id, events carry it."""
    rigs: list[Rig] = []
    runs: list[asyncio.Task[Any]] = []
    paces: list[Pace] = []
    given: list[dict[str, Any]] = []

    async def launch(arguments: dict[str, Any]) -> Migration:
        if arguments["src-qmp"] == "bad":
            raise CommandError("x-orch-migrate: the source QMP socket bad does not exist")
        given.append(arguments)
        rigs.append(make_rig())
        mig = rigs[-1].migration(STUBBORN)
        paces.append(Pace(mig.trackers, "collect"))  # each waits before its first decision
        runs.append(asyncio.ensure_future(mig.run()))
        return mig

    migrations = Migrations()
    async with ControlServer(short_dir / "c" / "q.sock", Context(migrations, launch), tag_ids=True) as server:
        client = await client_of(server.path)
        try:
            names = [c["name"] for c in await client.execute("query-commands")]
            assert "x-orch-migrate" in names and "x-orch-query-migrations" in names
            err = await refused(client, "x-orch-migrate", **{"dst-qmp": "d", "src-ram": "r"})
            assert err.error_class == "GenericError" and "parameter 'src-qmp' is missing" in err.error.error.desc
            err = await refused(
                client, "x-orch-migrate", **{"src-qmp": "s", "dst-qmp": "d", "src-ram": "r", "json": "-"}
            )
            assert "no parameter 'json'" in err.error.error.desc
            err = await refused(client, "x-orch-migrate", **{"src-qmp": "bad", "dst-qmp": "d", "src-ram": "r"})
            assert "does not exist" in err.error.error.desc
            assert given == [] and len(migrations) == 0
            args = {"src-qmp": "s", "dst-qmp": "d", "src-ram": "r", "dst-ram": "x", "verify": True}
            first = await client.execute("x-orch-migrate", args)
            second = await client.execute("x-orch-migrate", {**args, "downtime-limit": 2.5})
            assert (first, second) == ({"id": "m1"}, {"id": "m2"}) and given[1]["downtime-limit"] == 2.5
            await client.execute("migrate_cancel", {"id": "m1"})
            await client.execute("x-orch-force-switchover")  # no id: the latest, m2
            for pace in paces:
                for _ in range(STUBBORN.max_rounds + 1):
                    pace.go()
            ended: dict[str, str] = {}
            async for ev in client.events:
                assert ev["data"]["id"] in ("m1", "m2")
                if ev["event"] == "MIGRATION" and ev["data"]["status"] in ("completed", "cancelled"):
                    ended[ev["data"]["id"]] = ev["data"]["status"]
                    if len(ended) == 2:
                        break
            assert ended == {"m1": "cancelled", "m2": "completed"}
            listed = await client.execute("x-orch-query-migrations")
            assert [(m["id"], m["status"], m["guest"]) for m in listed] == [
                ("m1", "cancelled", "source"),
                ("m2", "completed", "destination"),
            ]
            assert listed[0]["src-qmp"] == str(rigs[0].src.socket_path)
            assert (await client.execute("query-migrate", {"id": "m1"}))["status"] == "cancelled"
        finally:
            await client.disconnect()
    await asyncio.gather(*runs)


async def test_a_symlinked_directory_is_refused_even_to_a_private_one(short_dir: Path) -> None:
    """The attack: a link someone else could repoint, here at a private directory of ours."""
    private = short_dir / "private"
    private.mkdir(mode=0o700)
    link = short_dir / "link"
    link.symlink_to(private)
    with pytest.raises(ControlError, match="is a symbolic link"):
        await ControlServer(link / "q.sock", Context(Migrations())).start()
    dangling = short_dir / "dangling"
    dangling.symlink_to(short_dir / "nowhere")
    with pytest.raises(ControlError, match="is a symbolic link"):
        await ControlServer(dangling / "q.sock", Context(Migrations())).start()
    assert list(private.iterdir()) == [] and not (short_dir / "nowhere").exists()
    async with ControlServer(private / "q.sock", Context(Migrations())):  # the directory itself is fine
        assert stat.S_ISSOCK(os.lstat(private / "q.sock").st_mode)


async def test_a_directory_swapped_before_the_bind_is_refused(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked, then replaced by a link before the socket is bound: the server notices after
    the bind, removes its socket from the directory it checked and leaves the other alone."""
    from orchestrator.control import server as server_module

    made, elsewhere = short_dir / "made", short_dir / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    bind = server_module.asyncio.start_unix_server

    async def swapped(*args: Any, **kwargs: Any) -> asyncio.Server:
        os.rename(made, short_dir / "moved")
        made.symlink_to(elsewhere)
        return await bind(*args, **kwargs)

    monkeypatch.setattr(server_module.asyncio, "start_unix_server", swapped)
    with pytest.raises(ControlError, match="was replaced while the socket was made"):
        await ControlServer(made / "q.sock", Context(Migrations())).start()
    assert list(elsewhere.iterdir()) == [], "the socket bound through the link is not left there"
    assert list((short_dir / "moved").iterdir()) == []
