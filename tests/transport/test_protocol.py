"""Frame encoding and the receiver's strict decoding: every index, length and count is checked
against the RAM file before anything is written; arbitrary bytes never get further."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.transport.protocol import (
    HEADER,
    MAX_BATCH_PAGES,
    MAX_PLANNED_RUNS,
    VERSION,
    Kind,
    ProtocolError,
    decode_pages,
    decode_ranges,
    encode,
    encode_pages,
    frame_bytes,
    pages_limit,
    parse_header,
    plan_pages,
)

PAGE = 4096
FILE_PAGES = 64


def pages_payload(index, data, runs=()) -> bytes:
    """A PAGES payload built by hand (any counts, any numbers)."""
    out = struct.pack("<II", len(index), len(runs)) + np.asarray(data, np.uint8).tobytes()
    out += np.asarray(index, "<u8").tobytes()
    for first, count in runs:
        out += struct.pack("<QQ", first, count)
    return out


def test_encode_gathers_and_sends_zero_pages_as_runs():
    rows = np.zeros((16, PAGE), np.uint8)
    rows[[1, 5, 9], 7] = [1, 5, 9]
    local = np.array([1, 2, 3, 5, 9, 10])
    enc = encode_pages(7, rows, local, local + 100, bytearray(frame_bytes(PAGE)))
    kind, length, seq = parse_header(bytes(enc.frame[: HEADER.size]), {Kind.PAGES: pages_limit(PAGE)})
    assert (kind, seq, length) == (Kind.PAGES, 7, len(enc.frame) - HEADER.size)
    assert enc.is_data.tolist() == [True, False, False, True, True, False]
    batch = decode_pages(bytes(enc.frame[HEADER.size :]), PAGE, 200)
    assert batch.index.tolist() == [101, 105, 109]
    assert batch.data[:, 7].tolist() == [1, 5, 9]
    assert batch.zero.tolist() == [102, 103, 110]  # runs (102, 2) and (110, 1)


def test_encode_without_zero_search_sends_every_page_as_data():
    rows = np.zeros((4, PAGE), np.uint8)
    enc = encode_pages(0, rows, np.arange(4), np.arange(4), bytearray(frame_bytes(PAGE)), find_zero=False)
    assert enc.is_data.all() and decode_pages(bytes(enc.frame[HEADER.size :]), PAGE, 4).index.tolist() == [0, 1, 2, 3]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 4 * MAX_BATCH_PAGES - 1), min_size=1, max_size=MAX_BATCH_PAGES, unique=True),
    st.sets(st.integers(0, 4 * MAX_BATCH_PAGES - 1)),
    st.booleans(),
    st.integers(0, 1000),
)
def test_planned_frame_is_the_gathered_frame_byte_for_byte(local, zero_rows, find_zero, base):
    """Sending runs straight from the source writes exactly the frame a gather would."""
    rows = np.zeros((4 * MAX_BATCH_PAGES, 64), np.uint8)  # small pages keep the example fast
    rows[:, 3] = np.arange(len(rows)) % 255 + 1
    rows[sorted(zero_rows)] = 0
    local = np.array(sorted(local))
    index = local + base
    gathered = encode_pages(5, rows, local, index, bytearray(HEADER.size + pages_limit(64)), find_zero)
    planned = plan_pages(5, rows, local, index, find_zero)
    if planned is None:  # too scattered to send from the source: more runs than the limit
        assert len(np.flatnonzero(np.diff(local) != 1)) >= MAX_PLANNED_RUNS or find_zero
        return
    assert b"".join(bytes(p) for p in planned.pieces()) == bytes(gathered.frame)
    assert planned.nbytes == len(gathered.frame)
    assert planned.is_data.tolist() == gathered.is_data.tolist()


def test_planned_frame_refuses_a_scattered_batch():
    rows = np.ones((64, 64), np.uint8)
    n = MAX_PLANNED_RUNS
    assert len(plan_pages(0, rows, np.arange(0, 2 * n, 2), np.arange(n)).runs) == n
    assert plan_pages(0, rows, np.arange(0, 2 * n + 2, 2), np.arange(n + 1)) is None


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\x01\x00", "shorter than its counts"),
        (pages_payload([0], np.zeros((1, PAGE)))[:-1], "its counts say"),
        (pages_payload([FILE_PAGES], np.zeros((1, PAGE))), "outside the RAM file"),
        (pages_payload([2**64 - 1], np.zeros((1, PAGE))), "outside the RAM file"),
        (pages_payload([], [], [(FILE_PAGES - 1, 2)]), "reaches past the RAM file"),
        (pages_payload([], [], [(0, 0)]), "zero run is empty"),
        (pages_payload([], [], [(2**64 - 1, 2**64 - 1)]), "reaches past"),
        (struct.pack("<II", MAX_BATCH_PAGES + 1, 0), "exceeds"),
    ],
)
def test_decode_rejects_inconsistent_pages(payload, message):
    with pytest.raises(ProtocolError, match=message):
        decode_pages(payload, PAGE, FILE_PAGES)


def test_decode_accepts_the_whole_file():
    batch = decode_pages(pages_payload([0], np.ones((1, PAGE)), [(1, FILE_PAGES - 1)]), PAGE, FILE_PAGES)
    assert batch.index.tolist() == [0] and batch.zero.tolist() == list(range(1, FILE_PAGES))


def test_a_batch_may_not_cover_more_pages_than_the_limit():
    runs = [(0, MAX_BATCH_PAGES), (MAX_BATCH_PAGES, 1)]
    with pytest.raises(ProtocolError, match="more than"):
        decode_pages(pages_payload([], [], runs), PAGE, 4 * MAX_BATCH_PAGES)


@pytest.mark.parametrize(
    "head, message",
    [
        (HEADER.pack(b"XX", 1, Kind.PAGES, 0, 0), "magic"),
        (HEADER.pack(b"OP", 9, Kind.PAGES, 0, 0), "version 9"),
        (HEADER.pack(b"OP", VERSION, 200, 0, 0), "unknown kind 200"),
        (HEADER.pack(b"OP", VERSION, Kind.VERIFY, 0, 0), "unexpected VERIFY"),
        (HEADER.pack(b"OP", VERSION, Kind.PAGES, pages_limit(PAGE) + 1, 0), "exceeds"),
    ],
)
def test_header_rejected_before_any_payload_is_read(head, message):
    with pytest.raises(ProtocolError, match=message):
        parse_header(head, {Kind.PAGES: pages_limit(PAGE)})


def test_verify_ranges_bounded():
    ok = np.array([[0, FILE_PAGES]], "<u8").tobytes()
    assert decode_ranges(ok, FILE_PAGES).tolist() == [[0, FILE_PAGES]]
    for bad in (
        b"",
        b"\x00" * 15,
        np.array([[1, FILE_PAGES]], "<u8").tobytes(),
        np.array([[0, 40], [0, 40]], "<u8").tobytes(),
    ):
        with pytest.raises(ProtocolError):
            decode_ranges(bad, FILE_PAGES)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3 * PAGE))
def test_arbitrary_payload_is_refused_or_stays_inside_the_file(payload):
    pages = np.zeros((FILE_PAGES + 1, PAGE), np.uint8)  # the last row stands for "outside"
    inside = pages[:FILE_PAGES]
    try:
        batch = decode_pages(payload, PAGE, FILE_PAGES)
    except ProtocolError:
        return
    inside[batch.index] = batch.data
    inside[batch.zero] = 0
    assert not pages[FILE_PAGES].any()


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.integers(0, 2**64 - 1), max_size=6),
    st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), max_size=6),
)
def test_arbitrary_numbers_in_a_well_formed_payload(index, runs):
    payload = pages_payload(index, np.ones((len(index), PAGE)), runs)
    try:
        batch = decode_pages(payload, PAGE, FILE_PAGES)
    except ProtocolError:
        return
    assert all(0 <= p < FILE_PAGES for p in batch.index.tolist() + batch.zero.tolist())


def test_encode_header_round_trip():
    frame = encode(Kind.ACK, 42)
    assert parse_header(frame, {Kind.ACK: 0}) == (Kind.ACK, 0, 42)
