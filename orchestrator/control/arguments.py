"""Checking a command's `arguments` against what it takes, before the command does anything:
a wrong name, a missing one or a wrong type is refused with the parameter's name."""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.control.errors import CommandError


class Kind(enum.Enum):
    STRING = "a string"
    INTEGER = "an integer"
    NUMBER = "a number"
    BOOLEAN = "a boolean"
    STRINGS = "an array of strings"

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool):
            return self is Kind.BOOLEAN
        match self:
            case Kind.STRING:
                return isinstance(value, str)
            case Kind.INTEGER:
                return isinstance(value, int)
            case Kind.NUMBER:
                return isinstance(value, (int, float)) and math.isfinite(value)
            case Kind.STRINGS:
                return isinstance(value, list) and all(isinstance(v, str) for v in value)
        return False


@dataclass(frozen=True)
class Param:
    name: str
    kind: Kind
    required: bool = False
    minimum: float | None = None  # inclusive bounds of a number
    maximum: float | None = None
    unit: str = ""


def checked(command: str, params: Sequence[Param], arguments: dict[str, Any]) -> dict[str, Any]:
    """`arguments` if `command` takes them all, as they are; `CommandError` naming the first
    parameter that is unknown, missing, of the wrong type or out of range."""
    known = {p.name: p for p in params}
    for name in arguments:
        if name not in known:
            takes = ", ".join(known) or "none"
            raise CommandError(f"{command}: no parameter '{name}' (it takes: {takes})")
    for p in params:
        if p.name not in arguments:
            if p.required:
                raise CommandError(f"{command}: parameter '{p.name}' is missing")
            continue
        value = arguments[p.name]
        if not p.kind.accepts(value):
            raise CommandError(f"{command}: parameter '{p.name}' must be {p.kind.value}, not {value!r}")
        if (p.minimum is not None and value < p.minimum) or (p.maximum is not None and value > p.maximum):
            low = "" if p.minimum is None else f"from {p.minimum:g}"
            high = "" if p.maximum is None else f"to {p.maximum:g}"
            unit = f" {p.unit}" if p.unit else ""
            raise CommandError(
                f"{command}: parameter '{p.name}' must be {' '.join(filter(None, (low, high)))}{unit}, not {value!r}"
            )
    return arguments
