"""`python -m bench [--quick] [--only SECTION[.SUITE]]`: run the suites, print JSON, save results.json."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import pkgutil
import sys
from pathlib import Path

import numpy as np

import bench
from bench import SUITES, Options

RESULTS = Path(__file__).with_name("results.json")


def load_suites() -> None:
    """Import every module of the package: a new benchmark module registers itself."""
    for module in pkgutil.iter_modules(bench.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"bench.{module.name}")


def main(argv: list[str] | None = None) -> int:
    load_suites()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--only", action="append", metavar="SUITE",
                        choices=sorted({s.section for s in SUITES} | {s.key for s in SUITES}),
                        help="run just this section or section.suite (repeatable)")
    args = parser.parse_args(argv)

    options = Options(quick=args.quick)
    results: dict[str, dict] = {
        "meta": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "quick": options.quick,
            "repeat": options.repeat,
        }
    }
    for entry in SUITES:
        if args.only and not {entry.section, entry.key} & set(args.only):
            continue
        print(f"running {entry.key}", file=sys.stderr)
        results.setdefault(entry.section, {}).update(entry.run(options))

    text = json.dumps(results, indent=2)
    print(text)
    RESULTS.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
