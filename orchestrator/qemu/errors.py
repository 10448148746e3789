"""Typed failures of the QEMU side.

Callers branch on what went wrong (cannot reach QEMU, QEMU refused a command, QEMU died, the
guest layout is unusable, the migration failed) and every message names the socket, command,
backend or file involved, so a log line alone says what to fix.
"""

from __future__ import annotations


class QemuError(Exception):
    """Base of every failure raised by `orchestrator.qemu`."""


class QmpConnectError(QemuError):
    """The QMP socket is missing, refuses connections, or does not speak QMP."""


class QmpDisconnectedError(QemuError):
    """An established QMP connection went away (QEMU exited or closed the socket)."""


class QmpCommandError(QemuError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"QMP command '{command}' failed: {error_class}: {desc}")


class QmpTimeoutError(QemuError, TimeoutError):
    """Something awaited from QEMU did not happen in time."""


class QemuExitedError(QemuError):
    """A QEMU process exited while it was still needed."""

    def __init__(self, name: str, returncode: int, stderr: str) -> None:
        self.name = name
        self.returncode = returncode
        self.stderr = stderr
        detail = stderr.strip() or "(no stderr output)"
        super().__init__(f"QEMU '{name}' exited unexpectedly with code {returncode}: {detail}")


class LayoutError(QemuError):
    """The guest memory layout cannot be served by the orchestrator's RAM data path."""


class MigrationError(QemuError):
    """The migration cannot start, failed, or ended in a state the caller did not ask for."""
