"""The shared range and run operations against a reference model: sets of integers."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.dirty.ranges import (
    IovaRange,
    intersect,
    merge_inclusive,
    normalize,
    page_runs,
    subtract,
    union_runs,
    widen,
)

U64_MAX = (1 << 64) - 1
SPACE = 300  # small enough that every byte or page fits in a Python set

checked = settings(max_examples=300, deadline=None, derandomize=True)
ranges = st.lists(st.builds(IovaRange, st.integers(0, SPACE), st.integers(1, 60)), max_size=12)
grains = st.sampled_from([1, 2, 4, 16, 64])
runs = st.lists(st.tuples(st.integers(0, SPACE), st.integers(1, 40)), max_size=12)


def members(rs: list[IovaRange]) -> set[int]:
    return {x for r in rs for x in range(r.iova, r.end)}


def run_members(rows: np.ndarray) -> set[int]:
    return {p for first, n in rows.tolist() for p in range(first, first + n)}


def as_runs(rows: list[tuple[int, int]]) -> np.ndarray:
    return np.array(rows, np.int64).reshape(-1, 2)


def assert_canonical(rs: list[IovaRange]) -> None:
    """Sorted, non-empty, and neither overlapping nor touching."""
    assert all(r.length > 0 for r in rs)
    assert all(a.end < b.iova for a, b in pairwise(rs))


@checked
@given(st.builds(IovaRange, st.integers(0, SPACE), st.integers(1, 60)), grains)
def test_widen_is_the_grains_touched(r: IovaRange, grain: int) -> None:
    w = widen(r, grain)
    assert w.iova % grain == 0 and w.length % grain == 0
    assert members([w]) == {x for g in {b // grain for b in members([r])} for x in range(g * grain, (g + 1) * grain)}


@checked
@given(ranges, grains)
def test_normalize_covers_the_same_grains(rs: list[IovaRange], grain: int) -> None:
    out = normalize(rs, grain)
    assert_canonical(out)
    assert members(out) == members([widen(r, grain) for r in rs])


@checked
@given(ranges, ranges)
def test_intersect_is_set_intersection(a: list[IovaRange], b: list[IovaRange]) -> None:
    a, b = normalize(a, 1), normalize(b, 1)
    out = intersect(a, b)
    assert all(x.end <= y.iova for x, y in pairwise(out))
    assert members(out) == members(a) & members(b)


@checked
@given(ranges, ranges)
def test_subtract_is_set_difference(a: list[IovaRange], b: list[IovaRange]) -> None:
    a, b = normalize(a, 1), normalize(b, 1)
    out = subtract(a, b)
    assert all(x.length > 0 for x in out)
    assert all(x.end <= y.iova for x, y in pairwise(out))
    assert members(out) == members(a) - members(b)


@checked
@given(runs, runs)
def test_union_runs_is_set_union(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> None:
    out = union_runs(as_runs(a), as_runs(b))
    assert out.dtype == np.int64 and out.shape[1] == 2
    assert (out[:, 1] > 0).all()
    assert (out[1:, 0] > out[:-1].sum(axis=1)).all(), "sorted, disjoint and not touching"
    assert run_members(out) == run_members(as_runs(a)) | run_members(as_runs(b))


@checked
@given(
    st.lists(st.tuples(st.integers(0, SPACE), st.integers(0, 40)), max_size=12), st.sampled_from([np.int64, np.uint64])
)
def test_merge_inclusive_is_set_union(rows: list[tuple[int, int]], dtype: type) -> None:
    first = np.array([f for f, _ in rows], dtype)
    last = np.array([f + n for f, n in rows], dtype)
    lo, hi = merge_inclusive(first, last)
    assert lo.dtype == hi.dtype == dtype
    assert (lo <= hi).all()
    assert (lo[1:] > hi[:-1] + 1).all(), "sorted, disjoint and not adjacent"
    expect = {x for f, n in rows for x in range(f, f + n + 1)}
    assert {x for a, b in zip(lo.tolist(), hi.tolist(), strict=False) for x in range(a, b + 1)} == expect


def test_merge_inclusive_at_the_top_of_u64() -> None:
    """A run ending at 2^64 - 1 merges with its neighbour without `last + 1` wrapping to 0."""
    first = np.array([U64_MAX - 9, 0, U64_MAX - 4], np.uint64)
    last = np.array([U64_MAX - 5, 3, U64_MAX], np.uint64)
    lo, hi = merge_inclusive(first, last)
    assert lo.tolist() == [0, U64_MAX - 9] and hi.tolist() == [3, U64_MAX]


@checked
@given(st.sets(st.integers(0, SPACE)))
def test_page_runs_of_a_set_are_its_maximal_runs(pages: set[int]) -> None:
    out = page_runs(np.array(sorted(pages), np.int64))
    assert out.dtype == np.int64 and out.shape == (len(out), 2)
    assert run_members(out) == pages
    assert (out[1:, 0] > out[:-1].sum(axis=1)).all(), "maximal: no two runs touch"


@checked
@given(st.lists(st.integers(0, 40), max_size=30))
def test_page_runs_of_any_sequence_follow_its_order(pages: list[int]) -> None:
    """Unsorted or repeated numbers split into the stretches that go up by one, in order: the
    runs laid end to end are the sequence itself."""
    out = page_runs(np.array(pages, np.int64))
    assert [p for first, n in out.tolist() for p in range(first, first + n)] == pages
    assert (out[1:, 0] != out[:-1].sum(axis=1)).all(), "each stretch is as long as it goes"
