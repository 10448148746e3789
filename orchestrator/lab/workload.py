"""The fixture guest's workloads and what it prints: named presets for the demo and the
benchmarks, the QEMU arguments a guest command line needs, and parsers for its serial lines."""

from __future__ import annotations

import re
from dataclasses import dataclass

from orchestrator.native import builds
from orchestrator.native.presets import GUEST_PRESETS

#: The guest kernel in the per-user cache that is current when this module is imported
#: (`builds.ensure(builds.GUEST)` builds it there).
GUEST_ELF = builds.location(builds.GUEST)
#: What `fwcfg=` guests have QEMU's fw_cfg device copy into their RAM (`builds.FWCFG`).
FWCFG_FILE = builds.location(builds.FWCFG)
FWCFG_NAME = "opt/orchestrator/dma"

#: name -> guest command line: the presets of `native.presets`, by the name the lab uses.
WORKLOADS = GUEST_PRESETS

_PROGRESS = re.compile(r"^P (\d+) (\d+) (\d+)$", re.M)
_ERROR = re.compile(r"^E (.*)$", re.M)
_ANNOUNCE = re.compile(r"^A (.*)$", re.M)
_SPAN = re.compile(r"^(0x[0-9a-f]+)-(0x[0-9a-f]+)$", re.I)


def needs_fwcfg(append: str) -> bool:
    """Whether a guest command line has QEMU's fw_cfg device copy the data file (`fwcfg=`)."""
    return any(word.startswith("fwcfg=") for word in append.split())


def qemu_args(append: str) -> tuple[str, ...]:
    """Extra QEMU arguments for a guest command line: the fw_cfg data file when it has
    `fwcfg=`. Source and destination both need them: fw_cfg items are not migrated."""
    if not needs_fwcfg(append):
        return ()
    if not FWCFG_FILE.exists():
        raise FileNotFoundError(
            f"fw_cfg data file not built ({FWCFG_FILE}): the demo builds it on first use, "
            "`make fixtures` (or `python -m orchestrator.native.builds`) builds it now"
        )
    # QEMU's option syntax escapes a comma by doubling it.
    return ("-fw_cfg", f"name={FWCFG_NAME},file={str(FWCFG_FILE).replace(',', ',,')}")


@dataclass(frozen=True)
class Progress:
    """One `P <sweeps> <pages_written> <guest_ms>` line."""

    sweeps: int
    pages: int
    ms: int


def parse_progress(serial_text: str) -> list[Progress]:
    return [Progress(*map(int, m.groups())) for m in _PROGRESS.finditer(serial_text)]


def _announced_span(serial_text: str, key: str, what: str) -> tuple[int, int] | None:
    m = _ANNOUNCE.search(serial_text)
    if not m:
        return None
    fields = dict(kv.split("=", 1) for kv in m.group(1).split() if "=" in kv)
    span = _SPAN.match(fields.get(key, ""))
    if not span:
        raise ValueError(f"guest announced no {what}: {m.group(0)!r}")
    lo, hi = int(span.group(1), 16), int(span.group(2), 16)
    return lo, hi - lo


def dma_window(serial_text: str) -> tuple[int, int] | None:
    """(guest-physical start, length) of the RAM the guest leaves to devices, from its
    `A ... dma=S-E ...` line; None before the guest has announced itself."""
    return _announced_span(serial_text, "dma", "DMA window")


def fwcfg_buffer(serial_text: str) -> tuple[int, int] | None:
    """(guest-physical start, length) of the buffer QEMU's fw_cfg device writes by DMA, from
    the `A ... fwcfg=S-E ...` line of a `fwcfg=` guest; None before it has announced itself."""
    return _announced_span(serial_text, "fwcfg", "fw_cfg buffer")


def guest_errors(serial_text: str) -> list[str]:
    """The guest's `E <error>` lines: a failed check of its own (both guests print them)."""
    return _ERROR.findall(serial_text)


def guest_rate(lines: list[Progress]) -> float:
    """Pages the guest wrote per guest second over these lines (0 without two lines)."""
    if len(lines) < 2 or lines[-1].ms <= lines[0].ms:
        return 0.0
    return (lines[-1].pages - lines[0].pages) * 1000.0 / (lines[-1].ms - lines[0].ms)
