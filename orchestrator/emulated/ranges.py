"""IOVA range bookkeeping shared by the vfio core and the drivers.

Ranges are (start, last) pairs with `last` inclusive, as interval-tree nodes are. A
zero-length START range becomes the node [iova, iova-1] (wrapping to U64_MAX at iova 0); the
overlap test below keeps the interval-tree predicate for those nodes too.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from orchestrator.emulated.runs import U64_MAX

Node = tuple[int, int]


def node_for(iova: int, length: int) -> Node:
    return iova, (iova + length - 1) & U64_MAX


def _overlaps(a: Node, b: Node) -> bool:
    """interval_tree_iter_first's test: a.start <= b.last and b.start <= a.last."""
    return a[0] <= b[1] and b[0] <= a[1]


class RangeTree:
    """The core's interval tree for START: rejects a node overlapping an earlier one.

    Well-formed nodes inserted so far are pairwise disjoint, so a bisect on starts finds the
    only candidates; the few degenerate (zero-length) nodes are checked one by one.
    """

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._proper: list[Node] = []
        self._degenerate: list[Node] = []
        self.nodes: list[Node] = []

    def overlaps(self, node: Node) -> bool:
        if any(_overlaps(node, d) for d in self._degenerate):
            return True
        start, last = node
        if last < start:
            candidates = self._proper
        else:
            i = bisect.bisect_right(self._starts, last)
            candidates = self._proper[i - 1 : i] if i else []
        return any(_overlaps(node, p) for p in candidates)

    def insert(self, node: Node) -> None:
        self.nodes.append(node)
        if node[1] < node[0]:
            self._degenerate.append(node)
            return
        i = bisect.bisect_right(self._starts, node[0])
        self._starts.insert(i, node[0])
        self._proper.insert(i, node)

    def in_order(self) -> list[Node]:
        """Nodes by start, equal starts in insertion order, as an rbtree walk yields them."""
        return sorted(self.nodes, key=lambda n: n[0])


def combine_iova_ranges(ranges: Sequence[Node], limit: int) -> list[Node]:
    """vfio_combine_iova_ranges: merge the smallest gaps until at most `limit` ranges remain.

    The kernel repeatedly merges the adjacent pair with the smallest `next.start - prev.last`
    (first such pair on ties). Merging a pair never changes any other gap, so that is the same
    as closing the `n - limit` smallest gaps at once, ranked by (gap, position).
    """
    nodes = sorted(ranges, key=lambda n: n[0])
    if len(nodes) <= max(limit, 1):
        return list(nodes)
    if limit <= 1:
        return [(nodes[0][0], nodes[-1][1])]
    gaps = [((nodes[i + 1][0] - nodes[i][1]) & U64_MAX, i) for i in range(len(nodes) - 1)]
    closed = {i for _, i in sorted(gaps)[: len(nodes) - limit]}
    out: list[Node] = []
    start = nodes[0][0]
    for i, (_, last) in enumerate(nodes):
        if i not in closed:
            out.append((start, last))
            if i + 1 < len(nodes):
                start = nodes[i + 1][0]
    return out
