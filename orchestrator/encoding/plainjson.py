"""Strict JSON from the values the orchestrator reports.

Python's `json` writes NaN and Infinity by default, which no other JSON parser accepts; an
estimate with no bandwidth yet is infinite. Every place that writes JSON for others (the
control socket's QMP, trace files) converts through `jsonable` first, so they agree on what a
value becomes."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Any


def jsonable(value: Any) -> Any:
    """`value` in JSON's own types: an enum as its value, a tuple as a list, a non-finite
    number as null (JSON has no NaN or infinity), mapping keys as text, and any other object
    as its text."""
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return str(value)
