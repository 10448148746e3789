"""End to end: the orchestrator against QEMU's own precopy on the same running guest.

Every row is one workload of the fixture guest on one QEMU version (`--qemu`, once per binary:
both VMs of every contender run it, so `ratio` compares with that version's own migration); each
repetition launches a fresh pair per
contender, in turn (QEMU, orchestrator with write-watch, with the vCPU plugin, with content hashing,
QEMU, ...), so load
from neighbours hits all of them alike. Medians per metric; `ratio` is orchestrator / QEMU per
metric (below 1 is better for times and bytes; for `guest_rate` it is the share of its speed the
guest kept), `ratio_vcpu` and `ratio_content` the same for the plugin and the content-hash tracker.
What each number measures
is in `bench.migrate` and bench/README.md.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from bench import Options, suite
from bench.migrate import (
    CONTENDERS,
    ORCHESTRATOR,
    ORCHESTRATOR_CONTENT,
    ORCHESTRATOR_VCPU,
    QEMU,
    SETTLE_LINES,
    Contender,
    Limits,
    Sample,
    fresh_destination,
)
from orchestrator.lab.demo import guest_pair, wait_progress
from orchestrator.lab.launcher import default_qemu, qemu_version

LIMITS = Limits()
METRICS = ("total_ms", "downtime_ms", "bytes_sent", "rounds", "guest_rate", "guest_rate_before")


@dataclass(frozen=True)
class Row:
    name: str
    workload: str  # a preset of orchestrator.lab.workload.WORKLOADS
    pair: Mapping[str, object] = field(default_factory=dict)  # more guest_pair keywords
    mem_mib: int | None = None  # guest RAM, if not the run's (`--mem`)


#: The rows `make bench` runs. A row with emulated DMA devices is one more entry, its devices
#: passed through to guest_pair, e.g. Row("device-heavy", "heavy", {"devices": ["mlx5"]}).
ROWS: list[Row] = [
    *(Row(name, name) for name in ("idle", "light", "sweep", "heavy", "hotcold", "fwcfg")),
    # Debian's Linux 6.12 rewriting 256 MiB at 64 MiB/s and reading its disk (O_DIRECT). QEMU
    # before 9.0 loses TCG writes in its own precopy (the guest crashes on the destination):
    # on 7.2 QEMU's figures here are a cost baseline only.
    Row("linux", "linux", mem_mib=512),
    # Emulated devices DMA into the guest too. QEMU cannot see their writes (another process
    # makes them), so its destination is not bit-exact in this row: its figures are a cost
    # baseline only, while ours include one DMA-log tracker per device and their state.
    Row("device-heavy", "heavy", {"devices": ["mlx5", "pds"]}),
]


async def _one(row: Row, contender: Contender, options: Options, qemu: str) -> Sample:
    mem = (row.mem_mib or options.mem_mib) << 20
    async with guest_pair(row.workload, mem, tracker=contender.tracker, qemu=qemu, **row.pair) as pair:
        await wait_progress(pair.src, SETTLE_LINES, 60)
        fresh_destination(pair.dst)
        return await contender.migrate(pair, LIMITS)


def _median(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 2) if present else None


def summarise(samples: list[Sample]) -> dict:
    out: dict = {m: _median([getattr(s, m) for s in samples]) for m in METRICS}
    out["converged"] = all(s.converged for s in samples)
    out["samples"] = [asdict(s) for s in samples]
    return out


def ratios(ours: dict, theirs: dict) -> dict[str, float | None]:
    return {m: round(ours[m] / theirs[m], 3) if ours[m] is not None and theirs[m] else None for m in METRICS}


@suite("e2e")
def migrations(options: Options) -> list[dict]:
    rows = []
    for qemu in options.qemus or (default_qemu(),):
        version = ".".join(map(str, qemu_version(qemu)))
        for row in ROWS:
            if not options.rows or row.name in options.rows:
                rows.append(_row(row, options, qemu, version))
    return rows


def _row(row: Row, options: Options, qemu: str, version: str) -> dict:
    samples: dict[str, list[Sample]] = {c.key: [] for c in CONTENDERS}
    for _ in range(options.e2e_reps):
        for contender in CONTENDERS:
            samples[contender.key].append(asyncio.run(_one(row, contender, options, qemu)))
    summary = {key: summarise(found) for key, found in samples.items()}
    return {
        "workload": row.name,
        "qemu_version": version,
        "mem_mib": row.mem_mib or options.mem_mib,
        "downtime_limit_ms": LIMITS.downtime_ms,
        "reps": options.e2e_reps,
        **summary,
        "ratio": ratios(summary[ORCHESTRATOR.key], summary[QEMU.key]),
        "ratio_vcpu": ratios(summary[ORCHESTRATOR_VCPU.key], summary[QEMU.key]),
        "ratio_content": ratios(summary[ORCHESTRATOR_CONTENT.key], summary[QEMU.key]),
    }
