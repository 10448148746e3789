"""The experiment commands (`simulate`, `sweep`, `plot`) and what `migrate` and `demo` share with
them: a policy chosen by name (`--policy NAME --set k=v`) and a plot of the report (`--plot`)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from orchestrator.app.checks import InputError, positive, writable_target
from orchestrator.app.output import summary, write_json
from orchestrator.experiments.model import PRESETS, GuestWorkload, LinkModel, parse_size
from orchestrator.experiments.replay import recorded_policy, scenario_of
from orchestrator.experiments.simulator import Scenario, simulate
from orchestrator.experiments.sweep import DaskWorkers, LocalWorkers, Run, Workers, load_spec, write_table
from orchestrator.experiments.trace import read_trace
from orchestrator.migration.driver import MigrationOptions
from orchestrator.migration.engine import DowntimePolicy, OnLimit, Policy, PolicyError
from orchestrator.migration.engine.registry import (
    ALIASES,
    POLICIES,
    describe,
    fields_of,
    make_policy,
    parse_settings,
    policy_class,
)

#: The downtime rule's shorthand flags: option attribute, policy field, conversion, default.
SHORTHAND = (
    ("downtime_limit", "downtime_limit_s", lambda ms: ms / 1e3, MigrationOptions.downtime_limit_ms),
    ("max_rounds", "max_rounds", int, MigrationOptions.max_rounds),
    ("max_time", "max_time_s", float, MigrationOptions.max_time_s),
    ("on_limit", "on_limit", OnLimit, MigrationOptions.on_limit),
)


def add_policy_choice(p: argparse.ArgumentParser) -> None:
    """`--policy NAME` and `--set k=v`. The shorthand flags (`--downtime-limit`, `--max-rounds`,
    `--max-time`, `--on-limit`) then set the field of that name in the chosen policy, and only
    when given: their defaults stay the default policy's."""
    names = sorted([*POLICIES, *ALIASES])
    p.add_argument("--policy", choices=names, metavar="NAME", help=f"the convergence policy: {', '.join(names)}")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the policy (repeatable), e.g. downtime_limit_s=0.5 steps=10 on_limit=force",
    )
    p.set_defaults(**{attr: None for attr, *_ in SHORTHAND})


def chosen_policy(args: argparse.Namespace, recorded: Policy | None = None) -> Policy | None:
    """The policy `--policy`/`--set` ask for. Without them: `recorded` (a trace's), with the
    shorthand flags given over its settings; or None, the default rule the shorthand flags
    make (as `migrate` always did). The flags left out get their defaults back on `args`."""
    given = {
        field: convert(getattr(args, attr)) for attr, field, convert, _ in SHORTHAND if getattr(args, attr) is not None
    }
    for attr, _, _, default in SHORTHAND:
        if getattr(args, attr) is None:
            setattr(args, attr, default)
    if args.policy is None and not args.set and (recorded is None or not given):
        return recorded
    base = describe(recorded) if args.policy is None and recorded is not None else {"name": args.policy, "params": {}}
    name = base["name"] or "downtime"
    declared = fields_of(policy_class(name))
    for attr, field, *_ in SHORTHAND:
        if field in given and field not in declared:
            flag = "--" + attr.replace("_", "-")
            raise PolicyError(f"{flag} does not apply to policy {name!r} (its settings: {', '.join(declared)})")
    return make_policy(name, {**base["params"], **given, **parse_settings(args.set)})


def add_plot_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plot", metavar="PATH", help="write a PNG of the report's rounds and downtime there")


def plot_if_asked(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """The report's plot, when `--plot` asked for one (a report without rounds is said, not raised:
    the migration's outcome and exit status stand). Said on stderr: with `--json -` stdout
    carries the report and nothing else."""
    if args.plot is None:
        return
    if not report.get("rounds"):
        print(f"no plot written to {args.plot}: the migration ended before its first round", file=sys.stderr)
        return
    from orchestrator.experiments import plots  # matplotlib costs a second: only when plotting

    print(f"plot: {plots.plot_report(report, args.plot)}", file=sys.stderr)


# -- simulate ----------------------------------------------------------------------------------
def _scenario(args: argparse.Namespace) -> tuple[Scenario, Policy]:
    bandwidth = None if args.bandwidth is None else float(parse_size(args.bandwidth))
    if bandwidth is not None:
        positive("--bandwidth", bandwidth, "bytes per second")
    if args.trace is not None:
        trace = read_trace(args.trace)
        scenario = scenario_of(trace, not args.recorded)
        if bandwidth is not None:
            scenario = replace(scenario, link=replace(scenario.link, bandwidth_bps=bandwidth))
        policy = chosen_policy(args, recorded_policy(trace))
        assert policy is not None
        return scenario, policy
    if args.recorded:
        raise InputError("--recorded replays a trace's own timings: it needs --trace")
    mem = parse_size(args.mem)
    positive("--mem", mem, "bytes")
    workload = GuestWorkload.from_command_line(args.workload, mem)
    policy = chosen_policy(args, DowntimePolicy())
    assert policy is not None
    return Scenario(workload, mem, link=LinkModel(bandwidth or LinkModel.bandwidth_bps)), policy


async def simulate_command(args: argparse.Namespace) -> int:
    writable_target("--json", args.json)
    writable_target("--plot", args.plot)
    # Off the loop's thread (a trace is read and fitted, then simulated), so a signal's
    # handler runs meanwhile and the command stops the way every command does.
    scenario, policy = await asyncio.to_thread(_scenario, args)
    report = await asyncio.to_thread(simulate, scenario, policy)
    if args.json != "-":
        summary(report)
    data = report.as_dict()
    write_json(data, args.json)
    plot_if_asked(args, data)
    return 0


# -- sweep and plot ----------------------------------------------------------------------------
async def sweep_command(args: argparse.Namespace) -> int:
    writable_target("--out", str(args.out))
    spec = load_spec(args.spec)
    runs = spec.runs()
    if args.jobs is not None:
        positive("--jobs", args.jobs, "processes")
    where = args.scheduler or (
        "a local Dask cluster" if args.dask == "local" else f"{args.jobs or 'all'} local processes"
    )
    print(f"sweep: {len(runs)} simulations ({len(spec.scenarios)} scenarios x {len(spec.points)} settings) on {where}")
    dask = args.scheduler is not None or args.dask == "local"
    rows = await _run_sweep(DaskWorkers(args.scheduler) if dask else LocalWorkers(args.jobs), runs)
    write_table(rows, args.out)
    converged = sum(1 for r in rows if r["converged"])
    print(f"table: {args.out} ({len(rows)} rows, {converged} converged)")
    if args.plot is not None:
        from orchestrator.experiments import plots

        print(f"plot: {await asyncio.to_thread(plots.plot_sweep, rows, args.plot)}")
    return 0


async def _run_sweep(workers: Workers, runs: list[Run]) -> list[dict[str, Any]]:
    """The runs in a thread, so the loop's signal handlers run meanwhile; the workers are
    closed on every exit, a signal's cancellation included: pending runs dropped, no worker
    process left."""
    try:
        return await asyncio.to_thread(workers.run, runs)
    finally:
        await asyncio.to_thread(workers.close)


async def plot_command(args: argparse.Namespace) -> int:
    from orchestrator.experiments import plots

    for path in args.files:
        out = (args.out_dir or path.parent) / f"{path.stem}.png"
        print(f"{path} -> {plots.plot_file(path, out)}")
    return 0


def add_commands(sub: Any) -> None:
    """The `simulate`, `sweep` and `plot` subcommands."""
    s = sub.add_parser("simulate", help="a migration on a virtual clock against a trace or a modelled workload")
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--trace", type=Path, metavar="FILE", help="replay a recorded trace (its dirty sets and costs)")
    what.add_argument(
        "--workload",
        metavar="NAME",
        help=f"a fixture-guest preset ({', '.join(PRESETS)}) or its command line, e.g. 'pattern=random wss=64M'",
    )
    s.add_argument("--mem", default="256M", metavar="SIZE", help="guest RAM of a --workload (default 256M)")
    s.add_argument("--bandwidth", metavar="B", help="the link in bytes per second, e.g. 1G (default: fitted, or 1G)")
    s.add_argument(
        "--recorded",
        action="store_true",
        help="with --trace: answer with the recording's own counts and times while the replay follows it",
    )
    s.add_argument("--downtime-limit", type=float, metavar="MS", help="the policy's downtime limit")
    s.add_argument("--max-rounds", type=int, metavar="N", help="the policy's round cap")
    s.add_argument("--max-time", type=float, metavar="S", help="the policy's time cap")
    s.add_argument("--on-limit", type=OnLimit, choices=tuple(OnLimit), help="at a cap: cancel or force")
    add_policy_choice(s)
    s.add_argument("--json", metavar="PATH|-", help="write the JSON report there ('-' for stdout)")
    add_plot_option(s)

    w = sub.add_parser("sweep", help="many simulations over policy settings and scenarios (a TOML spec)")
    w.add_argument("spec", type=Path, metavar="SPEC", help="the sweep spec (TOML; see README: Experiments)")
    w.add_argument("--out", type=Path, default=Path("sweep.csv"), metavar="CSV", help="the table (default sweep.csv)")
    w.add_argument("--plot", metavar="PNG", help="also plot total time against downtime there")
    w.add_argument("--jobs", type=int, metavar="N", help="local processes (default: one per core)")
    cluster = w.add_mutually_exclusive_group()
    cluster.add_argument("--scheduler", metavar="ADDR", help="run on the Dask cluster at ADDR, e.g. tcp://host:8786")
    cluster.add_argument("--dask", choices=("local",), help="run on a local Dask cluster started for the sweep")

    p = sub.add_parser("plot", help="PNG plots of reports (JSON), traces (JSONL) and sweep tables (CSV)")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--out-dir", type=Path, metavar="DIR", help="where the PNGs go (default: beside each file)")


COMMANDS = {"simulate": simulate_command, "sweep": sweep_command, "plot": plot_command}
