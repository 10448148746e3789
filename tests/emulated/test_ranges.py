"""vfio_combine_iova_ranges (linux-uapi §2.4) against a literal transcription of the kernel loop."""

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.emulated import combine_iova_ranges


def reference_combine(nodes, limit):
    """The kernel's loop as written: rescan for the smallest gap (strict <), merge, repeat."""
    nodes = [list(n) for n in sorted(nodes)]
    if limit == 1 and nodes:
        return [(nodes[0][0], nodes[-1][1])]
    while len(nodes) > limit:
        best, min_gap = None, 2**64 - 1
        for i in range(1, len(nodes)):
            gap = nodes[i][0] - nodes[i - 1][1]
            if gap < min_gap:
                best, min_gap = i, gap
        if best is None:
            break
        nodes[best - 1][1] = nodes[best][1]
        del nodes[best]
    return [tuple(n) for n in nodes]


@st.composite
def disjoint_ranges(draw):
    """Sorted, disjoint inclusive ranges on a small grid, so ties in gap size are common."""
    n = draw(st.integers(0, 24))
    cursor, out = 0, []
    for _ in range(n):
        cursor += draw(st.sampled_from([1, 2, 3, 5, 8])) * 4096
        length = draw(st.sampled_from([1, 2, 4])) * 4096
        out.append((cursor, cursor + length - 1))
        cursor += length
    return out


@settings(max_examples=300, deadline=None)
@given(disjoint_ranges(), st.integers(1, 30), st.randoms())
def test_combine_matches_the_kernel_loop(ranges, limit, rnd):
    shuffled = list(ranges)
    rnd.shuffle(shuffled)
    got = combine_iova_ranges(shuffled, limit)
    assert got == reference_combine(ranges, limit)
    assert len(got) == min(len(ranges), limit)
    covered = [(s, last) for s, last in got]
    for start, last in ranges:  # every input byte is still covered
        assert any(s <= start and last <= e for s, e in covered)
    for (_, a_last), (b_start, _) in itertools.pairwise(got):
        assert a_last < b_start


def test_smallest_gap_merges_first():
    ranges = [(0, 4095), (3 * 4096, 4 * 4096 - 1), (4 * 4096 + 4096, 6 * 4096 - 1)]
    assert combine_iova_ranges(ranges, 2) == [(0, 4095), (3 * 4096, 6 * 4096 - 1)]


def test_ties_go_to_the_lowest_address():
    ranges = [(0, 4095), (8192, 12287), (16384, 20479)]  # both gaps are 4097
    assert combine_iova_ranges(ranges, 2) == [(0, 12287), (16384, 20479)]


def test_gap_is_measured_from_the_inclusive_last():
    # gap(a,b) = 8192 - 4095 = 4097 (4096 hole bytes); gap(b,c) = 12288 - 12286 = 2 (one hole byte)
    ranges = [(0, 4095), (8192, 12286), (12288, 16383)]
    assert combine_iova_ranges(ranges, 2) == [(0, 4095), (8192, 16383)]


def test_limit_one_collapses_to_first_start_and_final_last():
    assert combine_iova_ranges([(1 << 30, (1 << 30) + 4095), (0, 4095), (8192, 8192 + 4095)], 1) == [
        (0, (1 << 30) + 4095)
    ]


def test_nothing_to_do():
    assert combine_iova_ranges([], 3) == []
    assert combine_iova_ranges([(0, 1)], 1) == [(0, 1)]
    assert combine_iova_ranges([(4, 5), (0, 1)], 5) == [(0, 1), (4, 5)]
