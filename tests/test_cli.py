"""Argument errors are reported before the CLI touches any QEMU (the sockets here do not
exist, so reaching for them would be a different error)."""

import os
import socket
import subprocess
from contextlib import asynccontextmanager

import pytest

from orchestrator.app.cli import EXIT_BAD_INPUT, main


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--dst-receiver", "127.0.0.1:1"], "--dst-receiver needs --token-file"),
        (
            ["--dst-ram", "/nope-dst", "--max-rounds", "0"],
            "--max-rounds must be a finite number of rounds above 0, not 0",
        ),
        (
            ["--dst-ram", "/nope-dst", "--on-limit", "cancel", "--downtime-limit", "-1"],
            "--downtime-limit must be a finite number of milliseconds above 0",
        ),
        (
            ["--dst-ram", "/nope-dst", "--downtime-limit", "nan"],
            "--downtime-limit must be a finite number of milliseconds above 0, not nan",
        ),
        (
            ["--dst-ram", "/nope-dst", "--downtime-limit", "inf"],
            "--downtime-limit must be a finite number of milliseconds above 0, not inf",
        ),
        (
            ["--dst-ram", "/nope-dst", "--max-time", "nan"],
            "--max-time must be a finite number of seconds above 0, not nan",
        ),
        (
            ["--dst-ram", "/nope-dst", "--json", "/nope-dir/report.json"],
            "--json /nope-dir/report.json cannot be written (No such file",
        ),
        (["--dst-ram", "/nope-dst", "--json", "/"], "--json / is a directory"),
        (
            ["--dst-ram", "/nope-dst", "--streams", "0"],
            "--streams must be a finite number of connections above 0, not 0",
        ),
        (
            ["--dst-ram", "/nope-dst", "--max-bandwidth", "0"],
            "--max-bandwidth must be a finite number of bytes per second above 0, not 0",
        ),
    ],
)
def test_migrate_argument_errors_come_first(extra, needle, capsys):
    code = main(["migrate", "--src-qmp", "/nope-src.sock", "--dst-qmp", "/nope-dst.sock", "--src-ram", "/nope", *extra])
    assert code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert needle in err and "does not exist" not in err


def test_demo_rejects_unknown_device_and_fault(capsys):
    assert main(["demo", "--devices", "mlx5,gpu"]) == EXIT_BAD_INPUT
    assert "unknown device kinds ['gpu']" in capsys.readouterr().err
    assert main(["demo", "--inject", "meteor@mlx5-0:1"]) == EXIT_BAD_INPUT
    assert "unknown fault 'meteor'" in capsys.readouterr().err
    assert main(["demo", "--inject", "detach@gpu-7:1"]) == EXIT_BAD_INPUT
    assert "aimed at 'gpu-7'; devices will be mlx5-0, pds-1" in capsys.readouterr().err


def test_demo_input_errors_launch_nothing(monkeypatch, capsys):
    import orchestrator.lab.demo as demo

    def no_launch(*a, **k):
        raise AssertionError("a QEMU was launched despite bad input")

    monkeypatch.setattr(demo, "launch", no_launch)
    assert main(["demo", "--devices", "mlx5,gpu"]) == EXIT_BAD_INPUT
    assert main(["demo", "--inject", "detach@gpu-7:1"]) == EXIT_BAD_INPUT


def test_demo_runs_both_vms_on_the_qemu_it_is_given(monkeypatch, capsys):
    import orchestrator.lab.demo as demo
    from orchestrator.lab.launcher import Role

    binaries = []

    @asynccontextmanager
    async def record(config, **kwargs):
        binaries.append(config.qemu_binary)
        if config.role is Role.DESTINATION:
            raise OSError("not launched here")
        yield None

    monkeypatch.setattr(demo, "launch", record)
    monkeypatch.setattr(demo, "check_fixtures", lambda *args: None)
    argv = ["demo", "--tracker", "content", "--devices", "none", "--qemu", "/opt/qemu-10/qemu-system-x86_64"]
    assert main(argv) == EXIT_BAD_INPUT
    assert binaries == ["/opt/qemu-10/qemu-system-x86_64"] * 2


def lock(directory, locked: bool) -> None:
    """Make a directory unwritable; root writes through permission bits, so it gets an
    immutable one."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i" if locked else "-i", str(directory)], check=True)
    else:
        directory.chmod(0o500 if locked else 0o700)


def test_unwritable_json_is_refused_first(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    lock(locked, True)
    try:
        code = main(
            [
                "migrate",
                "--src-qmp",
                "/nope-src.sock",
                "--dst-qmp",
                "/nope-dst.sock",
                "--src-ram",
                "/nope",
                "--dst-ram",
                "/nope-dst",
                "--json",
                str(locked / "r.json"),
            ]
        )
    finally:
        lock(locked, False)
    assert code == EXIT_BAD_INPUT
    assert f"--json {locked / 'r.json'} cannot be written" in capsys.readouterr().err
    assert not (locked / "r.json").exists()


def test_the_same_qmp_socket_twice_is_named(tmp_path, capsys):
    sock = tmp_path / "qmp.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock))
        code = main(
            [
                "migrate",
                "--src-qmp",
                str(sock),
                "--dst-qmp",
                str(tmp_path / "." / "qmp.sock"),
                "--src-ram",
                "/nope",
                "--dst-ram",
                "/nope-dst",
            ]
        )
    assert code == EXIT_BAD_INPUT
    assert "--src-qmp and --dst-qmp are the same socket" in capsys.readouterr().err


def test_receive_refuses_a_world_readable_ram_file(tmp_path, capsys):
    ram = tmp_path / "ram"
    ram.write_bytes(bytes(4096))
    ram.chmod(0o644)
    token = tmp_path / "token"
    token.write_bytes(b"x" * 32)
    token.chmod(0o600)
    code = main(["receive", "--listen", "127.0.0.1:0", "--ram", str(ram), "--token-file", str(token)])
    assert code == EXIT_BAD_INPUT
    assert f"destination RAM file {ram} is open to every local user (mode 0644)" in capsys.readouterr().err


def test_each_package_error_root_is_bad_input_and_a_stray_valueerror_is_not(monkeypatch, capsys):
    """The CLI maps the packages' error roots to exit 2; a ValueError from elsewhere is a
    bug, not bad input, and is not swallowed into a tidy 'error:' line."""
    from orchestrator.app import cli
    from orchestrator.trackers.errors import TrackerSetupError
    from orchestrator.transport.errors import TransportError

    for exc in (TrackerSetupError("no plugin"), TransportError("no receiver")):

        async def fails(args, exc=exc):
            raise exc

        monkeypatch.setattr(cli, "vcpu_log_command", fails)
        assert main(["vcpu-log", "--mem", "64M", "/nope"]) == EXIT_BAD_INPUT
        assert str(exc) in capsys.readouterr().err

    async def bug(args):
        raise ValueError("a bug")

    monkeypatch.setattr(cli, "vcpu_log_command", bug)
    with pytest.raises(ValueError, match="a bug"):
        main(["vcpu-log", "--mem", "64M", "/nope"])
