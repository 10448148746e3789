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


@dataclass(frozen=True)
class Progress:
    """One `P <sweeps> <pages_written> <guest_ms>` line."""

    sweeps: int
    pages: int
    ms: int


def parse_progress(serial_text: str) -> list[Progress]:
    return [Progress(*map(int, m.groups())) for m in _PROGRESS.finditer(serial_text)]


def guest_rate(lines: list[Progress]) -> float:
    """Pages the guest wrote per guest second over these lines (0 without two lines)."""
    if len(lines) < 2 or lines[-1].ms <= lines[0].ms:
        return 0.0
    return (lines[-1].pages - lines[0].pages) * 1000.0 / (lines[-1].ms - lines[0].ms)
