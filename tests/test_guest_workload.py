"""The fw_cfg workload without QEMU: the data file, the checker's buffer rule on synthetic
RAM images, the QEMU arguments a command line needs, and the announce-line parsers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fixtures.guest import pattern
from fixtures.guest.pattern import FWCFG_HALF, PAGE_SIZE, STATUS_ADDR, check_guest_ram, fwcfg_file
from orchestrator import workload
from orchestrator.workload import FWCFG_NAME, dma_window, fwcfg_buffer, qemu_args

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
ANNOUNCE = ("SeaBIOS (version 1.16.2)\nBooting from ROM..\n"
            "A pattern=idle base=0x00200000 pages=16384 dma=0x0ef00000-0x0ff00000 "
            "fwcfg=0x0ee00000-0x0ef00000 rate=0 tsc_khz=2450649\nP 0 512 1\n")


def test_file_words_are_distinct_multiples_of_the_constant() -> None:
    words = fwcfg_file().view("<u4")
    assert words.size == 2 * FWCFG_HALF // 4
    assert [int(w) for w in words[:3]] == [0x9E3779B1, 0x3C6EF362, 0xDAA66D13]
    assert np.unique(words).size == words.size


def test_module_writes_the_file_qemu_is_given(tmp_path: Path) -> None:
    out = tmp_path / "fwcfg.bin"
    subprocess.run([sys.executable, "-m", "fixtures.guest.pattern", "--write-fwcfg", str(out)],
                   cwd=ROOT, check=True)
    assert out.read_bytes() == fwcfg_file().tobytes()


def guest_image(half: int) -> np.ndarray:
    """RAM of an idle guest whose 1 MiB fw_cfg buffer at 2 MiB holds half `half`."""
    ram = np.zeros(4 * MiB, np.uint8)
    fields = dict(magic=pattern.STATUS_MAGIC, version=pattern.STATUS_VERSION, pattern=0,
                  base=MiB, npages=16, dma_start=3 * MiB, dma_end=4 * MiB, hot_pages=16,
                  fwcfg_start=2 * MiB, fwcfg_end=3 * MiB)
    words = [fields.get(name, 0) for name in pattern._STATUS_FIELDS]
    ram[STATUS_ADDR:STATUS_ADDR + 8 * len(words)] = np.array(words, "<u8").view(np.uint8)
    ram[2 * MiB:3 * MiB] = fwcfg_file()[half * FWCFG_HALF:(half + 1) * FWCFG_HALF]
    return ram


@pytest.mark.parametrize("half", [0, 1])
def test_checker_accepts_either_half(half: int) -> None:
    result = check_guest_ram(guest_image(half))
    assert result.ok, result.errors
    assert (result.status.fwcfg_start, result.status.fwcfg_end) == (2 * MiB, 3 * MiB)


def test_checker_names_pages_of_the_other_half() -> None:
    ram = guest_image(1)
    for page in (3, 200):
        at = 2 * MiB + page * PAGE_SIZE
        ram[at:at + PAGE_SIZE] = fwcfg_file()[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]
    result = check_guest_ram(ram)
    assert len(result.errors) == 1
    assert "2 page(s) of the fw_cfg buffer" in result.errors[0]
    assert f"{2 * MiB + 3 * PAGE_SIZE:#x}, {2 * MiB + 200 * PAGE_SIZE:#x}" in result.errors[0]


def test_checker_rejects_a_buffer_never_copied() -> None:
    ram = guest_image(0)
    ram[2 * MiB:3 * MiB] = 0
    result = check_guest_ram(ram)
    assert not result.ok and "256 page(s) of the fw_cfg buffer" in result.errors[0]


def test_checker_ignores_the_buffer_of_a_guest_without_one() -> None:
    ram = guest_image(0)
    at = STATUS_ADDR + 8 * pattern._STATUS_FIELDS.index("fwcfg_start")
    ram[at:at + 16] = 0
    ram[2 * MiB:3 * MiB] = 0xAA
    assert check_guest_ram(ram).ok


def test_qemu_args_give_the_file_only_to_fwcfg_guests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "a,b.bin"
    data.write_bytes(b"")
    monkeypatch.setattr(workload, "FWCFG_FILE", data)
    assert qemu_args("pattern=sweep wss=32M") == ()
    assert qemu_args(workload.WORKLOADS["fwcfg"]) == (
        "-fw_cfg", f"name={FWCFG_NAME},file={tmp_path}/a,,b.bin")
    data.unlink()
    with pytest.raises(FileNotFoundError, match="make fixtures"):
        qemu_args("pattern=idle fwcfg=8M")


def test_fwcfg_buffer_is_parsed_from_the_announce_line() -> None:
    assert fwcfg_buffer(ANNOUNCE) == (0xEE00000, MiB)
    assert dma_window(ANNOUNCE) == (0xEF00000, 16 * MiB)
    assert fwcfg_buffer("SeaBIOS (version 1.16.2)\n") is None
    with pytest.raises(ValueError, match="no fw_cfg buffer"):
        fwcfg_buffer(ANNOUNCE.replace("fwcfg=0x0ee00000-0x0ef00000 ", ""))
    with pytest.raises(ValueError, match="no fw_cfg buffer"):
        fwcfg_buffer(ANNOUNCE.replace("0x0ee00000-0x0ef00000", "0x0ee00000"))
