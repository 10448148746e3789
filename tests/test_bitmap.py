"""DirtyBitmap against a reference model: a Python set of dirty page numbers."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.dirty.bitmap import DirtyBitmap, _popcount_table, popcount
from orchestrator.dirty.bits import report_words as zeroed_report
from orchestrator.dirty.bits import words_for

PAGE = 4096


def report_words(bits: list[int] | set[int], nbits: int) -> np.ndarray:
    words = zeroed_report(nbits)
    for bit in bits:
        words[bit // 64] |= np.uint64(1 << bit % 64)
    return words


def touched(iova: int, length: int, page_size: int, npages: int) -> set[int]:
    """Bitmap pages a byte range touches, clipped: what the model expects to be marked."""
    if length <= 0:
        return set()
    return set(range(iova // page_size, min(-(-(iova + length) // page_size), npages)))


def report_pages(iova: int, page_size: int, bits, bitmap_page: int, npages: int) -> set[int]:
    return set().union(*(touched(iova + k * page_size, page_size, bitmap_page, npages) for k in bits))


# --- the bit layout (the architecture's report-bit invariant) --------------------------------


def test_bit_zero_of_word_zero_is_page_zero() -> None:
    bitmap = DirtyBitmap(256)
    bitmap.mark(0, 1)
    words = bitmap.harvest_words()
    assert words[0] == 1 and not words[1:].any()
    assert words.view(np.uint8)[0] == 1  # little-endian: the lowest byte holds pages 0..7


def test_page_69_is_bit_5_of_word_1() -> None:
    bitmap = DirtyBitmap(256)
    bitmap.mark(69 * PAGE, PAGE)
    words = bitmap.harvest_words()
    assert words[1] == 1 << 5 and words.sum() == 1 << 5


def test_report_bit_indexes_pages_from_the_report_iova() -> None:
    """Bit 5 of word 1 of a report at X is page X/ps + 69, not the `addr % 64` of the vfio.h
    comment, which would ignore the report base and the page shift."""
    bitmap = DirtyBitmap(1 << 12)
    iova = 1000 * PAGE
    report = np.zeros(2, dtype=np.uint64)
    report[1] = 1 << 5
    bitmap.merge_report(iova, PAGE, report)
    assert bitmap.harvest().tolist() == [iova // PAGE + 69]


def test_page_aligned_buffers() -> None:
    assert zeroed_report(100).ctypes.data % 4096 == 0
    assert DirtyBitmap(1 << 20).harvest_words().ctypes.data % 4096 == 0


# --- marking, clipping, counting ---------------------------------------------------------------


def test_mark_rounds_outward_and_clips() -> None:
    bitmap = DirtyBitmap(100)
    bitmap.mark(PAGE + 1, PAGE)  # touches pages 1 and 2
    bitmap.mark(99 * PAGE + 7, 10 * PAGE)  # runs off the end
    bitmap.mark(500 * PAGE, PAGE)  # entirely past the end
    bitmap.mark(5 * PAGE, 0)  # empty
    assert bitmap.harvest().tolist() == [1, 2, 99]


@pytest.mark.parametrize("npages", [1, 63, 64, 65, 1000])
def test_mark_all_sets_exactly_npages(npages: int) -> None:
    bitmap = DirtyBitmap(npages)
    bitmap.mark_all()
    assert bitmap.count() == npages
    assert bitmap.harvest().tolist() == list(range(npages))
    assert bitmap.count() == 0


def test_report_past_the_end_is_clipped() -> None:
    bitmap = DirtyBitmap(70)
    bitmap.merge_report(0, PAGE, report_words(range(200), 200))
    bitmap.merge_report(64 * PAGE + 3 * PAGE, PAGE, report_words(range(64), 64))
    bitmap.merge_report(0, 1 << 21, report_words([0], 1))
    assert bitmap.count() == 70
    assert bitmap.harvest().tolist() == list(range(70))


def test_report_starting_past_the_end_is_ignored() -> None:
    bitmap = DirtyBitmap(64)
    bitmap.merge_report(64 * PAGE, PAGE, report_words([0, 1], 64))
    assert bitmap.count() == 0


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        DirtyBitmap(0)
    with pytest.raises(ValueError):
        DirtyBitmap(10, page_size=3000)
    bitmap = DirtyBitmap(10)
    with pytest.raises(ValueError):
        bitmap.merge_report(0, 12288, np.zeros(1, dtype=np.uint64))
    with pytest.raises(ValueError):
        bitmap.merge_report(-PAGE, PAGE, np.zeros(1, dtype=np.uint64))
    with pytest.raises(ValueError):
        bitmap.mark(-PAGE, 2 * PAGE)


def test_failed_harvest_keeps_the_bits() -> None:
    bitmap = DirtyBitmap(1000)
    bitmap.mark(10 * PAGE, 100 * PAGE)
    with pytest.raises(ValueError):
        bitmap.harvest_words(out=np.empty(3, dtype=np.uint64))
    assert bitmap.harvest().tolist() == list(range(10, 110))


def test_harvest_words_reuses_the_callers_buffer() -> None:
    bitmap = DirtyBitmap(200)
    out = np.full(words_for(200), 7, dtype=np.uint64)
    bitmap.mark(64 * PAGE, PAGE)
    assert bitmap.harvest_words(out) is out
    assert out.tolist() == [0, 1, 0, 0]
    assert not bitmap.harvest_words(out).any()


def test_popcount_table_matches_native() -> None:
    words = np.random.default_rng(1).integers(0, 2**64, 1000, dtype=np.uint64)
    assert _popcount_table(words) == popcount(words) == sum(bin(int(w)).count("1") for w in words)


# --- page-size conversion ------------------------------------------------------------------


def test_coarse_report_bit_replicates() -> None:
    """One 2 MiB report bit dirties all 512 bitmap pages inside it."""
    bitmap = DirtyBitmap(4096)
    bitmap.merge_report(1 << 21, 1 << 21, report_words([1], 64))
    assert bitmap.harvest().tolist() == list(range(1024, 1536))


def test_fine_report_bits_reduce() -> None:
    """Two 2 KiB report pages inside one 4 KiB page dirty just that page."""
    bitmap = DirtyBitmap(64)
    bitmap.merge_report(0, 2048, report_words([6, 7, 9], 64))
    assert bitmap.harvest().tolist() == [3, 4]


def test_unaligned_report_pages_touch_two_pages() -> None:
    bitmap = DirtyBitmap(256)
    bitmap.merge_report(10 * PAGE + 100, PAGE, report_words([0, 70], 128))
    assert bitmap.harvest().tolist() == [10, 11, 80, 81]


@pytest.mark.parametrize("bitmap_page", [PAGE, 1 << 16])
@pytest.mark.parametrize("report_page", [2048, PAGE, 1 << 14, 1 << 21])
@pytest.mark.parametrize("offset", [0, 3, 64 * PAGE + 2048, 5 * (1 << 21) + 12345])
def test_large_dense_merge_matches_model(bitmap_page: int, report_page: int, offset: int) -> None:
    """Multi-chunk reports at shifted offsets, checked against a numpy bit-array model."""
    npages = 3 * (1 << 21) + 77
    rng = np.random.default_rng(report_page + offset)
    nbits = min(npages * bitmap_page // report_page + 100, 1 << 23)
    bits = np.flatnonzero(rng.random(nbits) < 0.001)
    report = np.zeros(words_for(nbits), dtype=np.uint64)
    np.bitwise_or.at(report, bits >> 6, np.left_shift(np.uint64(1), (bits & 63).astype(np.uint64)))

    bitmap = DirtyBitmap(npages, page_size=bitmap_page)
    bitmap.merge_report(offset, report_page, report)

    starts = offset + bits * report_page
    first = starts // bitmap_page
    last = (starts + report_page - 1) // bitmap_page
    expected = np.zeros(npages + 1, dtype=np.int64)
    np.add.at(expected, np.minimum(first, npages), 1)
    np.add.at(expected, np.minimum(last + 1, npages), -1)
    want = np.flatnonzero(np.cumsum(expected)[:npages])
    np.testing.assert_array_equal(bitmap.harvest(), want)


# --- random operation sequences against the set model ---------------------------------------

REPORT_PAGES = st.sampled_from([1 << s for s in range(11, 22)])
BITMAP_PAGES = st.sampled_from([2048, PAGE, 1 << 13, 1 << 16])


@st.composite
def operations(draw, npages: int, bitmap_page: int):
    span = npages * bitmap_page
    kind = draw(st.sampled_from(["mark", "merge", "merge", "harvest", "harvest_words", "count"]))
    if kind == "mark":
        return kind, draw(st.integers(0, span + bitmap_page)), draw(st.integers(0, span // 4))
    if kind != "merge":
        return (kind,)
    page_size = draw(REPORT_PAGES)
    align = draw(st.sampled_from([1, 512, 2048, PAGE, 64 * PAGE, page_size]))
    iova = draw(st.integers(0, (span + page_size) // align)) * align
    nbits = draw(st.integers(1, 300))
    bits = draw(st.sets(st.integers(0, nbits - 1), max_size=40))
    return kind, iova, page_size, nbits, bits


@st.composite
def scenarios(draw):
    bitmap_page = draw(BITMAP_PAGES)
    npages = draw(st.integers(1, 3000))
    ops = draw(st.lists(operations(npages, bitmap_page), max_size=25))
    return npages, bitmap_page, ops


@settings(max_examples=300, deadline=None, derandomize=True)
@given(scenarios())
def test_random_operations_match_set_model(scenario) -> None:
    npages, bitmap_page, ops = scenario
    bitmap = DirtyBitmap(npages, page_size=bitmap_page)
    model: set[int] = set()
    for op in ops:
        match op:
            case ("mark", iova, length):
                bitmap.mark(iova, length)
                model |= touched(iova, length, bitmap_page, npages)
            case ("merge", iova, page_size, nbits, bits):
                bitmap.merge_report(iova, page_size, report_words(bits, nbits))
                model |= report_pages(iova, page_size, bits, bitmap_page, npages)
            case ("harvest",):
                assert bitmap.harvest().tolist() == sorted(model)
                model.clear()
            case ("harvest_words",):
                runs = DirtyBitmap.runs(bitmap.harvest_words())
                assert runs.tolist() == DirtyBitmap.runs(np.array(sorted(model))).tolist()
                assert {p for start, n in runs for p in range(start, start + n)} == model
                model.clear()
            case ("count",):
                assert bitmap.count() == len(model)
    assert bitmap.dirty_pages().tolist() == sorted(model)
    assert bitmap.count() == len(model)
    bitmap.mark_all()
    assert bitmap.count() == npages


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.sets(st.integers(0, 64 * 9 - 1)))
def test_runs_from_words_and_pages_agree(pages: set[int]) -> None:
    ordered = sorted(pages)
    from_words = DirtyBitmap.runs(report_words(pages, 64 * 9))
    from_pages = DirtyBitmap.runs(np.array(ordered, dtype=np.int64))
    assert from_words.tolist() == from_pages.tolist()
    assert [p for start, n in from_words for p in range(start, start + n)] == ordered


def test_runs_of_nothing() -> None:
    assert DirtyBitmap.runs(np.zeros(4, dtype=np.uint64)).shape == (0, 2)
    assert DirtyBitmap.runs(np.empty(0, dtype=np.int64)).shape == (0, 2)


# --- concurrency (reports land in a private buffer, OR-ed in under a lock) -----------------


def test_concurrent_merges_lose_no_bit_across_harvests() -> None:
    """Writers merge disjoint and overlapping reports while a harvester keeps harvesting: the
    union of every harvest must be exactly everything merged."""
    npages = 1 << 20
    bitmap = DirtyBitmap(npages)
    rng = np.random.default_rng(7)
    # Reports of 1024+ words: numpy drops the GIL for them, so merges really overlap harvests.
    writers, rounds, report_pages_n = 4, 150, 1 << 16
    # Writers 0 and 1 own disjoint quarters; the others land anywhere, overlapping everyone.
    quarter = npages // 4
    lows = [0, quarter] + [0] * (writers - 2)
    highs = [quarter, 2 * quarter] + [npages] * (writers - 2)
    plans = [
        [(int(rng.integers(low, high - report_pages_n)), rng.integers(0, report_pages_n, 200)) for _ in range(rounds)]
        for low, high in zip(lows, highs, strict=False)
    ]
    merged = [set() for _ in range(writers)]
    harvested: list[np.ndarray] = []
    done = threading.Event()
    harvesting_started = threading.Event()  # writers pause halfway until harvests are under way

    def write(plan, seen: set[int]) -> None:
        scratch = zeroed_report(report_pages_n)
        for step, (base, bits) in enumerate(plan):
            if step == len(plan) // 2:
                assert harvesting_started.wait(timeout=30)
            scratch.fill(0)
            for bit in bits.tolist():
                scratch[bit // 64] |= np.uint64(1 << bit % 64)
            bitmap.merge_report(base * PAGE, PAGE, scratch)
            seen.update((base + bits).tolist())

    def harvest() -> None:
        while not done.is_set():
            harvested.append(bitmap.harvest())
            harvested.append(np.flatnonzero(np.unpackbits(bitmap.harvest_words().view(np.uint8), bitorder="little")))
            if len(harvested) >= 10:
                harvesting_started.set()

    with ThreadPoolExecutor(writers + 1) as pool:
        harvesting = pool.submit(harvest)
        for writing in [pool.submit(write, plan, seen) for plan, seen in zip(plans, merged, strict=False)]:
            writing.result()
        done.set()
        harvesting.result()
    harvested.append(bitmap.harvest())

    assert set(np.concatenate(harvested).tolist()) == set().union(*merged)
