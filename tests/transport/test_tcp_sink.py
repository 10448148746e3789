"""The TCP sink keeps the PageSink contract: bit-exact rounds, `on_sent` with the bytes sent,
verification that finds planted differences; and through faults: connections cut mid-frame in
either direction still end bit-exact, a receiver gone for good or restarted fails clearly."""

from __future__ import annotations

import asyncio
import subprocess

import numpy as np
import pytest

from orchestrator.dirty.memory import MemoryLayout, RamRegion
from orchestrator.transport.auth import load_token, write_token
from orchestrator.transport.bucket import TokenBucket
from orchestrator.transport.endpoint import Endpoint, client_context, parse_endpoint, server_context
from orchestrator.transport.receiver import Receiver
from orchestrator.transport.tcp import (
    ExpectedFile,
    ReceiverGone,
    ReceiverRefused,
    ReceiverRestarted,
    ReceiverWrongFile,
    TcpOptions,
    TcpSink,
)

from .conftest import FAST, NPAGES, PAGE, TOKEN, open_sink, ram

pytestmark = pytest.mark.timeout(60)


def mutate(src, data: np.ndarray, pages: list[int], value: int) -> None:
    """Change source pages (as the guest would), in the file and in the expected copy."""
    m = np.memmap(src, np.uint8, mode="r+")
    for p in pages:
        m[p * PAGE : (p + 1) * PAGE] = value
        data[p * PAGE : (p + 1) * PAGE] = value
    m.flush()
    del m


async def rounds(sink: TcpSink, src, data: np.ndarray, on_sent=None) -> None:
    """Round 0, then two rounds of changes including pages that become zero."""
    await sink.send_round0(on_sent)
    mutate(src, data, [1, 2, 100, 200], 7)
    await sink.send_pages(np.array([1, 2, 100, 200]), on_sent)
    mutate(src, data, [2, 100, 101, 102], 0)
    await sink.send_pages(np.array([2, 100, 101, 102, 255]), on_sent)


async def test_rounds_are_bit_exact_and_on_sent_sees_what_was_sent(served, tmp_path):
    sink, src, data = await open_sink(tmp_path, served.endpoint)
    seen: dict[int, bytes] = {}

    def on_sent(pages, rows):
        for p, row in zip(pages.tolist(), rows, strict=False):
            seen[p] = row.tobytes()

    try:
        assert await sink.send_round0(on_sent) == (NPAGES - 6, (NPAGES - 6) * PAGE)
        mutate(src, data, [4, 5], 9)
        mutate(src, data, [10], 0)
        assert await sink.send_pages(np.array([4, 5, 10]), on_sent) == 3 * PAGE
        assert (await sink.verify()).size == 0
    finally:
        sink.close()
    assert np.array_equal(served.held(), data)
    rows = data.reshape(NPAGES, PAGE)
    assert all(seen[p] == rows[p].tobytes() for p in seen) and len(seen) == NPAGES - 6 + 2


async def test_pages_go_out_from_the_source_unless_a_snapshot_is_wanted(served, tmp_path):
    """Without `on_sent`, runs are written from the mapping itself: no frame buffer is ever
    filled. With it, each frame is a gathered copy (the bytes `on_sent` is shown)."""
    sink, src, data = await open_sink(tmp_path, served.endpoint)
    frames = lambda: sum(len(lane.buffers) for lane in sink._lanes)  # noqa: E731
    try:
        await rounds(sink, src, data)
        assert frames() == 0 and np.array_equal(served.held(), data)
        mutate(src, data, [30, 31], 5)
        await sink.send_pages(np.array([30, 31]), on_sent=lambda pages, rows: None)
        assert frames() >= 1 and np.array_equal(served.held(), data)
    finally:
        sink.close()


async def test_round0_makes_a_stale_receiver_file_equal_to_the_source(served, tmp_path):
    """The receiver's file holds old data everywhere: round 0 still ends with the source's
    bytes, zero pages included, without any later round."""
    np.full(NPAGES * PAGE, 0xAA, np.uint8).tofile(served.dst)
    sink, _, data = await open_sink(tmp_path, served.endpoint)
    try:
        await sink.send_round0()
    finally:
        sink.close()
    assert np.array_equal(served.held(), data)


async def test_pages_out_of_order_are_refused_and_nothing_sent(served, tmp_path):
    sink, _, _ = await open_sink(tmp_path, served.endpoint)
    try:
        for pages in ([5, 4], [7, 7]):
            with pytest.raises(ValueError, match="strictly increasing"):
                await sink.send_pages(np.array(pages))
    finally:
        sink.close()
    assert not served.held().any()


async def test_verify_names_the_pages_that_differ(served, tmp_path):
    sink, _, _ = await open_sink(tmp_path, served.endpoint)
    try:
        await sink.send_round0()
        held = np.memmap(served.dst, np.uint8, mode="r+")
        held[17 * PAGE + 5] ^= 1
        held[200 * PAGE] ^= 0xFF
        del held
        assert (await sink.verify()).tolist() == [17, 200]
    finally:
        sink.close()


async def test_regions_map_guest_pages_to_file_pages(served, tmp_path):
    # guest pages 0..99 at file pages 0..99, guest pages 1000..1155 at file pages 100..255
    layout = MemoryLayout((RamRegion(0, 100 * PAGE, "ram", 0), RamRegion(1000 * PAGE, 156 * PAGE, "ram", 100 * PAGE)))
    src = ram(tmp_path / "src", np.repeat((np.arange(NPAGES) % 251 + 1).astype(np.uint8), PAGE))
    sink = await TcpSink.connect(layout, str(src), served.endpoint, TOKEN, FAST)
    try:
        await sink.send_pages(np.array([3, 1000, 1155]))
        assert np.flatnonzero(served.held().reshape(NPAGES, PAGE)[:, 0]).tolist() == [3, 100, 255]
        bad = await sink.verify()
        assert 3 not in bad and 1000 not in bad and 1155 not in bad and 1001 in bad and 99 in bad
    finally:
        sink.close()


class CuttingProxy:
    """Forwards to the receiver; cuts chosen connections after a number of bytes in one
    direction (both sides closed at once, as a failing link would)."""

    def __init__(self, target: Endpoint, cuts: dict[int, int], direction: str) -> None:
        self.target, self.cuts, self.direction = target, cuts, direction
        self.connections = 0
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> Endpoint:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return Endpoint(*self.server.sockets[0].getsockname()[:2])

    async def _handle(self, creader, cwriter) -> None:
        n = self.connections
        self.connections += 1
        sreader, swriter = await asyncio.open_connection(self.target.host, self.target.port)
        budget = self.cuts.get(n)
        up = self._pipe(creader, swriter, budget if self.direction == "up" else None)
        down = self._pipe(sreader, cwriter, budget if self.direction == "down" else None)
        tasks = [asyncio.ensure_future(up), asyncio.ensure_future(down)]
        self._tasks.update(tasks)
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        for w in (cwriter, swriter):
            w.transport.abort()

    async def _pipe(self, reader, writer, budget: int | None) -> None:
        while True:
            chunk = await reader.read(1 << 16)
            if not chunk:
                return
            if budget is not None and len(chunk) >= budget:
                writer.write(chunk[:budget])
                await writer.drain()
                return
            if budget is not None:
                budget -= len(chunk)
            writer.write(chunk)
            await writer.drain()

    async def close(self) -> None:
        self.server.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.mark.parametrize("snapshot", [False, True], ids=["from-source", "gathered"])
@pytest.mark.parametrize("direction", ["up", "down"])
async def test_connections_cut_mid_round_still_end_bit_exact(served, tmp_path, direction, snapshot):
    # Connections 0 and 1 are the two streams, 2 and 3 reconnects; each of them is cut once it
    # carries a frame. Up: 50 kB into round 0's 1 MB frame, so the receiver sees a truncated
    # PAGES. Down: 6 bytes into the first ACK after the handshake's 124, so the pages were
    # written but the sender never learns it. Whichever stream is cut, it is cut twice.
    cuts = dict.fromkeys(range(3), 50_000 if direction == "up" else 130)
    proxy = CuttingProxy(served.endpoint, cuts, direction)
    via = await proxy.start()
    try:
        sink, src, data = await open_sink(tmp_path, via)
        try:
            await rounds(sink, src, data, (lambda pages, rows: None) if snapshot else None)
            assert (await sink.verify()).size == 0
            assert sink.reconnects >= 2
        finally:
            sink.close()
    finally:
        await proxy.close()
    assert np.array_equal(served.held(), data)


async def test_receiver_gone_for_good_fails_the_round(served, tmp_path):
    sink, _, _ = await open_sink(tmp_path, served.endpoint)
    try:
        await served.receiver.close()
        with pytest.raises(ReceiverGone, match=r"unreachable on stream .* after 3 reconnect attempts"):
            await sink.send_pages(np.arange(NPAGES))
    finally:
        sink.close()


async def test_receiver_restart_is_detected(tmp_path):
    dst = ram(tmp_path / "dst")
    first = Receiver(str(dst), TOKEN)
    host, port = await first.start("127.0.0.1", 0)
    sink, _, _ = await open_sink(tmp_path, Endpoint(host, port))
    try:
        await sink.send_round0()
        await first.close()
        async with Receiver(str(dst), TOKEN) as second:
            await second.start(host, port)
            with pytest.raises(ReceiverRestarted, match="restarted during the migration"):
                await sink.send_pages(np.array([1, 2, 3]))
    finally:
        sink.close()


async def test_sender_refuses_a_receiver_without_the_token(tmp_path):
    dst = ram(tmp_path / "dst")
    async with Receiver(str(dst), b"another-token-of-enough-length") as receiver:
        host, port = await receiver.start("127.0.0.1", 0)
        with pytest.raises(ReceiverRefused, match="authentication failed"):
            await open_sink(tmp_path, Endpoint(host, port))


async def test_receiver_file_too_small_is_a_clear_error(tmp_path):
    dst = tmp_path / "small"
    np.zeros(PAGE * 8, np.uint8).tofile(dst)
    async with Receiver(str(dst), TOKEN) as receiver:
        host, port = await receiver.start("127.0.0.1", 0)
        with pytest.raises(Exception, match=f"serves {8 * PAGE} bytes .* the guest needs {NPAGES * PAGE}"):
            await open_sink(tmp_path, Endpoint(host, port))


async def test_receiver_serving_another_file_of_the_right_size_is_refused(served, tmp_path):
    """The destination QEMU maps one file, the receiver serves another of the same size: the
    sender refuses in the handshake, naming both, and nothing is written anywhere."""
    qemus = ram(tmp_path / "qemus.ram")
    src = ram(tmp_path / "src", np.ones(NPAGES * PAGE, np.uint8))
    before = served.held()
    with pytest.raises(
        ReceiverWrongFile, match=rf"serves {served.dst} .*not the file the destination QEMU maps: {qemus}"
    ):
        await TcpSink.connect(
            MemoryLayout.flat(NPAGES * PAGE),
            str(src),
            served.endpoint,
            TOKEN,
            FAST,
            expect=ExpectedFile(qemus, NPAGES * PAGE),
        )
    assert np.array_equal(served.held(), before) and not np.fromfile(qemus, np.uint8).any()


async def test_receiver_file_checked_by_identity_not_by_name(served, tmp_path):
    """A symlink to the receiver's file is the same file; a path missing on the receiver's
    host, or a size other than QEMU's, is refused."""
    src = ram(tmp_path / "src", np.ones(NPAGES * PAGE, np.uint8))
    layout = MemoryLayout.flat(NPAGES * PAGE)
    link = tmp_path / "link.ram"
    link.symlink_to(served.dst)
    sink = await TcpSink.connect(
        layout, str(src), served.endpoint, TOKEN, FAST, expect=ExpectedFile(link, NPAGES * PAGE)
    )
    sink.close()
    await asyncio.wait_for(served.receiver.finished.wait(), 10)
    missing = tmp_path / "gone.ram"
    with pytest.raises(ReceiverWrongFile, match=rf"{missing}, which the receiver cannot open \(No such file"):
        await TcpSink.connect(
            layout, str(src), served.endpoint, TOKEN, FAST, expect=ExpectedFile(missing, NPAGES * PAGE)
        )
    with pytest.raises(
        ReceiverWrongFile, match=rf"{NPAGES * PAGE} bytes; the destination QEMU's RAM backend is {2 * NPAGES * PAGE}"
    ):
        await TcpSink.connect(
            layout, str(src), served.endpoint, TOKEN, FAST, expect=ExpectedFile(served.dst, 2 * NPAGES * PAGE)
        )


@pytest.fixture
def tls_files(tmp_path):
    """A self-signed certificate for 127.0.0.1 / localhost (the CA is the certificate)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_tls_stream_is_bit_exact_and_an_untrusted_receiver_is_refused(tmp_path, tls_files):
    cert, key = tls_files
    dst = ram(tmp_path / "dst")
    async with Receiver(str(dst), TOKEN, ssl_context=server_context(cert, key)) as receiver:
        host, port = await receiver.start("127.0.0.1", 0)
        tls = TcpOptions(streams=2, ssl=client_context(cert))
        sink, src, data = await open_sink(tmp_path, Endpoint(host, port), tls)
        try:
            await rounds(sink, src, data)
            assert (await sink.verify()).size == 0
        finally:
            sink.close()
        assert np.array_equal(np.fromfile(dst, np.uint8), data)
        wrong_name = TcpOptions(streams=1, ssl=client_context(cert), server_hostname="elsewhere.example")
        with pytest.raises(ReceiverRefused, match="certificate"):
            await open_sink(tmp_path, Endpoint(host, port), wrong_name)


async def test_bandwidth_cap_paces_takers_to_the_rate():
    now = [0.0]
    waits: list[float] = []

    async def sleep(s: float) -> None:
        waits.append(s)
        now[0] += s

    bucket = TokenBucket(1000, burst=100, clock=lambda: now[0], sleep=sleep)
    for _ in range(10):
        await bucket.take(500)  # a frame larger than the burst goes, leaving a debt
    assert waits[0] == pytest.approx(0.4) and sum(waits) == pytest.approx(4.4)  # (10*500 - 100 - 500) / 1000
    now[0] += 100
    await bucket.take(50)
    assert len(waits) == 9, "after idling, the bucket holds its burst again"


async def test_bandwidth_capped_sink_still_delivers(served, tmp_path):
    sink, src, data = await open_sink(tmp_path, served.endpoint, TcpOptions(streams=2, max_bandwidth=256 << 20))
    try:
        await rounds(sink, src, data)
    finally:
        sink.close()
    assert np.array_equal(served.held(), data)


def test_token_file_rules(tmp_path):
    path = tmp_path / "token"
    token = write_token(path)
    assert load_token(path) == token and path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        load_token(path)
    short = tmp_path / "short"
    short.write_text("abc\n")
    short.chmod(0o600)
    with pytest.raises(ValueError, match="at least 16"):
        load_token(short)


def test_endpoint_parsing():
    assert parse_endpoint("10.231.7.2:4445") == Endpoint("10.231.7.2", 4445)
    assert parse_endpoint("[::1]:80") == Endpoint("::1", 80)
    for bad in ("nohost", ":80", "h:", "h:99999"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)


async def test_a_source_read_failure_in_round0_is_an_error_not_a_reconnect(served, tmp_path, monkeypatch):
    """If where the source holds data cannot be read, round 0 fails as such; it is not a
    dropped connection to retry after which the round would end with pages missing."""
    import errno

    import orchestrator.transport.tcp as tcp

    def unreadable(*args):
        raise OSError(errno.EIO, "Input/output error")

    sink, _, _ = await open_sink(tmp_path, served.endpoint)
    try:
        monkeypatch.setattr(tcp, "data_runs", unreadable)
        with pytest.raises(OSError, match="Input/output error"):
            await sink.send_round0()
        assert sink.reconnects == 0
    finally:
        sink.close()
