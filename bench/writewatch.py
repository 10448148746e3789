"""Write-watch costs: one harvest per GiB of touched RAM, the arming scan, the injection, and
downtime against RAM size at the same dirty rate.

`micro`: a child process (not QEMU) maps a 1 GiB shmem file and touches every page of it, then
rewrites `DIRTY` random pages between harvests; the figure is the median harvest (PAGEMAP_SCAN
read-and-reprotect plus the merge into the shared bitmap) divided by the GiB touched. Its
baseline in the same run is one `DirtyBitmap.mark_runs` of the same pages without the scan.

`scaling`: the `light` guest (the same 32 MiB working set at 32 MiB/s) migrated with write-watch
at 256 MiB and 4 GiB of RAM, alternating; downtime must not grow with the RAM size.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from bench import Case, Options, median_seconds, ms, suite
from bench.migrate import ORCHESTRATOR, SETTLE_LINES, Limits, fresh_destination
from orchestrator.dirty.bitmap import DirtyBitmap
from orchestrator.dirty.memory import MemoryLayout
from orchestrator.lab.demo import guest_pair, wait_progress
from orchestrator.writewatch import WriteWatch

GIB = 1 << 30
DIRTY = 20_000  # pages rewritten before each harvest

_CHILD = """
import mmap, sys
f = open(sys.argv[1], 'r+b'); m = mmap.mmap(f.fileno(), 0)
for p in range(0, len(m), 4096):
    m[p] = 1
print('ready', flush=True)
for line in sys.stdin:
    for p in map(int, line.split()):
        m[p * 4096] = (m[p * 4096] + 1) % 255 + 1
    print('ok', flush=True)
"""


@suite("micro")
def writewatch_harvest(options: Options) -> dict[str, float]:
    path = Path("/dev/shm") / f"orchestrator-bench-{uuid.uuid4().hex}"
    with open(path, "wb") as f:
        f.truncate(GIB)
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        t = time.perf_counter()
        watch = WriteWatch.open(child.pid, MemoryLayout.flat(GIB, path=str(path)))
        open_s = time.perf_counter() - t
        t = time.perf_counter()
        watch.scan(None)
        arm_s = time.perf_counter() - t
        bitmap = DirtyBitmap(GIB // 4096)
        rng = np.random.default_rng(1)

        def dirty() -> None:
            pages = rng.choice(GIB // 4096, DIRTY, replace=False)
            child.stdin.write(" ".join(map(str, pages.tolist())) + "\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "ok"
            bitmap.harvest()

        pages = np.sort(rng.choice(GIB // 4096, DIRTY, replace=False))
        times = median_seconds(
            {
                "harvest": Case(lambda: watch.scan(bitmap.mark_runs), prepare=dirty),
                "merge_only": Case(lambda: bitmap.mark_runs(pages, pages + 1), prepare=bitmap.harvest),
            },
            options.repeat,
        )
        watch.close()
    finally:
        child.kill()
        child.wait()
        path.unlink(missing_ok=True)
    return {
        "writewatch_open_ms": ms(open_s),
        "writewatch_arm_ms_per_gib": ms(arm_s),
        "writewatch_harvest_ms_per_gib": ms(times["harvest"]),
        "writewatch_merge_only_ms": ms(times["merge_only"]),
        "writewatch_harvest_dirty_pages": DIRTY,
    }


async def _downtime(mem_mib: int, qemu: str | None) -> float | None:
    async with guest_pair("light", mem_mib << 20, ORCHESTRATOR.tracker, devices=[], qemu=qemu) as pair:
        await wait_progress(pair.src, SETTLE_LINES, 60)
        fresh_destination(pair.dst)
        return (await ORCHESTRATOR.migrate(pair, Limits())).downtime_ms


@suite("scaling")
def writewatch_scaling(options: Options) -> list[dict]:
    sizes = (256, 4096)
    samples: dict[int, list[float]] = {m: [] for m in sizes}
    qemu = options.qemus[0] if options.qemus else None
    for _ in range(options.e2e_reps):
        for mem in sizes:
            down = asyncio.run(_downtime(mem, qemu))
            if down is not None:
                samples[mem].append(down)
    med = {m: statistics.median(v) if v else None for m, v in samples.items()}
    lo, hi = med[sizes[0]], med[sizes[-1]]
    return [
        {
            "workload": "light",
            "tracker": "write-watch",
            "from_mib": sizes[0],
            "to_mib": sizes[-1],
            "downtime_ms": {str(m): v for m, v in med.items()},
            "samples": {str(m): v for m, v in samples.items()},
            "downtime_ratio": round(hi / lo, 3) if lo and hi else None,
        }
    ]
