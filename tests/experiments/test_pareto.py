"""The Pareto front against a brute-force reference, and on a small sweep by hand."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from orchestrator.experiments.pareto import convergence_boundary, pareto_front


def brute_force(points):
    def beaten(i):
        x, y = points[i]
        return any(a <= x and b <= y and (a < x or b < y) for a, b in points)

    return sorted((i for i in range(len(points)) if not beaten(i)), key=lambda i: points[i])


coords = st.integers(0, 20).map(float)  # small integers: ties and duplicates are common


@given(st.lists(st.tuples(coords, coords), max_size=40))
def test_front_is_the_brute_force_one(points):
    assert sorted(pareto_front(points)) == sorted(brute_force(points))


def test_front_of_a_small_sweep():
    # (total ms, downtime ms): 1 and 3 trade time for downtime, 2 is beaten by 1, 4 by 3,
    # 5 is 3 again (both stay), 0 the fastest with the longest downtime.
    points = [(100.0, 90.0), (200.0, 40.0), (250.0, 45.0), (400.0, 10.0), (500.0, 10.0), (400.0, 10.0)]
    assert pareto_front(points) == [0, 1, 3, 5]
    assert pareto_front([]) == []


def test_convergence_boundary_is_the_smallest_limit_that_converged():
    rows = [
        {"scenario": "a", "downtime_limit_s": 0.05, "converged": False},
        {"scenario": "a", "downtime_limit_s": 0.1, "converged": True},
        {"scenario": "a", "downtime_limit_s": 0.3, "converged": True},
        {"scenario": "b", "downtime_limit_s": 0.3, "converged": False},
    ]
    assert convergence_boundary(rows, "downtime_limit_s") == {"a": 0.1, "b": None}
