"""`python -m bench [--quick] [--only SECTION[.SUITE]] [--reps N] [--mem MIB] [--output DIR]`: run the
suites, print the JSON and a markdown table, save both (results.json, results.md)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import platform
import sys
import time
from pathlib import Path

import numpy as np

import bench
from bench import SUITES, Options
from bench.report import markdown

HERE = Path(__file__).parent


def load_suites() -> None:
    """Import every module of the package: a new benchmark module registers itself."""
    for module in pkgutil.iter_modules(bench.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"bench.{module.name}")


def main(argv: list[str] | None = None) -> int:
    load_suites()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, one migration per contender")
    parser.add_argument(
        "--only",
        action="append",
        metavar="SUITE",
        choices=sorted({s.section for s in SUITES} | {s.key for s in SUITES}),
        help="run just this section or section.suite (repeatable)",
    )
    parser.add_argument("--reps", type=int, metavar="N", help="end-to-end migrations per contender and row")
    parser.add_argument(
        "--row",
        action="append",
        default=[],
        metavar="WORKLOAD",
        choices=[row.name for row in importlib.import_module("bench.e2e").ROWS],
        help="run only this end-to-end row (repeatable; e.g. device-heavy)",
    )
    parser.add_argument("--mem", type=int, default=256, metavar="MIB", help="end-to-end guest RAM (default 256)")
    parser.add_argument(
        "--qemu",
        action="append",
        default=[],
        metavar="PATH",
        help="run the end-to-end rows on this QEMU binary (repeatable; default: $ORCHESTRATOR_QEMU, "
        "else qemu-system-x86_64)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=HERE,
        metavar="DIR",
        help="where results.json and results.md go (default: the bench package)",
    )
    args = parser.parse_args(argv)

    options = Options(quick=args.quick, reps=args.reps, mem_mib=args.mem, qemus=tuple(args.qemu), rows=tuple(args.row))
    started = time.monotonic()
    results: dict[str, dict | list] = {
        "meta": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "quick": options.quick,
            "repeat": options.repeat,
            "e2e_reps": options.e2e_reps,
        }
    }
    for entry in SUITES:
        if args.only and not {entry.section, entry.key} & set(args.only):
            continue
        print(f"running {entry.key}", file=sys.stderr)
        found = entry.run(options)
        if isinstance(found, list):
            results.setdefault(entry.section, []).extend(found)
        else:
            results.setdefault(entry.section, {}).update(found)
    results["meta"]["wall_s"] = round(time.monotonic() - started, 1)

    text = json.dumps(results, indent=2)
    table = markdown(results)
    print(text)
    print(table)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(text + "\n")
    (args.output / "results.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
