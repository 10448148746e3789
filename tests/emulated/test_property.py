"""Random DMA on random trackers, reported at random page sizes, against a set-of-units model."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.emulated import EmulatedKernel, Mlx5Like, MttyLike, PdsLike

from .util import FEATURE, UserMem, do_start, report_arg

PAGE = 4096


def expected_bits(units, granule, iova, length, page_size):
    """iova_bitmap_set for each dirty unit the driver reports (those touching the range), by
    §3, into a page-aligned bitmap: a unit starting below iova or past the bitmap's last byte
    is dropped; one running past that byte sets bits through the last page iova_bitmap_get
    pins from the unit's first byte (one page more when that byte is not page-aligned)."""
    total = ((length - 1) // page_size) // 8 + 1
    bits = set()
    for u in units:
        start, last = u * granule, u * granule + granule - 1
        if start < iova or start >= iova + length:
            continue
        first_bit, last_bit = (start - iova) // page_size, (last - iova) // page_size
        if last_bit >= total * 8:
            byte = first_bit // 8
            pages = -(-(total - byte) // PAGE) + (byte % PAGE != 0)
            last_bit = min(last_bit, (byte // PAGE + pages) * PAGE * 8 - 1)
        bits.update(range(first_bit, last_bit + 1))
    return bits


@st.composite
def scenario(draw):
    kind = draw(st.sampled_from(["mlx5", "pds", "mtty"]))
    g_log = draw(st.integers(12, 21))
    granule = 1 << g_log
    block = 64 * granule  # region sizes in whole 64-page blocks keep pds' offsets byte-exact
    ranges, cursor = [], draw(st.integers(0, 4)) * block
    for _ in range(draw(st.integers(1, 3))):
        length = draw(st.integers(1, 3)) * block
        ranges.append((cursor, length))
        cursor += length + draw(st.integers(0, 2)) * block
    span = cursor + block
    writes = draw(st.lists(st.tuples(st.integers(0, span - 1), st.integers(1, 3 * granule)), min_size=0, max_size=12))
    p_log = draw(st.integers(12, 22))
    region = draw(st.sampled_from(ranges))
    k = draw(st.integers(0, region[1] // block - 1))
    n = draw(st.integers(1, region[1] // block - k))
    unaligned = kind != "pds" and draw(st.booleans())
    shift = draw(st.integers(0, 4)) * 4096 if unaligned else 0
    trim = draw(st.integers(0, 3)) * max(granule // 4, 4096) if unaligned else 0  # ends mid unit
    query = (region[0] + k * block + shift, n * block - shift - trim)
    if draw(st.booleans()):
        writes.append((query[0] + query[1] - 1, 1))  # the unit holding the query's last byte
    return kind, granule, ranges, writes, 1 << p_log, query


@settings(max_examples=120, deadline=None)
@given(scenario())
def test_report_matches_the_reference_model(case):
    kind, granule, ranges, writes, page_size, (q_iova, q_len) = case
    kernel = EmulatedKernel()
    if kind == "mlx5":
        model = Mlx5Like(max_ranges=4, min_page_size=granule, max_page_size=granule, max_addr_space=1 << 48)
    else:
        model = PdsLike() if kind == "pds" else MttyLike()
    fd = kernel.open_device(model)
    assert do_start(kernel, fd, ranges, page_size=granule) == granule

    dirty = set()
    for iova, length in writes:
        model.dma_write(iova, length)
        for start, size in ranges:
            lo, hi = max(iova, start), min(iova + length, start + size)
            if lo < hi and kind != "mtty":
                dirty.update(range(lo // granule, (hi - 1) // granule + 1))

    def report(iova, length):
        nbytes = ((length - 1) // page_size) // 8 + 1
        reach = (-(-nbytes // PAGE) + 1) * PAGE  # the furthest a tail unit's pin can end
        mem = UserMem(reach + 8)
        mem.put(reach, b"\x77" * 8)  # a canary right after it
        kernel.ioctl(fd, FEATURE, report_arg(iova, length, page_size, mem.addr))
        assert mem.bytes(reach, 8) == b"\x77" * 8
        return set(np.flatnonzero(mem.bits(0, reach * 8)).tolist())

    assert report(q_iova, q_len) == expected_bits(dirty, granule, q_iova, q_len, page_size)
    touched = {u for u in dirty if u * granule < q_iova + q_len and (u + 1) * granule > q_iova}
    remaining = dirty - touched  # read-and-clear forgets every unit the query touched
    wholes = ranges if kind == "pds" else [(0, ranges[-1][0] + ranges[-1][1])]  # pds: one region each
    for whole in wholes:
        assert report(*whole) == expected_bits(remaining, granule, *whole, page_size)
