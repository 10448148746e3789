"""Write-watch against child processes that write a shared file mapping: every page written
before a harvest is in that harvest or the next; without concurrent writes, exactly."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.dirty.bitmap import DirtyBitmap
from orchestrator.dirty.memory import MemoryLayout, RamRegion
from orchestrator.trackers import WriteWatchTracker
from orchestrator.writewatch import WriteWatch
from orchestrator.writewatch import watch as watch_module

from .children import BY_COMMAND, RANDOM_WRITER, command, spawn, spawned
from .conftest import collect, flat

PAGES = 4096  # the 16 MiB shared file


@pytest.fixture
def by_command(shared_file):
    child = spawn(BY_COMMAND, shared_file)
    watch = WriteWatch.open(child.pid, flat(shared_file))
    watch.scan(None)
    yield child, watch
    watch.close()
    child.kill()
    child.wait()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True)
@given(rounds=st.lists(st.lists(st.integers(0, PAGES - 1), max_size=200), min_size=1, max_size=4))
def test_each_harvest_is_exactly_the_pages_written(by_command, rounds):
    child, watch = by_command
    for pages in rounds:
        command(child, pages)
        assert collect(watch).tolist() == sorted(set(pages))
    assert collect(watch).size == 0  # read-and-reprotect: nothing is reported twice


def test_guest_addresses_follow_the_region(shared_file):
    """A region at guest-physical 4 GiB, backed from file offset 8 MiB: pages come back as
    guest page numbers of that region, and file bytes outside it are not reported."""
    with spawned(BY_COMMAND, shared_file) as child:
        layout = MemoryLayout((RamRegion(1 << 32, 4 << 20, str(shared_file), 8 << 20),))
        watch = WriteWatch.open(child.pid, layout)
        try:
            watch.scan(None)
            command(child, [0, 2048, 2049, 3071, 3072])  # file pages; 2048..3071 are the region
            assert collect(watch).tolist() == [(1 << 20) + 0, (1 << 20) + 1, (1 << 20) + 1023]
        finally:
            watch.close()


def test_concurrent_writes_land_in_that_harvest_or_the_next(shared_file):
    """A child rewrites random pages as fast as it can (its thread runs in user space, so
    the injector uses a syscall instruction from its text); a page whose content changed
    between the snapshots after harvests k-1 and k is in harvest k or k+1."""
    with spawned(RANDOM_WRITER, shared_file, "7") as child:
        watch = WriteWatch.open(child.pid, flat(shared_file))
        try:
            ram = np.memmap(shared_file, np.uint8, mode="r").reshape(PAGES, 4096)
            watch.scan(None)
            snapshots, harvests = [ram.copy()], []
            for _ in range(12):
                harvests.append(set(collect(watch).tolist()))
                snapshots.append(ram.copy())
            harvests.append(set(collect(watch).tolist()))
            assert sum(map(len, harvests)) > 1000  # the child did write meanwhile
            for k in range(1, len(snapshots)):
                changed = set(np.flatnonzero((snapshots[k] != snapshots[k - 1]).any(axis=1)).tolist())
                missed = changed - harvests[k - 1] - harvests[k]
                assert not missed, f"harvest {k}: {len(missed)} changed pages reported by neither"
        finally:
            watch.close()


def test_tracker_merges_into_the_bitmap_and_stop_ends_protection(by_command):
    child, watch = by_command
    tracker = WriteWatchTracker(watch)
    layout = MemoryLayout.flat(PAGES * 4096)
    bitmap = DirtyBitmap(layout.npages)
    tracker.start(layout)
    command(child, [3, 4, 5, 4000])
    tracker.collect(bitmap)
    assert bitmap.harvest().tolist() == [3, 4, 5, 4000]
    tracker.stop()
    command(child, [7])  # unprotected now: the child writes as before
    tracker.start(layout)  # a restart registers and arms again
    command(child, [9])
    tracker.collect(bitmap)
    assert bitmap.harvest().tolist() == [9]


def test_hugetlbfs_is_watched_at_its_page_size(hugetlb_file):
    """A write to one byte of a 2 MiB huge page reports all 512 of its 4 KiB guest pages, and
    a region that starts inside a huge page is registered from that page's start."""
    with spawned(BY_COMMAND, hugetlb_file) as child:
        layout = MemoryLayout((RamRegion(0, 12 << 20, str(hugetlb_file), 1 << 20),))  # starts mid-page
        watch = WriteWatch.open(child.pid, layout)
        try:
            lo, hi = watch.ranges[0].span
            assert lo % (2 << 20) == 0 and hi % (2 << 20) == 0 and hi - lo == 14 << 20
            watch.scan(None)
            command(child, [1024 + 3])  # file page 1027: the huge page at file offset 4 MiB
            assert collect(watch).tolist() == list(range(768, 768 + 512))  # guest = file - 1 MiB
        finally:
            watch.close()


def test_a_span_split_across_lanes_reports_exactly(shared_file, monkeypatch):
    """Spans of LANE_BYTES or more are scanned in parallel lanes (here 4 MiB stands in for
    the GiB of real use): pages on both sides of the cut come back, exactly once."""
    monkeypatch.setattr(watch_module, "LANE_BYTES", 4 << 20)
    with spawned(BY_COMMAND, shared_file) as child:
        watch = WriteWatch.open(child.pid, flat(shared_file))
        try:
            assert len(watch._lanes) == watch_module.SCAN_LANES
            watch.scan(None)
            pages = [0, PAGES // 2 - 1, PAGES // 2, PAGES - 1]
            command(child, pages)
            assert collect(watch).tolist() == pages
            assert collect(watch).size == 0
        finally:
            watch.close()
