"""Sweeps: many simulations over a grid or a random sample of policy settings, across
scenarios (fixture workloads or traces), on this machine's cores or on a Dask cluster.

A spec is TOML:

    policy = "downtime"           # a registry name
    search = "grid"               # or "random", with samples = N and seed = S
    [[scenario]]
    workload = "heavy"            # a preset or a guest command line; or trace = "run.jsonl"
    mem = "256M"
    bandwidth = "1G"              # the link, bytes per second
    [grid]                        # each key a list; the runs are their product
    downtime_limit_s = [0.05, 0.1, 0.3]
    bandwidth_cap = ["100M", "1G"]
    [random]                      # each key [low, high], or {low, high, log = true, int = true}
    downtime_limit_s = [0.01, 0.5]

Keys are the policy's fields (any `--set` key) and `bandwidth_cap`, a cap on the link (bytes
per second as a number or a size string; 0 is uncapped). Every run is a pure function of its
settings, so the table is the same however it was computed.
"""

from __future__ import annotations

import csv
import functools
import itertools
import math
import os
import signal
import threading
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from orchestrator.experiments.errors import ExperimentError
from orchestrator.experiments.model import GuestWorkload, LinkModel, parse_size
from orchestrator.experiments.replay import scenario_of
from orchestrator.experiments.simulator import Scenario, Simulation
from orchestrator.experiments.trace import read_trace
from orchestrator.migration.engine.errors import PolicyError
from orchestrator.migration.engine.registry import fields_of, make_policy, policy_class

#: Settings that belong to the scenario, not to the policy.
LINK_CAP = "bandwidth_cap"
#: What each run adds to its settings in the table.
RESULTS = ("status", "converged", "total_ms", "downtime_ms", "rounds", "bytes_sent", "decision")


@dataclass(frozen=True)
class ScenarioSpec:
    """One thing to migrate: a fixture workload on a modelled link, or a trace replayed."""

    name: str
    workload: str | None = None
    trace: str | None = None
    mem: int = 256 << 20
    bandwidth: float = 1e9
    modelled: bool = True

    def build(self, cap: float | None) -> Scenario:
        """The scenario, with the link capped at `cap` (None: as built)."""
        base = _base_scenario(self)
        return base if cap is None else replace(base, link=base.link.capped(cap))


@functools.lru_cache(maxsize=32)
def _base_scenario(spec: ScenarioSpec) -> Scenario:
    """Built once per process: a trace is read and fitted once, whatever the number of runs."""
    if spec.trace is not None:
        return scenario_of(read_trace(spec.trace), spec.modelled)
    assert spec.workload is not None
    return Scenario(GuestWorkload.from_command_line(spec.workload, spec.mem), spec.mem, link=LinkModel(spec.bandwidth))


@dataclass(frozen=True)
class Run:
    index: int
    scenario: ScenarioSpec
    policy: str
    settings: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class SweepSpec:
    policy: str
    scenarios: tuple[ScenarioSpec, ...]
    points: tuple[tuple[tuple[str, Any], ...], ...]  # each run's settings, the same for every scenario

    def runs(self) -> list[Run]:
        combos = itertools.product(self.scenarios, self.points)
        return [Run(i, sc, self.policy, point) for i, (sc, point) in enumerate(combos)]

    @property
    def keys(self) -> list[str]:
        return list(dict.fromkeys(k for point in self.points for k, _ in point))


def run_one(run: Run) -> dict[str, Any]:
    """One simulation, as one row of the table."""
    settings = dict(run.settings)
    sim = Simulation(run.scenario.build(link_cap(settings.pop(LINK_CAP, None))), make_policy(run.policy, settings))
    rep = sim.run()
    return {
        "index": run.index,
        "scenario": run.scenario.name,
        **dict(run.settings),
        "status": rep.status.value,
        "converged": sim.engine.converged,
        "total_ms": rep.total_ms,
        "downtime_ms": rep.downtime_ms,
        "rounds": len(rep.rounds),
        "bytes_sent": rep.bytes_sent,
        "decision": rep.decision,
    }


def link_cap(value: Any) -> float | None:
    """A `bandwidth_cap` setting in bytes per second: a number (a random draw is a float) or
    a size string; 0 (or no setting) is uncapped, as with QEMU's max-bandwidth. Checked in
    `parse_spec` for every point, so a bad cap fails before any run, not in a worker."""
    if value is None:
        return None
    if isinstance(value, str):
        cap = float(parse_size(value))
    elif isinstance(value, int | float) and not isinstance(value, bool):
        cap = float(value)
    else:
        raise ExperimentError(f"{LINK_CAP} must be a number or a size like 100M, got {value!r}")
    if not math.isfinite(cap) or cap < 0:
        raise ExperimentError(f"{LINK_CAP} must be a finite number of bytes per second, 0 or more, got {value!r}")
    return cap or None


def _scenario(obj: Mapping[str, Any], base: Path, i: int) -> ScenarioSpec:
    known = {"name", "workload", "trace", "mem", "bandwidth", "modelled"}
    if unknown := sorted(set(obj) - known):
        raise ExperimentError(f"scenario {i + 1}: no key {unknown[0]!r}; known: {', '.join(sorted(known))}")
    if ("workload" in obj) == ("trace" in obj):
        raise ExperimentError(f"scenario {i + 1}: give either workload = NAME or trace = FILE")
    trace = str((base / obj["trace"]).resolve()) if "trace" in obj else None
    if trace is not None and not Path(trace).is_file():
        raise ExperimentError(f"scenario {i + 1}: no trace file {trace}")
    name = obj.get("name") or (Path(trace).stem if trace else f"{obj['workload']}")
    bandwidth = float(parse_size(str(obj.get("bandwidth", "1G"))))
    if bandwidth <= 0:
        raise ExperimentError(f"scenario {name}: the bandwidth must be positive")
    spec = ScenarioSpec(
        str(name),
        obj.get("workload"),
        trace,
        parse_size(str(obj.get("mem", "256M"))),
        bandwidth,
        bool(obj.get("modelled", True)),
    )
    if spec.workload is not None:
        GuestWorkload.from_command_line(spec.workload, spec.mem)  # a bad workload fails now, not in a worker
    return spec


def _grid(table: Mapping[str, Any]) -> list[tuple[tuple[str, Any], ...]]:
    for key, values in table.items():
        if not isinstance(values, list) or not values:
            raise ExperimentError(f"grid.{key} must be a non-empty list of values")
    keys = list(table)
    return [tuple(zip(keys, combo, strict=True)) for combo in itertools.product(*(table[k] for k in keys))]


def _draw(key: str, rule: Any, rng: np.random.Generator) -> Any:
    if isinstance(rule, list) and len(rule) == 2:
        rule = {"low": rule[0], "high": rule[1]}
    if not isinstance(rule, Mapping) or not {"low", "high"} <= rule.keys():
        raise ExperimentError(f"random.{key} must be [low, high] or {{low, high, log, int}}")
    low, high = (
        float(parse_size(rule["low"]) if isinstance(rule["low"], str) else rule["low"]),
        float(parse_size(rule["high"]) if isinstance(rule["high"], str) else rule["high"]),
    )
    if not low < high or (rule.get("log") and low <= 0):
        raise ExperimentError(f"random.{key}: need low < high (and low > 0 with log), got {low} and {high}")
    value = math.exp(rng.uniform(math.log(low), math.log(high))) if rule.get("log") else rng.uniform(low, high)
    return round(float(value)) if rule.get("int") else float(value)


def _random(table: Mapping[str, Any], samples: int, seed: int) -> list[tuple[tuple[str, Any], ...]]:
    if samples < 1:
        raise ExperimentError(f"samples must be at least 1, got {samples}")
    rng = np.random.default_rng(seed)
    return [tuple((k, _draw(k, rule, rng)) for k, rule in table.items()) for _ in range(samples)]


def load_spec(path: str | Path) -> SweepSpec:
    """A sweep spec from a TOML file; every key is checked before any run starts."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ExperimentError(f"{path}: not TOML ({exc})") from None
    return parse_spec(doc, path.parent)


def parse_spec(doc: Mapping[str, Any], base: Path = Path(".")) -> SweepSpec:
    known = {"policy", "search", "samples", "seed", "scenario", "grid", "random"}
    if unknown := sorted(set(doc) - known):
        raise ExperimentError(f"a sweep spec has no key {unknown[0]!r}; known: {', '.join(sorted(known))}")
    policy = str(doc.get("policy", "downtime"))
    try:
        policy_class(policy)
    except PolicyError as exc:
        raise ExperimentError(f"policy = {policy!r}: {exc}") from None
    scenarios = tuple(_scenario(s, base, i) for i, s in enumerate(doc.get("scenario", [])))
    if not scenarios:
        raise ExperimentError("a sweep spec needs at least one [[scenario]]")
    if len({s.name for s in scenarios}) != len(scenarios):
        raise ExperimentError("two scenarios have the same name: give each a name = ...")
    search = doc.get("search", "grid")
    if search == "grid":
        points = _grid(doc.get("grid", {}))
    elif search == "random":
        points = _random(doc.get("random", {}), int(doc.get("samples", 100)), int(doc.get("seed", 0)))
    else:
        raise ExperimentError(f"search must be grid or random, got {search!r}")
    spec = SweepSpec(policy, scenarios, tuple(points))
    declared = set(fields_of(policy_class(policy)))
    for key in spec.keys:
        if key != LINK_CAP and key.split(".", 1)[0] not in declared:
            raise ExperimentError(
                f"{key!r} is neither a setting of policy {policy!r} ({', '.join(sorted(declared))}) nor {LINK_CAP}"
            )
    for point in spec.points:  # a bad value fails before any run
        settings = dict(point)
        try:
            link_cap(settings.pop(LINK_CAP, None))
            make_policy(policy, settings)
        except (PolicyError, ExperimentError) as exc:
            raise ExperimentError(f"sweep point {dict(point)}: {exc}") from None
    return spec


#: Runs a worker takes at a time: few enough that a stopped sweep waits about a second for the
#: runs already under way, enough to keep the cost of a hand-off small against a run's.
CHUNK_RUNS = 8


class Workers(Protocol):
    """Where a sweep's runs go. `run` blocks until every row is in; `close`, from any thread,
    drops the runs not started, lets the running ones end and returns when no worker is left,
    so a command stopped by a signal leaves nothing running (`run` then raises)."""

    def run(self, runs: Sequence[Run]) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


def _leave_signals_to_parent() -> None:
    """A worker ignores the terminal's signals: a Ctrl-C reaches the whole foreground process
    group, and the command that started the workers decides how they stop."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


class LocalWorkers:
    """Processes on this machine, one per core unless `jobs` says."""

    def __init__(self, jobs: int | None = None) -> None:
        self.jobs = jobs or os.cpu_count() or 1
        self._pool = ProcessPoolExecutor(self.jobs, initializer=_leave_signals_to_parent)

    def run(self, runs: Sequence[Run]) -> list[dict[str, Any]]:
        chunk = max(1, min(CHUNK_RUNS, len(runs) // (4 * self.jobs)))
        return list(self._pool.map(run_one, runs, chunksize=chunk))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class DaskWorkers:
    """A Dask cluster: the scheduler at `scheduler`, or a local cluster of `workers` threads in
    this process. It is reached (or started) by the first `run`, which may take seconds, so
    that a `close` meanwhile waits for it and then shuts it down."""

    def __init__(self, scheduler: str | None = None, workers: int = 2) -> None:
        self.scheduler, self.workers = scheduler, workers
        self._lock = threading.Lock()
        self._closed = False
        self._client: Any = None
        self._cluster: Any = None
        self._futures: list[Any] = []

    def run(self, runs: Sequence[Run]) -> list[dict[str, Any]]:
        from distributed import Client, LocalCluster

        with self._lock:
            if self._closed:
                raise ExperimentError("the sweep's Dask workers are closed")
            if self._client is None:
                if self.scheduler is None:
                    self._cluster = LocalCluster(n_workers=self.workers, processes=False, dashboard_address=None)
                self._client = Client(self.scheduler or self._cluster)
            self._futures = self._client.map(run_one, list(runs), pure=False)
            futures = self._futures
        return list(self._client.gather(futures))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._client is not None:
                self._client.cancel(self._futures)
                self._client.close()
            if self._cluster is not None:
                self._cluster.close()


def run_on(workers: Workers, runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Every run on `workers`, closed afterwards."""
    try:
        return workers.run(runs)
    finally:
        workers.close()


def run_local(runs: Sequence[Run], jobs: int | None = None) -> list[dict[str, Any]]:
    """Every run on this machine's cores (one process per core unless `jobs` says; with one,
    in this process)."""
    if (jobs or os.cpu_count() or 1) == 1:
        return [run_one(r) for r in runs]
    return run_on(LocalWorkers(jobs), runs)


def run_dask(runs: Sequence[Run], scheduler: str | None = None, workers: int = 2) -> list[dict[str, Any]]:
    """Every run on a Dask cluster: the scheduler at `scheduler`, or a local cluster of
    `workers` threads in this process, started and shut down here."""
    return run_on(DaskWorkers(scheduler, workers), runs)


def columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    keys: dict[str, None] = {"index": None, "scenario": None}
    for row in rows:
        keys.update(dict.fromkeys(k for k in row if k not in RESULTS))
    return [*keys, *RESULTS]


def write_table(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """One row per run, in run order, as CSV."""
    with Path(path).open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns(rows))
        writer.writeheader()
        for row in sorted(rows, key=lambda r: int(r["index"])):
            writer.writerow({k: "" if v is None else v for k, v in row.items()})


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """A table `write_table` wrote, with numbers and flags back to their types."""
    with Path(path).open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"scenario", "total_ms", "downtime_ms", "converged"} <= rows[0].keys():
        raise ExperimentError(f"{path} is not a sweep table (no scenario, total_ms, downtime_ms, converged)")
    return [{k: _typed(k, v) for k, v in row.items()} for row in rows]


def _typed(key: str, text: str) -> Any:
    if key == "converged":
        return text == "True"
    if key in ("scenario", "status", "decision") or text == "":
        return text or None
    try:
        return float(text)
    except ValueError:
        return text
