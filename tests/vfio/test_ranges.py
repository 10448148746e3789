"""Range normalisation and the START fallback ladder, against simple reference models."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.vfio import IovaRange, VfioUsageError, combine_smallest_gap, normalize, start_ladder

PAGE = 4096
raw_ranges = st.lists(st.tuples(st.integers(0, 1 << 40), st.integers(1, 1 << 30)), min_size=1, max_size=40)


def covered_pages(ranges, page=PAGE):
    """Reference: the set of pages a range list touches (small inputs only)."""
    out = set()
    for iova, length in ranges:
        out.update(range(iova // page, (iova + length - 1) // page + 1))
    return out


def span_pages(ranges, page=PAGE):
    return sum(r.length for r in ranges) // page


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1 << 24), st.integers(1, 1 << 18)), min_size=1, max_size=20))
def test_normalize_matches_page_set(rs):
    out = normalize(rs, PAGE)
    assert all(r.iova % PAGE == 0 and r.length % PAGE == 0 for r in out)
    assert all(a.end < b.iova for a, b in itertools.pairwise(out)), "sorted, disjoint and not touching"
    got = set()
    for r in out:
        got.update(range(r.iova // PAGE, r.end // PAGE))
    assert got == covered_pages(rs)


@settings(max_examples=200, deadline=None)
@given(raw_ranges, st.integers(1, 50))
def test_combine_properties(rs, limit):
    exact = normalize(rs, PAGE)
    out = combine_smallest_gap(exact, limit)
    assert len(out) == min(len(exact), limit)
    for r in exact:  # every input byte stays covered
        assert any(c.iova <= r.iova and r.end <= c.end for c in out)
    assert all(a.end <= b.iova for a, b in itertools.pairwise(out))


def test_combine_ties_go_to_lowest_address():
    rs = [IovaRange(0, 0x1000), IovaRange(0x3000, 0x1000), IovaRange(0x6000, 0x1000)]
    # gaps (next.iova - prev.last): 0x3000-0xfff = 0x2001 and 0x6000-0x3fff = 0x2001: a tie
    assert combine_smallest_gap(rs, 2) == [IovaRange(0, 0x4000), IovaRange(0x6000, 0x1000)]


def test_combine_smallest_gap_first():
    rs = [IovaRange(0, 0x1000), IovaRange(0x10000, 0x1000), IovaRange(0x12000, 0x1000)]
    assert combine_smallest_gap(rs, 2) == [IovaRange(0, 0x1000), IovaRange(0x10000, 0x3000)]


def test_combine_limit_one_is_one_span():
    rs = [IovaRange(0x1000, 0x1000), IovaRange(1 << 40, 0x1000)]
    assert combine_smallest_gap(rs, 1) == [IovaRange(0x1000, (1 << 40) + 0x1000 - 0x1000)]


@settings(max_examples=150, deadline=None)
@given(raw_ranges, st.sampled_from([1, 2, 3, 8, 256]))
def test_ladder_rungs_shrink_and_cover(rs, max_ranges):
    exact = normalize(rs, PAGE)
    plans = list(start_ladder(rs, PAGE, max_ranges))
    counts = [len(p.ranges) for p in plans]
    assert counts == sorted(set(counts), reverse=True), "strictly fewer ranges each rung"
    assert counts[0] == min(len(exact), max_ranges) and counts[-1] == 1
    assert plans[-1].step == "span" or len(exact) == 1 or counts[-1] == 1
    for p in plans:
        assert len(p.ranges) <= max_ranges or p.step == "buckets"
        for r in exact:
            assert any(c.iova <= r.iova and r.end <= c.end for c in p.ranges)


def test_ladder_steps_named():
    rs = [(i * 0x100000, 0x1000) for i in range(40)] + [((8 << 30) + i * 0x100000, 0x1000) for i in range(40)]
    assert [p.step for p in start_ladder(rs, PAGE, 256)] == ["exact", "combined", "buckets", "span"]
    assert [p.step for p in start_ladder(rs, PAGE, 32)] == ["combined", "combined", "buckets", "span"]
    assert [p.step for p in start_ladder(rs, PAGE, 8)] == ["combined", "buckets", "span"]
    buckets = next(p for p in start_ladder(rs, PAGE, 256) if p.step == "buckets").ranges
    assert buckets[0].last < 1 << 32 <= buckets[1].iova


@pytest.mark.parametrize(
    "bad,needle",
    [
        ([(0, 0)], "non-empty"),
        ([(0x1000, -5)], "non-empty"),
        ([((1 << 64) - 0x1000, 0x2000)], "64-bit"),
        ([], "no IOVA ranges"),
    ],
)
def test_ladder_rejects_bad_input(bad, needle):
    with pytest.raises(VfioUsageError, match=needle):
        list(start_ladder(bad, PAGE, 256))


def test_normalize_rejects_non_pow2_page():
    with pytest.raises(VfioUsageError, match="power of two"):
        normalize([(0, 0x1000)], 3000)


def test_ladder_aligns_to_the_report_grid():
    grid = 64 * PAGE
    plans = list(start_ladder([(0x5000, 0x20000), (0x43000, 0x20000)], PAGE, 256, align=grid))
    assert plans[0].ranges == (IovaRange(0, 0x80000),), "both widened to the grid, then they touch"
    for p in plans:
        assert all(r.iova % grid == 0 and r.length % grid == 0 for r in p.ranges)
    with pytest.raises(VfioUsageError, match="multiple of the page size"):
        list(start_ladder([(0, PAGE)], 8192, 256, align=4096))
