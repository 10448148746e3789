"""Content hashing: every change to a page is seen until the destination holds it."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.dirty.bitmap import DirtyBitmap
from orchestrator.dirty.memory import MemoryLayout
from orchestrator.dirty.pagehash import page_hashes
from orchestrator.trackers import ContentTracker

PAGE = 4096
NPAGES = 32


def test_zero_page_hashes_to_zero_and_single_word_changes_always_show():
    mem = np.zeros(NPAGES * PAGE, np.uint8)
    assert not page_hashes(mem).any()
    words = mem.view(np.uint64)
    for i, v in [(0, 1), (511, 1 << 63), (512 * 3 + 7, 0xFFFF_FFFF_FFFF_FFFF)]:
        words[:] = 0
        words[i] = v
        h = page_hashes(mem)
        assert np.flatnonzero(h).tolist() == [i // 512]


def setup():
    mem = np.zeros(NPAGES * PAGE, np.uint8)
    layout = MemoryLayout.flat(NPAGES * PAGE)
    t = ContentTracker(mem)
    t.start(layout)
    return mem, t, DirtyBitmap(layout.npages, PAGE)


def send(mem, dst, t, pages):
    rows = mem.reshape(NPAGES, PAGE)[pages].copy()
    dst.reshape(NPAGES, PAGE)[pages] = rows
    t.record_sent(pages, rows)


def test_change_back_after_send_is_still_dirty():
    """The ABA case: hashing the source at collect time would miss it."""
    mem, t, bm = setup()
    dst = np.zeros_like(mem)
    mem[5 * PAGE] = 1
    t.collect(bm)
    pages = bm.harvest()
    assert pages.tolist() == [5]
    mem[5 * PAGE] = 2  # changes again before it is sent
    send(mem, dst, t, pages)  # destination now holds 2
    mem[5 * PAGE] = 1  # and back to what the last collect saw
    t.collect(bm)
    assert bm.harvest().tolist() == [5]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, NPAGES * PAGE - 1), st.integers(0, 255), st.booleans()), max_size=60))
def test_destination_converges(ops):
    """Random writes interleaved with collect+send rounds: after a final round with no
    writes, the destination equals the source."""
    mem, t, bm = setup()
    dst = np.zeros_like(mem)
    for off, val, round_now in ops:
        mem[off] = val
        if round_now:
            t.collect(bm)
            send(mem, dst, t, bm.harvest())
    t.collect(bm)
    send(mem, dst, t, bm.harvest())
    assert np.array_equal(mem, dst)
    t.collect(bm)
    assert bm.count() == 0, "nothing left dirty once the destination matches"


def test_regions_are_tracked_at_their_guest_addresses(tmp_path):
    """RAM above a PCI hole: guest pages 100.. live right after the low RAM in the file."""
    from orchestrator.dirty.memory import RamRegion
    from orchestrator.trackers import content_trackers

    path = tmp_path / "ram"
    np.zeros(8 * PAGE, np.uint8).tofile(path)
    layout = MemoryLayout((RamRegion(0, 4 * PAGE, None, 0), RamRegion(100 * PAGE, 4 * PAGE, None, 4 * PAGE)))
    trackers = content_trackers(layout, str(path))
    for t in trackers:
        t.start(layout)
    ram = np.memmap(path, np.uint8, mode="r+")
    ram[5 * PAGE] = 1  # file page 5 is guest page 101
    ram.flush()
    bm = DirtyBitmap(layout.npages, PAGE)
    for t in trackers:
        t.collect(bm)
    assert bm.harvest().tolist() == [101]
    assert [t.name for t in trackers] == ["content-0", "content-1"]
