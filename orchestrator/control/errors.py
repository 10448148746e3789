"""The control room's error root: what a control socket refuses, with the QMP error class a
client sees."""

from __future__ import annotations

import enum


class ErrorClass(enum.StrEnum):
    """The QMP error classes this server answers with (QEMU's names, so clients branch alike)."""

    GENERIC = "GenericError"
    COMMAND_NOT_FOUND = "CommandNotFound"


class ControlError(Exception):
    """The control socket cannot do what was asked: a path that cannot serve, a bad command."""


class CommandError(ControlError):
    """A command refused, answered to its client as a QMP error of `error_class`."""

    def __init__(self, desc: str, error_class: ErrorClass = ErrorClass.GENERIC) -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class
