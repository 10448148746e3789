"""Which runs of a sweep nothing beats: the Pareto front of (total time, downtime), both lower
is better, and where along the downtime limit migrations start converging."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import groupby
from typing import Any


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (at most as large in both coordinates,
    smaller in one), in increasing x. Equal points are all on the front: neither beats the
    other. O(n log n): sorted by x, a point is on it when its y is below every y before."""
    order = sorted(range(len(points)), key=lambda i: points[i])
    front: list[int] = []
    best = math.inf
    for _, group in groupby(order, key=lambda i: points[i][0]):
        members = list(group)
        low = points[members[0]][1]  # sorted by y within one x
        if low < best:
            front += [i for i in members if points[i][1] == low]
            best = low
    return front


def convergence_boundary(rows: Sequence[Mapping[str, Any]], param: str) -> dict[str, float | None]:
    """Per scenario, the smallest value of `param` at which a run converged (None: none did).
    With `param` the downtime limit this is the line below which the workload cannot be moved
    within its limit on that link."""
    out: dict[str, float | None] = {}
    for row in rows:
        scenario = str(row["scenario"])
        value = row.get(param)
        current = out.setdefault(scenario, None)
        if row.get("converged") and value is not None and value != "":
            v = float(value)
            out[scenario] = v if current is None else min(current, v)
    return out
