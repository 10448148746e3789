"""The page sink that streams pages to a receiver on the destination host.

Pages go out in batches of up to `MAX_BATCH_PAGES`, over several parallel connections
("lanes") pulling from one shared queue, each with a window of frames awaiting the receiver's
ACK. A batch's runs of consecutive pages are written to the socket straight from the mapped
source file, not gathered first (only what the socket cannot take at once is buffered), unless
something needs a snapshot of the bytes sent (`on_sent`, for content tracking), TLS has to
encrypt them, or the batch is too scattered: then the batch is gathered into its frame (one
numpy take, no Python work per page).

Faults. A lane whose connection drops (reset, EOF, no ACK in time) reconnects with back-off
and resends every batch it had not seen acknowledged, on the same lane, re-reading those pages
from the source. `send_pages` therefore keeps the `PageSink` contract as it is: when it
returns, the destination holds every page asked for, and no driver change is needed. Reading a
page again later is always safe: the copy is at least as new as the harvested one, and any
write after the harvest set its dirty bit for the next round anyway. The receiver fences the
old connection of a lane before welcoming the new one, so a stale frame cannot overwrite a
resent page. `on_sent` is called only for acknowledged batches, with the bytes they carried.

Consecutive failed reconnects beyond the `Reconnect` policy raise `ReceiverGone`: the
migration fails and the driver cancels it with the source running. A receiver that comes back
with a different epoch (it restarted) raises `ReceiverRestarted`: it may have lost pages of
earlier rounds, nothing says which, and a silent full resend would hide a destination that
lost its memory, so the migration fails clearly instead.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from orchestrator.dirty.memory import MemoryLayout
from orchestrator.dirty.pagehash import page_hashes
from orchestrator.transport.auth import client_proof, same, server_proof
from orchestrator.transport.base import OnSent, SinkError, page_numbers
from orchestrator.transport.bucket import TokenBucket
from orchestrator.transport.endpoint import Endpoint
from orchestrator.transport.protocol import (
    DIGEST_CHUNK,
    HELLO,
    MAX_BATCH_PAGES,
    MAX_PATH_BYTES,
    NONCE_BYTES,
    PROOF_BYTES,
    ROUND_END,
    WELCOME,
    EncodedPages,
    Kind,
    PeerError,
    PlannedPages,
    ProtocolError,
    Welcome,
    decode_digests,
    digest_chunks,
    encode,
    encode_pages,
    encode_ranges,
    exact,
    frame_bytes,
    plan_pages,
    read_frame,
)
from orchestrator.transport.ramfile import MappedRegion, data_runs, map_ram, nonzero_pages, release, split_pages

log = logging.getLogger(__name__)
_T = TypeVar("_T")
# What a lane survives by reconnecting; anything else (refusal, bad peer, TLS trust) is final.
_TRANSIENT = (OSError, asyncio.IncompleteReadError, TimeoutError)


class ReceiverGone(SinkError):
    """The receiver stayed unreachable through every reconnect attempt."""


class ReceiverRestarted(SinkError):
    """The receiver answered with a new epoch: it does not hold the earlier rounds."""


class ReceiverRefused(SinkError):
    """The receiver refused this sender (token, busy, protocol) or failed to prove the token."""


class ReceiverWrongFile(SinkError):
    """The receiver serves a file other than the one the destination QEMU maps."""


@dataclass(frozen=True)
class ExpectedFile:
    """The destination QEMU's RAM file as QEMU reports it: its mem-path and backend size."""

    path: Path
    size: int

    def check(self, receiver: Endpoint, w: Welcome) -> None:
        """Refuse a receiver whose file is not this one. The receiver opened `path` on its
        own host: the same device and inode as the file it has mapped means the same file."""
        serves = f"receiver {receiver} serves {w.path}"
        if w.expected is None:
            raise ReceiverWrongFile(
                f"{serves}, but the destination QEMU maps {self.path}, which the receiver cannot open "
                f"({os.strerror(w.expected_errno)}): run the receiver on the destination QEMU's host"
                f" with --ram {self.path}"
            )
        if w.expected != w.file:
            raise ReceiverWrongFile(
                f"{serves} ({w.file}), not the file the destination QEMU maps: {self.path} ({w.expected} "
                f"on the receiver's host); run the receiver with --ram {self.path}"
            )
        if w.file_size != self.size:
            raise ReceiverWrongFile(
                f"{serves} of {w.file_size} bytes; the destination QEMU's RAM backend is {self.size} bytes"
            )


@dataclass(frozen=True)
class Reconnect:
    attempts: int = 6  # consecutive failures without an acknowledged batch in between
    first_delay_s: float = 0.2
    max_delay_s: float = 5.0

    def delay(self, failure: int) -> float:
        return min(self.max_delay_s, self.first_delay_s * 2 ** (failure - 1))


@dataclass(frozen=True)
class TcpOptions:
    streams: int = 4
    max_bandwidth: float | None = None  # bytes per second on the wire, all streams together
    window: int = 4  # frames awaiting ACK per stream
    reconnect: Reconnect = Reconnect()
    ack_timeout_s: float = 30.0
    connect_timeout_s: float = 10.0
    ssl: ssl.SSLContext | None = None
    server_hostname: str | None = None  # TLS name to check, default the endpoint's host


@dataclass
class _Batch:
    region: MappedRegion  # its file page numbers are the same on both sides
    local: np.ndarray  # page indices within the region
    find_zero: bool = True  # look for zero pages to send as runs

    @property
    def guest(self) -> np.ndarray:
        return self.local + self.region.first_page


@dataclass
class _Sent:
    seq: int
    batch: _Batch
    pages: EncodedPages | PlannedPages


@dataclass
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


@dataclass
class _Lane:
    number: int
    conn: _Conn | None = None
    seq: int = 0
    progressed: bool = False  # a batch was acknowledged since the last failure
    inflight: deque[_Sent] = field(default_factory=deque)
    resend: deque[_Batch] = field(default_factory=deque)
    buffers: list[bytearray] = field(default_factory=list)

    def drop(self) -> None:
        """Abandon the connection; unacknowledged batches go first on the next one."""
        if self.conn is not None:
            self.conn.writer.transport.abort()  # nothing queued on a broken stream is wanted
            self.conn = None
        self.resend.extendleft(reversed([s.batch for s in self.inflight]))
        self.recycle(s.pages for s in self.inflight)
        self.inflight.clear()

    def recycle(self, frames: Iterable[EncodedPages | PlannedPages]) -> None:
        """Keep gathered frames' buffers for reuse: no fresh 2 MiB (and its page faults) per frame."""
        self.buffers += [
            f.frame.obj for f in frames if isinstance(f, EncodedPages) and isinstance(f.frame.obj, bytearray)
        ]


class TcpSink:
    """Streams guest pages from the source RAM file to a `Receiver`. Open with `connect`."""

    def __init__(
        self,
        layout: MemoryLayout,
        src_path: str,
        endpoint: Endpoint,
        token: bytes,
        options: TcpOptions,
        expect: ExpectedFile | None = None,
    ) -> None:
        self.page_size = layout.page_size
        self.endpoint, self.options, self.expect = endpoint, options, expect
        self._expect_path = os.fsencode(expect.path) if expect else b""
        if expect is not None and len(self._expect_path) > MAX_PATH_BYTES:
            raise SinkError(f"destination RAM path {expect.path} is longer than {MAX_PATH_BYTES} bytes")
        self.session = secrets.token_bytes(16)
        self.epoch: bytes | None = None
        self.pages_sent = self.reconnects = 0
        self._token = token
        self._rounds = 0
        self._need = max(r.offset + r.length for r in layout.regions)
        self._bucket = TokenBucket(options.max_bandwidth or None)
        self._lanes = [_Lane(i) for i in range(options.streams)]
        mm, view = map_ram(src_path, self._need, writable=False)
        self._maps = [mm]
        self._rows = view.reshape(-1, self.page_size)
        self.regions = [MappedRegion.of(r, self.page_size, view, src_path) for r in layout.regions]

    @property
    def max_bandwidth(self) -> float | None:
        return self._bucket.rate

    def set_max_bandwidth(self, rate: float | None) -> None:
        """Cap the stream at `rate` bytes per second, all lanes together (None or 0: uncapped);
        a frame already waiting on the old cap goes by the new one."""
        self._bucket.set_rate(rate or None)

    @classmethod
    async def connect(
        cls,
        layout: MemoryLayout,
        src_path: str,
        endpoint: Endpoint,
        token: bytes,
        options: TcpOptions = TcpOptions(),
        expect: ExpectedFile | None = None,
    ) -> TcpSink:
        """Map the source, open every stream and authenticate both ways; with `expect`, every
        connection also proves the receiver serves that file, before any page is sent."""
        if options.streams < 1 or options.window < 1:
            raise ValueError(
                f"need at least one stream and a window of one frame, not {options.streams}/{options.window}"
            )
        sink = cls(layout, src_path, endpoint, token, options, expect)
        try:
            await _first_error([sink._on_lane(lane, _connected) for lane in sink._lanes])
        except BaseException:
            sink.close()
            raise
        return sink

    # --- connections ---------------------------------------------------------------------

    async def _open(self, lane: _Lane) -> _Conn:
        opts = self.options
        host = (opts.server_hostname or self.endpoint.host) if opts.ssl else None
        async with asyncio.timeout(opts.connect_timeout_s):
            reader, writer = await asyncio.open_connection(
                self.endpoint.host, self.endpoint.port, ssl=opts.ssl, server_hostname=host
            )
            try:
                await self._handshake(reader, writer, lane.number)
            except BaseException:
                writer.close()
                raise
        return _Conn(reader, writer)

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, lane: int) -> None:
        client_nonce, expect = secrets.token_bytes(NONCE_BYTES), self._expect_path
        writer.write(encode(Kind.HELLO, 0, HELLO.pack(client_nonce, self.session, lane)))
        try:
            server_nonce = bytes(exact(await read_frame(reader, {Kind.CHALLENGE: NONCE_BYTES}), NONCE_BYTES))
            proof = client_proof(self._token, server_nonce, client_nonce, self.session, lane, expect)
            writer.write(encode(Kind.AUTH, 0, proof + expect))
            welcome = bytes(
                (await read_frame(reader, {Kind.WELCOME: WELCOME.size + MAX_PATH_BYTES + PROOF_BYTES})).payload
            )
            body, proof = welcome[:-PROOF_BYTES], welcome[-PROOF_BYTES:]
            if not same(proof, server_proof(self._token, server_nonce, client_nonce, self.session, lane, body, expect)):
                raise ReceiverRefused(f"receiver {self.endpoint} could not prove it holds the token")
            w = Welcome.decode(body)
        except (PeerError, ProtocolError) as exc:
            raise ReceiverRefused(f"receiver {self.endpoint} refused the connection: {exc}") from None
        epoch, size, page_size = w.epoch, w.file_size, w.page_size
        if self.expect is not None:
            try:
                self.expect.check(self.endpoint, w)
            except ReceiverWrongFile:
                writer.write(encode(Kind.BYE))  # ends the session: the receiver is free at once
                raise
        if self.epoch is None:
            self.epoch = epoch
        elif epoch != self.epoch:
            raise ReceiverRestarted(
                f"receiver {self.endpoint} restarted during the migration (new epoch): "
                "it may not hold the pages of earlier rounds, so the migration cannot go on"
            )
        if page_size != self.page_size or size < self._need:
            raise SinkError(
                f"receiver {self.endpoint} serves {size} bytes in {page_size}-byte pages; "
                f"the guest needs {self._need} bytes in {self.page_size}-byte pages"
            )

    async def _on_lane(self, lane: _Lane, op: Callable[[_Conn], Awaitable[_T]]) -> _T:
        """Run `op` on the lane's connection, reconnecting with back-off when it drops."""
        policy, failures = self.options.reconnect, 0
        while True:
            try:
                if lane.conn is None:
                    lane.conn = await self._open(lane)
                return await op(lane.conn)
            except ssl.SSLCertVerificationError as exc:
                name = self.options.server_hostname or self.endpoint.host
                raise ReceiverRefused(
                    f"receiver {self.endpoint}: its TLS certificate failed verification for server name '{name}': "
                    f"{exc.verify_message}; it must be signed by the CA given and name '{name}'"
                    " (or give the name it carries)"
                ) from None
            except _TRANSIENT as exc:
                lane.drop()
                failures = 1 if lane.progressed else failures + 1
                lane.progressed = False
                if failures > policy.attempts:
                    raise ReceiverGone(
                        f"receiver {self.endpoint} unreachable on stream {lane.number} after "
                        f"{policy.attempts} reconnect attempts: {exc or type(exc).__name__}"
                    ) from None
                self.reconnects += 1
                delay = policy.delay(failures)
                log.warning(
                    "stream %d to %s dropped (%s); reconnecting in %.1fs",
                    lane.number,
                    self.endpoint,
                    exc or type(exc).__name__,
                    delay,
                )
                await asyncio.sleep(delay)

    # --- pages ---------------------------------------------------------------------------

    async def _pump(self, lane: _Lane, conn: _Conn, batches: Iterator[_Batch], on_sent: OnSent | None) -> None:
        """Send batches (this lane's resends first) keeping `window` frames unacknowledged."""
        opts = self.options
        while True:
            while len(lane.inflight) < opts.window:
                batch = lane.resend.popleft() if lane.resend else next(batches, None)
                if batch is None:
                    break
                sent = _Sent(lane.seq, batch, self._frame(lane, batch, copy=on_sent is not None))
                lane.seq += 1
                lane.inflight.append(sent)
                await self._bucket.take(sent.pages.nbytes)
                for piece in sent.pages.pieces():
                    conn.writer.write(piece)
                await conn.writer.drain()
            if not lane.inflight:
                return
            async with asyncio.timeout(opts.ack_timeout_s):
                ack = await read_frame(conn.reader, {Kind.ACK: 0})
            sent = lane.inflight.popleft()
            if ack.seq != sent.seq:
                raise ReceiverRefused(f"receiver {self.endpoint} acknowledged batch {ack.seq}, expected {sent.seq}")
            lane.progressed = True
            self._delivered(sent, on_sent)
            lane.recycle([sent.pages])

    def _frame(self, lane: _Lane, batch: _Batch, copy: bool) -> EncodedPages | PlannedPages:
        """A PAGES frame for the batch. Runs of pages go to the socket straight from the
        source mapping (no gather) unless `copy` asks for the snapshot `on_sent` reports, TLS
        has to copy them to encrypt anyway, or the batch is too scattered."""
        index = batch.local + batch.region.file_first
        if not copy and self.options.ssl is None:
            planned = plan_pages(lane.seq, batch.region.src, batch.local, index, batch.find_zero)
            if planned is not None:
                return planned
        buf = lane.buffers.pop() if lane.buffers else bytearray(frame_bytes(self.page_size))
        return encode_pages(lane.seq, batch.region.src, batch.local, index, buf, batch.find_zero)

    def _delivered(self, sent: _Sent, on_sent: OnSent | None) -> None:
        n = sent.batch.local.size
        self.pages_sent += n
        if on_sent is None:
            return
        pages = sent.pages
        if not isinstance(pages, EncodedPages):  # `_frame` copies whenever there is an `on_sent`
            raise TypeError("pages reported to on_sent were sent without a copy")
        guest, is_data = sent.batch.guest, pages.is_data
        on_sent(guest[is_data], pages.data)
        if not is_data.all():
            on_sent(guest[~is_data], np.zeros((n - len(pages.data), self.page_size), np.uint8))

    async def _stream(self, batches: Iterator[_Batch], on_sent: OnSent | None) -> int:
        """Send every batch over all lanes; returns the pages delivered."""
        before = self.pages_sent
        try:
            await _first_error(
                [
                    self._on_lane(lane, functools.partial(self._pump, lane, batches=batches, on_sent=on_sent))
                    for lane in self._lanes
                ]
            )
        except (PeerError, ProtocolError) as exc:
            raise ReceiverRefused(f"receiver {self.endpoint}: {exc}") from None
        pages = self.pages_sent - before
        end = encode(Kind.ROUND_END, 0, ROUND_END.pack(self._rounds, pages))
        await self._on_lane(self._lanes[0], lambda conn: _send(conn, end))
        self._rounds += 1
        return pages

    def _batches(self, pages: np.ndarray) -> Iterator[_Batch]:
        for reg, local, _ in split_pages(self.regions, pages):
            for i in range(0, local.size, MAX_BATCH_PAGES):
                yield _Batch(reg, local[i : i + MAX_BATCH_PAGES])

    def _nonzero_batches(self, runs: list[np.ndarray]) -> Iterator[_Batch]:
        """Round 0's batches: the non-zero pages inside each region's data runs. The runs
        are found before streaming starts, so a failure to read the source is the error it
        is, not a dropped connection to retry. Each batch's pages are scanned just before they
        are sent, so the send reads them from cache."""
        for reg, reg_runs in zip(self.regions, runs, strict=False):
            for nz in nonzero_pages(reg.src, reg_runs, MAX_BATCH_PAGES):
                yield _Batch(reg, nz, find_zero=False)

    async def send_round0(self, on_sent: OnSent | None = None) -> tuple[int, int]:
        """CLEAR every region on one stream and wait for it to be done, then send the
        non-zero pages over all of them."""
        runs = await asyncio.to_thread(self._data_runs)
        clear = encode(Kind.CLEAR, 0, encode_ranges(self._file_ranges()))
        try:
            await self._on_lane(self._lanes[0], lambda conn: self._request(conn, clear))
        except (PeerError, ProtocolError) as exc:
            raise ReceiverRefused(f"receiver {self.endpoint} clearing its RAM file: {exc}") from None
        n = await self._stream(self._nonzero_batches(runs), on_sent)
        return n, n * self.page_size

    def _data_runs(self) -> list[np.ndarray]:
        return [data_runs(r.src_path, r.offset, r.nbytes, self.page_size) for r in self.regions]

    async def send_pages(self, pages: np.ndarray, on_sent: OnSent | None = None) -> int:
        return await self._stream(self._batches(page_numbers(pages)), on_sent) * self.page_size

    # --- verification --------------------------------------------------------------------

    def _file_ranges(self) -> np.ndarray:
        return np.array([(r.file_first, r.npages) for r in self.regions], np.int64)

    async def _request(self, conn: _Conn, frame: bytes) -> None:
        """Send a frame and wait for its ACK (a resend after a reconnect is harmless: CLEAR
        is idempotent)."""
        await _send(conn, frame)
        async with asyncio.timeout(self.options.ack_timeout_s):
            await read_frame(conn.reader, {Kind.ACK: 0})

    async def verify(self) -> np.ndarray:
        """The receiver hashes what it holds (`pagehash`), chunk by chunk; each chunk is
        compared with the same hashes of the source as it arrives."""
        ranges = self._file_ranges()
        try:
            bad = await self._on_lane(self._lanes[0], lambda conn: self._compare(conn, ranges))
        except (PeerError, ProtocolError) as exc:
            raise ReceiverRefused(f"receiver {self.endpoint} during verification: {exc}") from None
        return self._to_guest(bad)

    async def _compare(self, conn: _Conn, ranges: np.ndarray) -> np.ndarray:
        """Both VMs are paused: our side of each chunk is hashed while the receiver hashes
        its side, not after."""
        await _send(conn, encode(Kind.VERIFY, 0, encode_ranges(ranges)))
        bad: list[np.ndarray] = []
        for first, count in digest_chunks(ranges):
            mine = asyncio.ensure_future(
                asyncio.to_thread(page_hashes, self._rows[first : first + count], self.page_size)
            )
            try:
                async with asyncio.timeout(self.options.ack_timeout_s):
                    frame = await read_frame(conn.reader, {Kind.DIGESTS: 8 + 8 * DIGEST_CHUNK})
            finally:
                ours = await mine  # a thread cannot be cancelled: let it finish either way
            theirs = decode_digests(frame, first, count)
            bad.append(np.flatnonzero(ours != theirs) + first)
        return np.concatenate(bad)

    def _to_guest(self, file_pages: np.ndarray) -> np.ndarray:
        out = [
            file_pages[(file_pages >= r.file_first) & (file_pages < r.file_first + r.npages)]
            - r.file_first
            + r.first_page
            for r in self.regions
        ]
        return np.sort(np.concatenate(out)).astype(np.int64)

    def close(self) -> None:
        """Say BYE on every stream (flushed as the connections close) and unmap the source."""
        for lane in self._lanes:
            if lane.conn is not None:
                lane.conn.writer.write(encode(Kind.BYE))
                lane.conn.writer.close()
                lane.conn = None
        for r in self.regions:
            r.src = np.empty((0, self.page_size), np.uint8)
        self._rows = np.empty((0, self.page_size), np.uint8)
        release(self._maps)


async def _connected(conn: _Conn) -> None:
    """The operation that only needs the connection to be up."""


async def _send(conn: _Conn, frame: bytes) -> None:
    conn.writer.write(frame)
    await conn.writer.drain()


async def _first_error(coros: list[Awaitable[object]]) -> None:
    """Run all; the first to fail cancels the rest and its exception is raised as it is."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in done:
        if (exc := t.exception()) is not None:
            raise exc
