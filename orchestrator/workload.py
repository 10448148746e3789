"""The fixture guest's workloads and what it prints: named presets for the demo and the
benchmarks, and the parser for its serial progress lines."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GUEST_ELF = REPO / "fixtures" / "guest" / "guest.elf"

# name -> guest command line (see fixtures/README.md for the keys)
WORKLOADS: dict[str, str] = {
    "idle": "pattern=idle",
    "light": "pattern=sweep wss=32M rate=32M",
    "sweep": "pattern=sweep wss=128M rate=0",
    "heavy": "pattern=random wss=128M rate=0",
    "hotcold": "pattern=hotcold wss=128M rate=0",
}

_PROGRESS = re.compile(r"^P (\d+) (\d+) (\d+)$", re.M)
_ANNOUNCE = re.compile(r"^A (.*)$", re.M)
_DMA = re.compile(r"^(0x[0-9a-f]+)-(0x[0-9a-f]+)$", re.I)


@dataclass(frozen=True)
class Progress:
    """One `P <sweeps> <pages_written> <guest_ms>` line."""

    sweeps: int
    pages: int
    ms: int


def parse_progress(serial_text: str) -> list[Progress]:
    return [Progress(*map(int, m.groups())) for m in _PROGRESS.finditer(serial_text)]


def dma_window(serial_text: str) -> tuple[int, int] | None:
    """(guest-physical start, length) of the RAM the guest leaves to devices, from its
    `A ... dma=S-E ...` line; None before the guest has announced itself."""
    m = _ANNOUNCE.search(serial_text)
    if not m:
        return None
    fields = dict(kv.split("=", 1) for kv in m.group(1).split() if "=" in kv)
    span = _DMA.match(fields.get("dma", ""))
    if not span:
        raise ValueError(f"guest announced no DMA window: {m.group(0)!r}")
    lo, hi = int(span.group(1), 16), int(span.group(2), 16)
    return lo, hi - lo


def guest_rate(lines: list[Progress]) -> float:
    """Pages the guest wrote per guest second over these lines (0 without two lines)."""
    if len(lines) < 2 or lines[-1].ms <= lines[0].ms:
        return 0.0
    return (lines[-1].pages - lines[0].pages) * 1000.0 / (lines[-1].ms - lines[0].ms)
