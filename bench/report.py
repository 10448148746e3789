"""The markdown view of a results dict: end-to-end table, ratios, micro figures, targets."""

from __future__ import annotations

from collections.abc import Iterable

# The performance targets the results are checked against.
COPY_TARGET_GBPS = 4.0
MERGE_TARGET_RATIO = 0.5
TOTAL_TARGET_RATIO = 0.5
STREAM_TARGET_RATIO = 0.6
HARVEST_TARGET_MS = 20.0
WRITEWATCH_HARVEST_TARGET_MS_PER_GIB = 3.0
SCALING_TARGET_RATIO = 1.5
GUEST_RATE_TARGET_RATIO = 0.9
PREDICTION_TARGET_ERROR = 0.10  # median relative error of the simulator on total time and rounds


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 10 else f"{value:,.0f}"
    return str(value)


def _table(header: Iterable[str], rows: Iterable[Iterable[object]]) -> list[str]:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return [*lines, ""]


def _name(row: dict) -> str:
    """A row is one workload on one QEMU version."""
    return f"{row['workload']} (QEMU {row['qemu_version']})"


def _contenders(row: dict) -> list[str]:
    return [k for k, v in row.items() if isinstance(v, dict) and "converged" in v]


def _e2e(rows: list[dict]) -> list[str]:
    out = ["## End to end (medians)", ""]
    table = []
    for row in rows:
        for key in _contenders(row):
            c = row[key]
            table.append(
                [
                    _name(row),
                    key,
                    c["total_ms"],
                    c["downtime_ms"],
                    None if c["bytes_sent"] is None else c["bytes_sent"] / 2**20,
                    c["rounds"],
                    c["converged"],
                    c["guest_rate"],
                    c["guest_rate_before"],
                ]
            )
    out += _table(
        [
            "workload",
            "contender",
            "total ms",
            "downtime ms",
            "MiB sent",
            "rounds",
            "converged",
            "guest pages/s during",
            "guest pages/s before",
        ],
        table,
    )
    out += ["Ratios, orchestrator / QEMU:", ""]
    ratio_rows = []
    for row in rows:
        for key in ("ratio", "ratio_vcpu", "ratio_content"):
            r = row[key]
            ratio_rows.append(
                [
                    _name(row),
                    key,
                    r["total_ms"],
                    r["downtime_ms"],
                    r["bytes_sent"],
                    r["rounds"],
                    r["guest_rate"],
                    r["guest_rate_before"],
                ]
            )
    return out + _table(
        ["workload", "", "total", "downtime", "bytes", "rounds", "guest rate during", "guest rate before"], ratio_rows
    )


def _validation(section: dict) -> list[str]:
    out = ["## Simulator against real runs (predicted from another run's trace)", ""]
    table = []
    for row in section["cases"]:
        m, p, e = row["measured"], row["predicted"], row["errors"]
        table.append(
            [
                f"{row['workload']} ({row['mem_mib']} MiB)",
                row["policy"],
                m["total_ms"],
                p["total_ms"],
                e["total_ms"],
                row["run_to_run"]["total_ms"],
                m["rounds"],
                p["rounds"],
                m["downtime_ms"],
                p["downtime_ms"],
                None if m["bytes_sent"] is None else m["bytes_sent"] / 2**20,
                None if p["bytes_sent"] is None else p["bytes_sent"] / 2**20,
                m["converged"],
                p["converged"],
                row["replay_rounds_exact"],
            ]
        )
    header = ["workload", "policy", "total ms", "predicted", "error", "run to run", "rounds", "predicted"]
    header += ["downtime ms", "predicted", "MiB sent", "predicted", "converged", "predicted", "replay exact"]
    s = section["summary"]
    medians = [
        [figure, s[f"median_error_{figure}"], s[f"median_run_to_run_{figure}"]]
        for figure in ("total_ms", "downtime_ms", "rounds", "bytes_sent")
    ]
    note = [
        "Run to run: the training run's measured figure taken as the prediction of the test run's,",
        "the spread no model fitted to one run can be expected to beat.",
        "",
    ]
    medians_table = _table(["figure", "median error", "median run to run"], medians)
    return [*out, *_table(header, table), *note, *medians_table]


def _targets(results: dict) -> list[str]:
    checks: list[tuple[str, object, bool | None]] = []
    if "validation" in results:
        v = results["validation"]["summary"]
        for figure in ("total_ms", "rounds"):
            err = v[f"median_error_{figure}"]
            checks.append(
                (
                    f"simulator: median error on {figure} <= {PREDICTION_TARGET_ERROR:.0%}",
                    err,
                    None if err is None else err <= PREDICTION_TARGET_ERROR,
                )
            )
        checks.append(
            (
                "simulator: converge/no-converge verdict right in every case",
                f"{v['verdicts_right']}/{v['cases']}",
                v["verdicts_right"] == v["cases"],
            )
        )
        checks.append(("simulator: recorded numbers replay the round count exactly", None, v["replays_exact"]))
    for row in results.get("e2e", []):
        total, down = row["ratio"]["total_ms"], row["ratio"]["downtime_ms"]
        rate = row["ratio"]["guest_rate"]
        limit, ours = row.get("downtime_limit_ms"), row["orchestrator"]["downtime_ms"]
        checks.append(
            (
                f"{_name(row)}: total <= {TOTAL_TARGET_RATIO}x QEMU",
                total,
                None if total is None else total <= TOTAL_TARGET_RATIO,
            )
        )
        checks.append((f"{_name(row)}: downtime <= QEMU", down, None if down is None else down <= 1))
        if limit is not None:
            checks.append(
                (f"{_name(row)}: downtime <= the {limit} ms limit", ours, None if ours is None else ours <= limit)
            )
        checks.append(
            (
                f"{_name(row)}: guest rate >= {GUEST_RATE_TARGET_RATIO}x under QEMU",
                rate,
                None if rate is None else rate >= GUEST_RATE_TARGET_RATIO,
            )
        )
    for row in results.get("scaling", []):
        checks.append(
            (
                f"write-watch downtime {row['from_mib']} -> {row['to_mib']} MiB <= {SCALING_TARGET_RATIO}x",
                row["downtime_ratio"],
                None if row["downtime_ratio"] is None else row["downtime_ratio"] < SCALING_TARGET_RATIO,
            )
        )
    micro = results.get("micro", {})
    if "copy_gbps" in micro:
        checks.append(
            (
                f"local copy >= {COPY_TARGET_GBPS} GB/s (scattered pages)",
                micro["copy_gbps"],
                micro["copy_gbps"] >= COPY_TARGET_GBPS,
            )
        )
    if "merge_ratio" in micro:
        checks.append(
            (
                f"merge >= {MERGE_TARGET_RATIO} x memcpy",
                micro["merge_ratio"],
                micro["merge_ratio"] >= MERGE_TARGET_RATIO,
            )
        )
    if "harvest_1tib_ms" in micro:
        checks.append(
            (
                f"sparse 1 TiB harvest <= {HARVEST_TARGET_MS:g} ms",
                micro["harvest_1tib_ms"],
                micro["harvest_1tib_ms"] <= HARVEST_TARGET_MS,
            )
        )
    if "writewatch_harvest_ms_per_gib" in micro:
        v = micro["writewatch_harvest_ms_per_gib"]
        checks.append(
            (
                f"write-watch harvest <= {WRITEWATCH_HARVEST_TARGET_MS_PER_GIB:g} ms per GiB touched",
                v,
                v <= WRITEWATCH_HARVEST_TARGET_MS_PER_GIB,
            )
        )
    if "stream_ratio" in micro:
        checks.append(
            (
                f"loopback stream >= {STREAM_TARGET_RATIO} x raw socket",
                micro["stream_ratio"],
                micro["stream_ratio"] >= STREAM_TARGET_RATIO,
            )
        )
    return ["## Targets", "", *_table(["target", "measured", "met"], checks)]


def markdown(results: dict) -> str:
    meta = results.get("meta", {})
    lines = [
        "# Benchmark results",
        "",
        f"{meta.get('cpus')} CPUs, Python {meta.get('python')}, numpy {meta.get('numpy')}; "
        f"quick={meta.get('quick')}, micro repeat={meta.get('repeat')}, "
        f"migrations per contender={meta.get('e2e_reps')}, wall {meta.get('wall_s')} s.",
        "",
    ]
    if results.get("e2e"):
        lines += _e2e(results["e2e"])
    if results.get("micro"):
        lines += ["## Micro", "", *_table(["figure", "value"], results["micro"].items())]
    if results.get("validation"):
        lines += _validation(results["validation"])
    lines += _targets(results)
    return "\n".join(lines)
