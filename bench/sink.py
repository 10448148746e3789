"""Page copy throughput of the local sink against memcpy of the same bytes.

Two pre-faulted 256 MiB files in /dev/shm stand in for the source and destination guest RAM
(the sink maps them exactly as it maps QEMU's). `memcpy` is np.copyto of the same number of
bytes between the same two files, contiguous: the bandwidth no page copy can beat here.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from bench import Case, Options, Result, gbps, median_seconds, ms, suite
from orchestrator.dirty.memory import MemoryLayout
from orchestrator.transport import LocalSink

PAGE = 4096
FILE_PAGES = 1 << 16  # 256 MiB
SENT_PAGES = 1 << 14  # 64 MiB per copy: one page in four for the scattered case


@contextmanager
def _ram_files(src_fill: np.ndarray) -> Iterator[tuple[str, str]]:
    """A source file holding `src_fill` and a zeroed destination, removed afterwards."""
    paths: list[str] = []
    try:
        for data in (src_fill, None):
            fd, path = tempfile.mkstemp(prefix="bench-sink-", dir="/dev/shm")
            paths.append(path)
            os.ftruncate(fd, FILE_PAGES * PAGE)
            if data is not None:
                with mmap.mmap(fd, FILE_PAGES * PAGE) as mm:
                    np.frombuffer(mm, np.uint8)[:] = data.reshape(-1)
            os.close(fd)
        yield paths[0], paths[1]
    finally:
        for path in paths:
            Path(path).unlink(missing_ok=True)


@suite("micro")
def copy(options: Options) -> Result:
    """LocalSink.send of scattered and of contiguous pages, round 0 over a half-zero guest."""
    rng = np.random.default_rng(0)
    fill = rng.integers(0, 256, (FILE_PAGES, PAGE), dtype=np.uint8)
    fill[FILE_PAGES // 2 :] = 0  # round 0 skips these: a guest whose upper half was never written
    scattered = np.sort(rng.choice(FILE_PAGES // 2, SENT_PAGES, replace=False))
    dense = np.arange(SENT_PAGES) + SENT_PAGES // 2
    layout = MemoryLayout.flat(FILE_PAGES * PAGE)
    with _ram_files(fill) as (src, dst), LocalSink.flat(layout, src, dst) as sink:
        del fill
        region = sink.regions[0]
        nbytes = SENT_PAGES * PAGE
        seconds = median_seconds(
            {
                "memcpy": Case(lambda: np.copyto(region.dst[:SENT_PAGES], region.src[:SENT_PAGES])),
                "scattered": Case(lambda: sink.send(scattered)),
                "dense": Case(lambda: sink.send(dense)),
                "round0": Case(sink.send_nonzero),
            },
            options.repeat,
        )
    memcpy = gbps(nbytes, seconds["memcpy"])
    scattered_gbps = gbps(nbytes, seconds["scattered"])
    dense_gbps = gbps(nbytes, seconds["dense"])
    return {
        "copy_memcpy_gbps": memcpy,
        "copy_gbps": scattered_gbps,
        "copy_ratio": round(scattered_gbps / memcpy, 3),
        "copy_dense_gbps": dense_gbps,
        "copy_dense_ratio": round(dense_gbps / memcpy, 3),
        "copy_pages": SENT_PAGES,
        "round0_256mib_ms": ms(seconds["round0"]),
        "round0_scan_gbps": gbps(FILE_PAGES * PAGE, seconds["round0"]),
    }
