"""The workload and cost models against hand-computed expectations."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.experiments.errors import ExperimentError
from orchestrator.experiments.model import (
    PRESETS,
    CollectModel,
    DirtyInterval,
    GuestWorkload,
    LinkModel,
    Pattern,
    StepCosts,
    TraceWorkload,
    _distinct,
    step_key,
    working_set,
)
from orchestrator.experiments.trace import Collect, Decision, Round, Step, Throttle, Trace, TraceHeader, TraceKind
from orchestrator.lab.workload import WORKLOADS
from orchestrator.migration.engine import RoundRecord

PAGE = 4096
MIB, GIB = 1 << 20, 1 << 30


def test_presets_are_the_fixture_guests():
    assert PRESETS is WORKLOADS, "one home: orchestrator.native.presets"


def test_distinct_pages_of_uniform_writes():
    assert _distinct(2, 2) == pytest.approx(1.5)  # 2 * (1 - (1/2)^2)
    assert _distinct(1000, 1000) == pytest.approx(1000 * (1 - 0.999**1000))
    assert _distinct(10, 0) == 0.0 and _distinct(1, 5) == 1.0


def guest(append: str, ram: int = 64 * MIB) -> GuestWorkload:
    return GuestWorkload.from_command_line(append, ram)


def test_sweep_is_a_run_from_the_cursor():
    w = guest("pattern=sweep wss=400K rate=4000K")  # 100 pages, 1000 writes a second
    assert (w.wss_pages, w.rate_pps, w.base_page) == (100, 1000.0, 512)
    assert w.pages(0.0, 0.05).tolist() == list(range(512, 562))
    assert w.pages(0.15, 0.20).tolist() == list(range(512 + 50, 512 + 100))  # cursor at write 150 = page 50
    assert w.pages(0.18, 0.23).tolist() == [*range(512, 512 + 30), *range(512 + 80, 512 + 100)]  # wraps
    assert w.dirtied(0.0, 5.0) == 100


def test_random_and_hotcold_counts():
    w = guest("pattern=random wss=4M rate=4M")  # 1024 pages, 1024 writes a second
    assert w.dirtied(0.0, 1.0) == round(1024 * (1 - (1 - 1 / 1024) ** 1024))
    pages = w.pages(0.0, 1.0)
    assert pages.min() >= 512 and pages.max() < 512 + 1024 and len(set(pages.tolist())) == pages.size
    h = guest("pattern=hotcold wss=4M rate=4M hot=25 hotw=50")  # 256 hot pages take half the writes
    assert h.hot_pages == 256 and h.hot_write_share == pytest.approx(0.5)
    assert h.dirtied(0.0, 1.0) == round(_distinct(256, 512)) + round(_distinct(768, 512))
    hot = h.pages(0.0, 1.0)
    assert (hot < 512 + 256).sum() == round(_distinct(256, 512))


def test_fwcfg_buffer_and_idle():
    w = guest("fwcfg")  # 32 MiB sweep at 8192 pages/s, 256 copies a second of 256 pages
    assert w.dirtied(0.0, 0.01) == 82 + 256
    assert w.resident_pages() == 8192 + 256
    assert guest("idle").dirtied(0.0, 100.0) == 0


def test_unpaced_guest_and_bad_lines():
    assert guest("heavy", 256 * MIB).rate_pps > 0  # rate=0: as fast as it can (the assumed figure)
    with pytest.raises(ExperimentError, match="pattern=zigzag"):
        guest("pattern=zigzag")
    with pytest.raises(ExperimentError, match="does not fit"):
        guest("pattern=sweep wss=1G", 64 * MIB)
    with pytest.raises(ExperimentError, match="not a size"):
        guest("pattern=sweep wss=lots")


def sets(npages: int, *pages: list[int]) -> list[np.ndarray]:
    out = []
    for p in pages:
        bits = np.zeros(npages, bool)
        bits[p] = True
        out.append(bits)
    return out


def test_trace_windows_union_share_and_repeat():
    a, b = sets(8, [0, 1], [2, 3, 4, 5])
    w = TraceWorkload([DirtyInterval(0.0, 1.0, a), DirtyInterval(1.0, 2.0, b)], 8)
    assert w.dirtied(0.0, 2.0) == 6
    assert w.dirtied(0.0, 1.0) == 2
    half = w.pages(0.5, 1.5)
    assert set(half.tolist()) <= {0, 1, 2, 3, 4, 5}
    assert w.pages(0.5, 1.5).tolist() == half.tolist()  # deterministic
    assert w.dirtied(2.0, 3.0) == 2  # past the end: the trace again from its start
    assert w.dirtied(0.3, 9.0) == 6  # longer than the trace: everything it saw
    assert working_set(w, [2.0]) == [6.0]


def header(kind=TraceKind.MIGRATION, ram=GIB) -> TraceHeader:
    return TraceHeader(kind=kind, page_size=PAGE, ram_bytes=ram, npages=ram // PAGE)


def rnd(n: int, nbytes: int, seconds: float, ended: float) -> Round:
    pages = nbytes // PAGE
    return Round(ended, RoundRecord(n, pages, pages, nbytes, seconds * 1e3, 0.0, 0.0, ended * 1e3))


def test_a_migration_trace_on_guest_time():
    npages = 16
    pages = [np.array([0, 1]), np.array([2]), np.array([3, 4, 5])]
    trace = Trace(
        TraceHeader(kind=TraceKind.MIGRATION, page_size=PAGE, ram_bytes=npages * PAGE, npages=npages),
        [
            rnd(0, 4 * PAGE, 1.0, 1.0),  # round 0 ran over (0, 1]
            Collect(2.0, 1, 0, 1.0, False, pages[0]),
            Throttle(2.0, 0.5),
            Collect(4.0, 2, 0, 1.0, False, pages[1]),  # two seconds at half speed: one guest second
            Collect(5.0, 3, None, None, True, pages[2]),
        ],
    )
    w = TraceWorkload.from_trace(trace)
    assert [(iv.start_s, iv.end_s) for iv in w.intervals] == [(0.0, 2.0), (2.0, 3.0), (3.0, 3.5)]
    assert w.resident_pages() == 4
    # With its steps: sets start when tracking did and end where their collects began; the
    # guest stops with QEMU at pre-switchover (DevicesStopCopy follows it).
    steps = [
        Step(0.5, "StartTrackers", {}),
        Step(1.5, "Collect", {"round": 1, "final": False}),
        Step(3.5, "Collect", {"round": 2, "final": False}),
        Step(4.5, "DevicesStopCopy", {}),
        Step(4.8, "Collect", {"round": 3, "final": True}),
    ]
    timed = TraceWorkload.from_trace(Trace(trace.header, sorted([*trace.records, *steps], key=lambda r: r.t)))
    assert [(iv.start_s, iv.end_s) for iv in timed.intervals] == [(0.5, 1.5), (1.5, 2.75), (2.75, 3.25)]


def test_a_run_cancelled_before_any_harvest_replays_its_count():
    # Cancelled at the first decision: that collect was never harvested, so only its count is known.
    decision = Decision(1.2, {"round": 1, "decision": "cancel", "pending-pages": 300, "collect-ms": 2.0})
    trace = Trace(header(ram=4 * MIB), [rnd(0, 40 * PAGE, 1.0, 1.0), decision])
    w = TraceWorkload.from_trace(trace)
    assert [(iv.start_s, iv.end_s, int(iv.bits.sum())) for iv in w.intervals] == [(0.0, 1.2, 300)]
    assert w.resident_pages() == 40
    harvested = Collect(1.3, 1, 0, 2.0, False, np.arange(300))  # negative control: a harvest holds the pages
    assert TraceWorkload.from_trace(Trace(trace.header, [*trace.records, harvested])).pages(0.0, 9.0).tolist() == list(
        range(300)
    )


def test_consecutive_windows_split_a_set():
    (bits,) = sets(1000, list(range(1000)))
    w = TraceWorkload([DirtyInterval(0.0, 1.0, bits)], 1000)
    first, second = w.pages(0.0, 0.4), w.pages(0.4, 1.0)
    assert not set(first.tolist()) & set(second.tolist())  # each page written once, in one of them
    assert first.size + second.size == 1000
    assert 300 < first.size < 500  # about 40% of it


def test_step_costs_name_real_steps():
    with pytest.raises(ExperimentError, match="Teleport"):
        StepCosts({"Teleport": 1.0})
    with pytest.raises(ExperimentError, match="RESUME"):
        StepCosts({}, resume_s=-1.0)
    costs = StepCosts({"Collect:final": -0.002, "Prepare": 0.01})
    assert step_key("Collect", final=True) == "Collect:final" and step_key("Collect") == "Collect"
    assert costs.spend("Collect:final", 0.003) == pytest.approx(0.001)
    assert costs.spend("Collect:final", 0.001) == 0.0  # a step never takes less than nothing
    assert costs.spend("Prepare") == 0.01 and costs.spend("Listen") == 0.0


def test_link_fit_recovers_bandwidth_and_overhead():
    rounds = [rnd(0, 512 * MIB, 0.6, 0.6)] + [
        rnd(i, n, 0.002 + n / 1e9, 1.0 + i) for i, n in enumerate([64 * MIB, 16 * MIB, 4 * MIB, 1 * MIB], 1)
    ]
    rounds.append(rnd(5, 4096, 0.0001, 6.0))  # a final copy of one page times overhead: left out
    link = LinkModel.fit(Trace(header(), rounds))
    assert link.bandwidth_bps == pytest.approx(1e9, rel=1e-6)
    assert link.overhead_s == pytest.approx(0.002, rel=1e-6)
    # round 0: 0.6 s = scan of 1 GiB + 0.002 + 512 MiB / 1e9
    assert link.scan_bps == pytest.approx(GIB / (0.6 - 0.002 - 512 * MIB / 1e9), rel=1e-6)
    assert link.send_s(0) == 0.0 and link.capped(1e8).send_s(10**8) == pytest.approx(1.002)


def test_a_run_that_converged_at_once_fits_its_final_copy():
    # Round 0 (a scan of all RAM) and the final copy: the copy is the only bandwidth sample.
    rounds = [rnd(0, 128 * MIB, 0.25, 0.25), rnd(1, 64 * MIB, 64 * MIB / 2.5e9, 0.3)]
    link = LinkModel.fit(Trace(header(), rounds))
    assert link.bandwidth_bps == pytest.approx(2.5e9, rel=1e-6) and link.overhead_s == 0.0
    assert link.round0_s(128 * MIB, GIB) == pytest.approx(0.25, rel=1e-6)


def test_collect_fit():
    collects = [
        Collect(float(i), i, 0, 2.0 + 0.001 * n, False, np.arange(n)) for i, n in enumerate([10, 1000, 5000], 1)
    ]
    model = CollectModel.fit(Trace(header(ram=2 * GIB), collects))
    assert model.per_gib_s == pytest.approx(0.001, rel=1e-6)  # 2 ms per collect over 2 GiB
    assert model.per_page_s == pytest.approx(1e-6, rel=1e-6)
    assert model.seconds(1000, 2 * GIB) == pytest.approx(0.003)
    assert CollectModel.fit(Trace(header(), [])) == CollectModel()


def test_patterns_are_the_guests():
    assert {p.value for p in Pattern} == {"idle", "sweep", "random", "hotcold"}
