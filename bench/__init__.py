"""Benchmarks, run by `python -m bench`.

Each module registers suites into a section of the JSON result (`micro` now; `e2e` and others
later). Every figure that depends on machine speed is measured beside a baseline in the same run,
because only ratios are comparable on a shared, noisy machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

Result = dict[str, float | int | str]


@dataclass(frozen=True)
class Options:
    quick: bool = False

    @property
    def repeat(self) -> int:
        """Timed repetitions per figure; the median is reported."""
        return 3 if self.quick else 9


@dataclass(frozen=True)
class Suite:
    section: str
    name: str
    run: Callable[[Options], Result]

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"


SUITES: list[Suite] = []


def suite(section: str) -> Callable[[Callable[[Options], Result]], Callable[[Options], Result]]:
    """Register a function returning figures to merge into `section` of the results."""

    def register(run: Callable[[Options], Result]) -> Callable[[Options], Result]:
        SUITES.append(Suite(section, run.__name__, run))
        return run

    return register


@dataclass(frozen=True)
class Case:
    action: Callable[[], object]
    prepare: Callable[[], object] | None = None  # run before each timing, untimed


def median_seconds(cases: dict[str, Case], repeat: int) -> dict[str, float]:
    """Median wall time of each case over `repeat` rounds, after one warm-up round.

    Cases are timed round-robin so a burst of load from neighbours hits all of them alike and
    their ratios stay meaningful.
    """
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeat + 1):
        for name, case in cases.items():
            if case.prepare is not None:
                case.prepare()
            start = time.perf_counter()
            case.action()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(samples[1:]) for name, samples in times.items()}


def gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 2)


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)
