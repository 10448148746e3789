"""Benchmarks, run by `python -m bench`.

Each module registers suites into a section of the JSON result: `micro` (a dict of figures) and
`e2e` (a list of rows). Every figure that depends on machine speed is measured beside a baseline in the same run,
because only ratios are comparable on a shared, noisy machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

Result = dict[str, float | int | str]
# A suite returns figures to merge into a dict section, or rows to append to a list section.
SuiteResult = Result | list[dict]


@dataclass(frozen=True)
class Options:
    quick: bool = False
    reps: int | None = None  # end-to-end migrations per contender and row; None: mode default
    mem_mib: int = 256  # end-to-end guest RAM
    #: QEMU binaries the end-to-end rows run on, each row once per binary; empty: the
    #: launcher's default (`ORCHESTRATOR_QEMU`, else the system's).
    qemus: tuple[str, ...] = ()
    #: End-to-end rows to run, by workload name; empty: every row.
    rows: tuple[str, ...] = ()

    @property
    def repeat(self) -> int:
        """Timed repetitions per micro figure; the median is reported."""
        return 3 if self.quick else 9

    @property
    def e2e_reps(self) -> int:
        """Each repetition is a fresh pair of QEMUs: this is what `make bench` spends its time on."""
        return self.reps if self.reps is not None else 1 if self.quick else 5


Run = Callable[[Options], SuiteResult]


@dataclass(frozen=True)
class Suite:
    section: str
    name: str
    run: Run

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"


SUITES: list[Suite] = []


def suite(section: str) -> Callable[[Run], Run]:
    """Register a function returning figures (or rows) for `section` of the results."""

    def register(run: Run) -> Run:
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
