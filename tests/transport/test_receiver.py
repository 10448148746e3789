"""The receiver refuses everything it should, with a clear error, and writes nothing then:
wrong token, replayed answers, garbage, truncated and oversize frames, out-of-range pages,
a second session while one runs."""

from __future__ import annotations

import asyncio
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.transport.auth import client_proof
from orchestrator.transport.protocol import HEADER, VERSION, Kind, PageBatch, PeerError, encode, pages_limit
from orchestrator.transport.receiver import Receiver
from orchestrator.transport.tcp import ReceiverRefused

from .conftest import NPAGES, PAGE, TOKEN, WELCOME_LIMIT, RawClient, open_sink, ram


async def refused(client: RawClient, match: str) -> None:
    with pytest.raises(PeerError, match=match):
        await client.reply({Kind.ACK: 0, Kind.WELCOME: WELCOME_LIMIT, Kind.CHALLENGE: 32})
    assert await client.reader.read() == b""  # and it hung up
    client.close()


def pages_frame(index: list[int], seq: int = 0) -> bytes:
    data = np.full((len(index), PAGE), 0xAB, np.uint8).tobytes()
    payload = struct.pack("<II", len(index), 0) + data + np.asarray(index, "<u8").tobytes()
    return encode(Kind.PAGES, seq, payload)


async def test_wrong_token_is_refused_and_nothing_written(served):
    before = served.held()
    client = await RawClient.connect(served.endpoint)
    server_nonce = await client.hello()
    client.send(
        encode(Kind.AUTH, 0, client_proof(b"not-the-token-at-all", server_nonce, client.nonce, client.session, 0))
    )
    client.send(pages_frame([1]))
    await refused(client, "authentication failed")
    assert np.array_equal(served.held(), before)


async def test_pages_before_authentication_are_refused(served):
    client = await RawClient.connect(served.endpoint)
    client.send(pages_frame([1]))
    await refused(client, "unexpected PAGES")
    assert not served.held().any()


async def test_replayed_answer_is_refused_on_a_new_connection(served):
    first = await RawClient.connect(served.endpoint)
    await first.login()
    hello, auth = first.sent
    first.close()
    replay = await RawClient.connect(served.endpoint)
    replay.send(hello)  # the same client nonce, session and lane ...
    await replay.reply({Kind.CHALLENGE: 32})  # ... meets a fresh server nonce
    replay.send(auth)
    replay.send(pages_frame([2]))
    await refused(replay, "authentication failed")
    assert not served.held().any()


async def test_reused_client_nonce_is_refused_even_with_a_valid_proof(served):
    first = await RawClient.connect(served.endpoint)
    await first.login()
    again = await RawClient.connect(served.endpoint)
    again.session = first.session
    server_nonce = await again.hello(nonce=first.nonce)
    again.send(encode(Kind.AUTH, 0, client_proof(TOKEN, server_nonce, first.nonce, again.session, 0)))
    await refused(again, "replayed client nonce")
    first.close()


@pytest.mark.parametrize(
    "frames, message",
    [
        ([b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"], "not a page-stream frame"),
        ([HEADER.pack(b"OP", VERSION + 1, Kind.PAGES, 8, 0)], "version"),
        ([pages_frame([NPAGES])], "outside the RAM file"),
        ([pages_frame([0, 5, 2**40])], "outside the RAM file"),
        ([HEADER.pack(b"OP", VERSION, Kind.PAGES, pages_limit(PAGE) + 1, 0)], "exceeds"),
        ([HEADER.pack(b"OP", VERSION, Kind.PAGES, 16, 0) + struct.pack("<II", 1, 0) + b"\0" * 8], "counts say"),
        ([encode(Kind.WELCOME, 0, b"x" * 80)], "unexpected WELCOME"),
    ],
)
async def test_bad_frames_after_login_are_refused_and_nothing_written(served, frames, message):
    client = await RawClient.connect(served.endpoint)
    await client.login()
    for f in frames:
        client.send(f)
    await refused(client, message)
    assert not served.held().any()


async def test_truncated_frame_writes_nothing(served):
    client = await RawClient.connect(served.endpoint)
    await client.login()
    client.send(pages_frame([4])[:-100])
    client.writer.write_eof()
    assert await client.reader.read() == b""
    client.close()
    assert not served.held().any()


async def test_a_good_frame_is_written_and_acknowledged(served):
    client = await RawClient.connect(served.endpoint)
    await client.login()
    client.send(pages_frame([4, 7], seq=9))
    assert (await client.reply({Kind.ACK: 0})).seq == 9
    held = served.held().reshape(NPAGES, PAGE)
    assert (held[[4, 7]] == 0xAB).all() and np.flatnonzero(held.any(axis=1)).tolist() == [4, 7]
    client.close()


async def test_second_session_refused_while_one_runs_but_a_reconnect_is_welcome(served, tmp_path):
    sink, _, _ = await open_sink(tmp_path, served.endpoint)
    try:
        (tmp_path / "other").mkdir()
        with pytest.raises(ReceiverRefused, match="busy"):
            await open_sink(tmp_path / "other", served.endpoint, seed=1)
        other = await RawClient.connect(served.endpoint)
        other.session = sink.session  # the same session id, proven with the token: a reconnect
        await other.login(lane=1)
        other.close()
    finally:
        sink.close()


async def test_session_ends_with_bye_and_the_next_one_is_admitted(served, tmp_path):
    sink, _, _ = await open_sink(tmp_path, served.endpoint)
    sink.close()
    await asyncio.wait_for(served.receiver.finished.wait(), 10)
    second, _, _ = await open_sink(tmp_path, served.endpoint, seed=1)
    second.close()


class _Writer:
    """Collects what the receiver writes when fed from an in-memory stream."""

    def __init__(self) -> None:
        self.out = bytearray()

    def write(self, data) -> None:
        self.out += data

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        pass

    def get_extra_info(self, name):
        return ("fuzz", 0)


async def _feed(receiver: Receiver, data: bytes) -> bytes:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    writer = _Writer()
    await receiver.serve(reader, writer)
    return bytes(writer.out)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_before_login_never_crash_or_write(tmp_path, data):
    path = ram(tmp_path / "fuzz")

    async def run() -> None:
        async with Receiver(str(path), TOKEN) as receiver:
            await _feed(receiver, data)

    asyncio.run(run())
    assert not np.fromfile(path, np.uint8).any()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2 * PAGE), st.sampled_from(list(Kind)))
def test_arbitrary_frames_after_login_stay_inside_the_file(tmp_path, body, kind):
    """After a genuine login, any frame kind with any payload: refused, or written strictly
    inside the file (the file keeps its size; the receiver survives)."""
    path = ram(tmp_path / "fuzz")
    session = b"s" * 16
    nonce = b"n" * 32

    async def run() -> None:
        async with Receiver(str(path), TOKEN) as receiver:
            # Answer the challenge by peeking at the nonce the receiver draws.
            reader, writer = asyncio.StreamReader(), _Writer()
            reader.feed_data(encode(Kind.HELLO, 0, nonce + session + b"\0\0"))
            task = asyncio.ensure_future(receiver.serve(reader, writer))
            while len(writer.out) < HEADER.size + 32:
                await asyncio.sleep(0)
            server_nonce = bytes(writer.out[HEADER.size : HEADER.size + 32])
            reader.feed_data(encode(Kind.AUTH, 0, client_proof(TOKEN, server_nonce, nonce, session, 0)))
            reader.feed_data(encode(kind, 1, body))
            reader.feed_eof()
            await task

    asyncio.run(run())
    assert path.stat().st_size == NPAGES * PAGE


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(0, NPAGES - 1), min_size=1, max_size=40))
def test_apply_writes_each_row_to_its_page_in_any_order(tmp_path, index):
    """Runs of consecutive pages are copied as slices, anything else by index; either way row i
    lands on page index[i] (the last row wins for a page named twice), and nothing else changes."""
    path = ram(tmp_path / "apply")
    rows = (np.arange(len(index), dtype=np.uint8) + 1)[:, None].repeat(PAGE, axis=1)
    expect = np.zeros((NPAGES, PAGE), np.uint8)
    for i, p in enumerate(index):
        expect[p] = rows[i]

    async def run() -> None:
        async with Receiver(str(path), TOKEN) as receiver:
            receiver.apply(PageBatch(np.array(index, np.int64), rows, np.zeros(0, np.int64)))

    asyncio.run(run())
    assert np.array_equal(np.fromfile(path, np.uint8).reshape(NPAGES, PAGE), expect)
