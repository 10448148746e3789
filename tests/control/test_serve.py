"""`serve`: x-orch-migrate's arguments become the `migrate` command's options, bad ones are
the command's error with nothing started, and the process stops on a signal leaving nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from orchestrator.app.checks import InputError
from orchestrator.app.serve import Service, migrate_args
from orchestrator.control.arguments import Kind
from orchestrator.control.commands import MIGRATE_PARAMETERS
from orchestrator.control.errors import CommandError

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[2]
REQUIRED = {"src-qmp": "/s.qmp", "dst-qmp": "/d.qmp", "src-ram": "/s.ram"}
#: A value each parameter's option takes (choices where it has them).
SAMPLE = {"tracker": "content", "on-limit": "force", "policy": "downtime", "set": ["max_rounds=3"]}
BY_KIND = {Kind.STRING: "/p", Kind.INTEGER: 3, Kind.NUMBER: 1.5, Kind.BOOLEAN: True, Kind.STRINGS: ["/p", "/q"]}


def test_arguments_become_the_migrate_commands_options() -> None:
    args = migrate_args(
        {**REQUIRED, "dst-ram": "/d.ram", "verify": True, "trust-seccomp": False, "vfio-device": ["/v0", "/v1"]}
        | {"downtime-limit": 2.5, "max-rounds": 7, "on-limit": "force"}
    )
    assert (args.src_qmp, args.dst_ram, args.vfio_device) == (
        Path("/s.qmp"),
        Path("/d.ram"),
        [Path("/v0"), Path("/v1")],
    )
    assert args.verify is True and args.trust_seccomp is False
    assert (args.downtime_limit, args.max_rounds, args.on_limit) == (2.5, 7, "force")
    assert args.max_time == migrate_args({**REQUIRED, "dst-ram": "/d"}).max_time  # the command line's default


@pytest.mark.parametrize("param", MIGRATE_PARAMETERS, ids=lambda p: p.name)
def test_every_parameter_is_an_option_of_migrate(param) -> None:
    """The parameter table and the command line cannot drift apart."""
    value = SAMPLE.get(param.name, BY_KIND[param.kind])
    place = {} if param.name in ("dst-ram", "dst-receiver") else {"dst-ram": "/d"}
    args = migrate_args({**REQUIRED, **place, param.name: value})
    got = getattr(args, param.name.replace("-", "_"))
    assert got is not None and got is not False


@pytest.mark.parametrize(
    "extra,needle",
    [
        ({}, "one of the arguments --dst-ram --dst-receiver is required"),
        ({"dst-ram": "/d", "tracker": "bogus"}, "invalid choice: 'bogus'"),
        ({"dst-ram": "/d", "max-rounds": "x"}, "invalid int value"),
    ],
)
def test_what_the_command_line_refuses_is_an_input_error(extra: dict[str, Any], needle: str) -> None:
    with pytest.raises(InputError, match=needle):
        migrate_args({**REQUIRED, **extra})


async def test_a_launch_that_cannot_attach_is_the_commands_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    said: list[str] = []
    service = Service(said.append)
    args = {**REQUIRED, "src-qmp": str(tmp_path / "none.qmp"), "dst-ram": str(tmp_path / "d")}
    with pytest.raises(CommandError, match=r"x-orch-migrate: .*none\.qmp"):
        await service.launch(args)
    with pytest.raises(CommandError, match="--downtime-limit must be a finite number"):
        await service.launch({**args, "downtime-limit": -1})
    await asyncio.sleep(0)
    assert service.running == {} and list(tmp_path.iterdir()) == [] and said == []


class Serve:
    def __init__(self, sock: Path) -> None:
        self.sock = sock

    async def __aenter__(self) -> Serve:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "orchestrator",
            "serve",
            "--control",
            str(self.sock),
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        assert line.decode().strip() == f"serving QMP on {self.sock}", line
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
async def test_serve_answers_until_a_signal_and_removes_everything(short_dir: Path, sig: signal.Signals) -> None:
    sock = short_dir / "serve" / "q.sock"
    async with Serve(sock) as serve:
        assert oct(os.stat(sock.parent).st_mode & 0o777) == "0o700"
        client = QMPClient("stack")
        await client.connect(str(sock))
        names = {c["name"] for c in await client.execute("query-commands")}
        assert {"x-orch-migrate", "x-orch-query-migrations", "query-migrate"} <= names
        assert await client.execute("x-orch-query-migrations") == []
        with pytest.raises(ExecuteError) as err:
            await client.execute("x-orch-migrate", {**REQUIRED, "dst-ram": "/d"})
        assert err.value.error_class == "GenericError" and "/s.qmp" in err.value.error.error.desc
        assert await client.execute("x-orch-query-migrations") == []
        serve.proc.send_signal(sig)
        assert await asyncio.wait_for(serve.proc.wait(), 30) == 0
        with pytest.raises(EOFError):  # the server hung up on it: qemu.qmp says so at disconnect
            await client.disconnect()
    assert not sock.parent.exists()


@pytest.mark.parametrize("name", ["control", "metrics", "progress", "quiet", "plot"])
def test_options_of_the_whole_server_are_refused_per_migration(name: str) -> None:
    with pytest.raises(InputError, match=f"{name}: serve's own"):
        migrate_args({**REQUIRED, "dst-ram": "/d", name: "x"})


async def test_a_start_while_stopping_is_refused_and_stop_waits_for_every_task() -> None:
    service = Service(lambda _: None)
    await service.stop()
    with pytest.raises(CommandError, match="the server is stopping"):
        await service.launch({**REQUIRED, "dst-ram": "/d"})
    assert service.running == {}
