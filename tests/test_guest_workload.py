"""The fw_cfg workload without QEMU: the data file, the checker's buffer rule on synthetic
RAM images, the QEMU arguments a command line needs, and the announce-line parsers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fixtures.guest import pattern
from fixtures.guest.pattern import (
    FWCFG_COPY,
    FWCFG_OFFSETS,
    FWCFG_SIZE,
    PAGE_SIZE,
    STATUS_ADDR,
    check_guest_ram,
    fwcfg_file,
    fwcfg_held,
    fwcfg_offset,
    fwcfg_words,
)
from orchestrator.lab import workload
from orchestrator.lab.workload import FWCFG_NAME, dma_window, fwcfg_buffer, qemu_args

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
ANNOUNCE = (
    "SeaBIOS (version 1.16.2)\nBooting from ROM..\n"
    "A pattern=idle base=0x00200000 pages=16384 dma=0x0ef00000-0x0ff00000 "
    "fwcfg=0x0ee00000-0x0ef00000 rate=0 tsc_khz=2450649\nP 0 512 1\n"
)


def test_file_words_are_distinct_multiples_of_the_constant() -> None:
    words = fwcfg_file().view("<u4")
    assert words.size == FWCFG_SIZE // 4 == 4 * MiB
    assert [int(w) for w in words[:3]] == [0x9E3779B1, 0x3C6EF362, 0xDAA66D13]
    assert int(words[-1]) == (FWCFG_SIZE // 4) * 0x9E3779B1 % 2**32
    # Multiplying by the constant's inverse gives back 1, 2, ...: no two words are alike.
    inverse = np.uint32(pow(0x9E3779B1, -1, 2**32))
    assert np.array_equal(words * inverse, np.arange(1, words.size + 1, dtype=np.uint32))


def test_module_writes_the_file_qemu_is_given(tmp_path: Path) -> None:
    out = tmp_path / "fwcfg.bin"
    subprocess.run([sys.executable, "-m", "fixtures.guest.pattern", "--write-fwcfg", str(out)], cwd=ROOT, check=True)
    assert out.read_bytes() == fwcfg_file().tobytes()


def test_copies_step_by_4k_and_wrap_after_3841() -> None:
    offsets = [fwcfg_offset(n) for n in range(2 * FWCFG_OFFSETS)]
    assert FWCFG_OFFSETS == 3841
    assert offsets[:3] == [0, 4096, 8192]
    assert offsets[FWCFG_OFFSETS - 1] == FWCFG_SIZE - FWCFG_COPY
    assert offsets[FWCFG_OFFSETS:] == offsets[:FWCFG_OFFSETS]
    assert len(set(offsets[:FWCFG_OFFSETS])) == FWCFG_OFFSETS
    # 15 s at the fwcfg workload's 256 copies a second before a content repeats.
    assert FWCFG_OFFSETS >= 15 * 256


def test_words_are_the_file_at_any_offset() -> None:
    data = fwcfg_file()
    for offset in (0, 4096, 5 * MiB + 12, FWCFG_SIZE - FWCFG_COPY):
        assert np.array_equal(fwcfg_words(offset, FWCFG_COPY), data[offset : offset + FWCFG_COPY])


def guest_image(offset: int) -> np.ndarray:
    """RAM of an idle guest whose 1 MiB fw_cfg buffer at 2 MiB holds the file at `offset`."""
    ram = np.zeros(4 * MiB, np.uint8)
    fields = dict(
        magic=pattern.STATUS_MAGIC,
        version=pattern.STATUS_VERSION,
        pattern=0,
        base=MiB,
        npages=16,
        dma_start=3 * MiB,
        dma_end=4 * MiB,
        hot_pages=16,
        fwcfg_start=2 * MiB,
        fwcfg_end=3 * MiB,
    )
    words = [fields.get(name, 0) for name in pattern._STATUS_FIELDS]
    ram[STATUS_ADDR : STATUS_ADDR + 8 * len(words)] = np.array(words, "<u8").view(np.uint8)
    ram[2 * MiB : 3 * MiB] = fwcfg_words(offset, FWCFG_COPY)
    return ram


def buffer_page(ram: np.ndarray, page: int) -> np.ndarray:
    at = 2 * MiB + page * PAGE_SIZE
    return ram[at : at + PAGE_SIZE]


@pytest.mark.parametrize("n", [0, 1, 2, 255, 256, 1000, 3839, 3840, 3841])
def test_checker_accepts_every_copy_offset(n: int) -> None:
    ram = guest_image(fwcfg_offset(n))
    result = check_guest_ram(ram)
    assert result.ok, result.errors
    assert (result.status.fwcfg_start, result.status.fwcfg_end) == (2 * MiB, 3 * MiB)
    assert fwcfg_held(ram[2 * MiB : 3 * MiB]) == fwcfg_offset(n)


@pytest.mark.parametrize(
    "offset, why",
    [
        (4, "one word off a copy offset"),
        (2048, "not 4 KiB aligned"),
        (FWCFG_SIZE - FWCFG_COPY + PAGE_SIZE, "the formula run past the end of the file"),
        (FWCFG_SIZE, "wholly past the end of the file"),
    ],
)
def test_checker_refuses_the_words_at_no_copy_offset(offset: int, why: str) -> None:
    ram = guest_image(offset)
    result = check_guest_ram(ram)
    assert not result.ok, why
    assert "256 page(s) of the fw_cfg buffer" in result.errors[0]
    assert fwcfg_held(ram[2 * MiB : 3 * MiB]) is None


def test_checker_names_pages_swapped_in_from_other_offsets() -> None:
    ram = guest_image(8 * MiB)
    # Page 3 as the copy at offset 0 left it, page 200 as the previous copy (4 KiB
    # back) left it: both still words of the file, just not of this copy.
    buffer_page(ram, 3)[:] = fwcfg_words(3 * PAGE_SIZE, PAGE_SIZE)
    buffer_page(ram, 200)[:] = fwcfg_words(8 * MiB - PAGE_SIZE + 200 * PAGE_SIZE, PAGE_SIZE)
    result = check_guest_ram(ram)
    assert len(result.errors) == 1
    assert "2 page(s) of the fw_cfg buffer" in result.errors[0]
    assert f"({8 * MiB:#x})" in result.errors[0]
    assert f"{2 * MiB + 3 * PAGE_SIZE:#x}, {2 * MiB + 200 * PAGE_SIZE:#x}" in result.errors[0]
    assert fwcfg_held(ram[2 * MiB : 3 * MiB]) is None


def test_checker_names_a_stale_first_page_not_the_rest() -> None:
    ram = guest_image(fwcfg_offset(41))
    buffer_page(ram, 0)[:] = fwcfg_words(fwcfg_offset(40), PAGE_SIZE)
    result = check_guest_ram(ram)
    assert len(result.errors) == 1
    assert result.errors[0].startswith("1 page(s) of the fw_cfg buffer")
    assert result.errors[0].endswith(f": {2 * MiB:#x}")


def test_checker_names_a_torn_word() -> None:
    ram = guest_image(fwcfg_offset(7))
    buffer_page(ram, 100)[4 * 9] ^= 1
    result = check_guest_ram(ram)
    assert len(result.errors) == 1
    assert result.errors[0].startswith("1 page(s) of the fw_cfg buffer")
    assert f"{2 * MiB + 100 * PAGE_SIZE:#x}" in result.errors[0]


def test_checker_refuses_a_never_written_buffer() -> None:
    ram = guest_image(0)
    ram[2 * MiB : 3 * MiB] = 0
    result = check_guest_ram(ram)
    assert not result.ok and "256 page(s) of the fw_cfg buffer" in result.errors[0]


def test_checker_ignores_the_buffer_of_a_guest_without_one() -> None:
    ram = guest_image(0)
    at = STATUS_ADDR + 8 * pattern._STATUS_FIELDS.index("fwcfg_start")
    ram[at : at + 16] = 0
    ram[2 * MiB : 3 * MiB] = 0xAA
    assert check_guest_ram(ram).ok
    ram[2 * MiB : 3 * MiB] = 0
    assert check_guest_ram(ram).ok


def test_qemu_args_give_the_file_only_to_fwcfg_guests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "a,b.bin"
    data.write_bytes(b"")
    monkeypatch.setattr(workload, "FWCFG_FILE", data)
    assert qemu_args("pattern=sweep wss=32M") == ()
    assert qemu_args(workload.WORKLOADS["fwcfg"]) == ("-fw_cfg", f"name={FWCFG_NAME},file={tmp_path}/a,,b.bin")
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
