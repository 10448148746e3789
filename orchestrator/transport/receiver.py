"""The destination side of the page stream: authenticated senders write pages into one RAM file.

One migration session at a time. A session is the sender's random id; it may hold several
connections ("lanes", numbered by the sender). A new connection for a lane that is already
connected is a reconnect: the old connection is cancelled and waited for before the new one is
welcomed. Pages are written synchronously in the event loop, between two awaits, so a
cancelled connection has either written a whole frame or nothing, and nothing of the old
connection can land after a resend on the new one.

The receiver's epoch (random, per process) goes out in every WELCOME: a sender that sees it
change knows this receiver holds none of the earlier rounds.

Connections nobody has authenticated yet are cheap and bounded: each reads into a small
buffer (`HANDSHAKE_BUFFER`) and at most `max_pending` are kept; a new one beyond that drops
the oldest, so idle or slow connections can delay a real sender by one reconnect at worst,
never lock it out. Only an authenticated connection gets its frame-sized buffer, and at most
`max_connections` of those are served.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import secrets
import ssl
from dataclasses import dataclass, field

import numpy as np

from orchestrator.dirty.pagehash import page_hashes
from orchestrator.dirty.ranges import page_runs
from orchestrator.transport.auth import NonceLedger, client_proof, same, server_proof
from orchestrator.transport.inbound import Inbound
from orchestrator.transport.protocol import (
    HEADER,
    HELLO,
    MAX_PATH_BYTES,
    MAX_PLANNED_RUNS,
    MAX_VERIFY_RANGES,
    NONCE_BYTES,
    PROOF_BYTES,
    ROUND_END,
    FileId,
    Kind,
    PageBatch,
    PeerError,
    ProtocolError,
    Welcome,
    decode_pages,
    decode_ranges,
    digest_chunks,
    encode,
    encode_digests,
    error_frame,
    exact,
    frame_bytes,
    pages_limit,
    read_frame,
)
from orchestrator.transport.ramfile import clear, map_fd, open_ram, release

log = logging.getLogger(__name__)

MAX_LANES = 64
EPOCH_BYTES = 16
MAX_PENDING = 128  # unauthenticated connections kept at once
# Room for the largest handshake frame (AUTH) and the next one arriving.
HANDSHAKE_BUFFER = 2 * (HEADER.size + PROOF_BYTES + MAX_PATH_BYTES)


@dataclass
class ReceiverCounters:
    """What a receiver has seen since it started, for whoever exports it (the app's metrics):
    plain numbers the transport keeps without knowing who reads them."""

    connections: int = 0  # accepted, authenticated or not
    auth_failures: int = 0  # a wrong proof or a replayed nonce


@dataclass
class _Session:
    id: bytes
    lanes: dict[int, asyncio.Task] = field(default_factory=dict)
    idle_since: float = 0.0
    rounds: int = 0
    pages: int = 0  # pages written in the current round, resends included


class Receiver:
    """Serves one RAM file. `start` listens; `serve` handles one connection: an `Inbound`
    when listening, or any asyncio stream pair (which is how tests feed it raw bytes)."""

    def __init__(
        self,
        ram_path: str,
        token: bytes,
        *,
        page_size: int = 4096,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout_s: float = 10.0,
        idle_timeout_s: float = 60.0,
        max_connections: int = 64,
        max_pending: int = MAX_PENDING,
    ) -> None:
        """`max_connections`: authenticated connections served at once (beyond that one is
        refused); `max_pending`: connections still in their handshake (beyond that the
        oldest is dropped)."""
        self.page_size = page_size
        self._fd = open_ram(ram_path, writable=True)  # kept: CLEAR punches holes through it
        try:
            self.file_size = os.fstat(self._fd).st_size
            mm, view = map_fd(self._fd, ram_path, self.file_size, writable=True)
        except BaseException:
            os.close(self._fd)
            raise
        st = os.fstat(self._fd)
        self.file = FileId(st.st_dev, st.st_ino)
        self.path = os.path.realpath(ram_path)
        self.file_pages = self.file_size // page_size
        self._maps = [mm]
        self.pages = view[: self.file_pages * page_size].reshape(self.file_pages, page_size)
        self.epoch = secrets.token_bytes(EPOCH_BYTES)
        self.session: _Session | None = None
        self.finished = asyncio.Event()  # a session ended with BYE
        self.counters = ReceiverCounters()
        self._token = token
        self._ssl = ssl_context
        self._handshake_timeout = handshake_timeout_s
        self._idle_timeout = idle_timeout_s
        self._max_connections = max_connections
        self._max_pending = max_pending
        self._nonces = NonceLedger()
        self._connections: set[asyncio.Task] = set()  # authenticated
        self._pending: dict[asyncio.Task, None] = {}  # in their handshake, oldest first
        self._server: asyncio.Server | None = None
        self._accept = {
            Kind.PAGES: pages_limit(page_size),
            Kind.ROUND_END: ROUND_END.size,
            Kind.VERIFY: 16 * MAX_VERIFY_RANGES,
            Kind.CLEAR: 16 * MAX_VERIFY_RANGES,
            Kind.BYE: 0,
        }

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen; returns the bound address (port 0 picks a free one)."""
        self._server = await asyncio.get_running_loop().create_server(
            lambda: Inbound(HANDSHAKE_BUFFER, lambda conn: self.serve(conn, conn)), host, port, ssl=self._ssl
        )
        return self._server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [*self._pending, *self._connections]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.pages = np.empty((0, self.page_size), np.uint8)
        release(self._maps)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    async def __aenter__(self) -> Receiver:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def serve(self, reader: asyncio.StreamReader | Inbound, writer: asyncio.StreamWriter | Inbound) -> None:
        me = asyncio.current_task()
        if me is None:
            raise RuntimeError("Receiver.serve must run in a task")
        peer = writer.get_extra_info("peername")
        self.counters.connections += 1
        self._pending[me] = None
        if len(self._pending) > self._max_pending:
            oldest = next(iter(self._pending))
            del self._pending[oldest]
            oldest.cancel()  # its connection closes: a sender there reconnects
            log.warning("%d connections in their handshake: dropped the oldest", self._max_pending)
        session: _Session | None = None
        lane = -1
        try:
            async with asyncio.timeout(self._handshake_timeout):
                session, lane = await self._handshake(reader, writer, me)
            await self._serve_lane(session, reader, writer)
        except ProtocolError as exc:
            log.warning("%s: refused: %s", peer, exc)
            await _refuse(writer, str(exc))
        except PeerError as exc:
            log.warning("%s: sender reported an error: %s", peer, exc)
        except TimeoutError:
            log.warning("%s: no complete handshake within %gs", peer, self._handshake_timeout)
            await _refuse(writer, "handshake timed out")
        except (asyncio.IncompleteReadError, OSError):
            log.info("%s: connection dropped (lane %d)", peer, lane)
        finally:
            self._pending.pop(me, None)
            self._connections.discard(me)
            if session is not None and session.lanes.get(lane) is me:
                del session.lanes[lane]
                if not session.lanes:
                    session.idle_since = asyncio.get_running_loop().time()
            writer.close()

    async def _handshake(self, reader, writer, me: asyncio.Task) -> tuple[_Session, int]:
        hello = await read_frame(reader, {Kind.HELLO: HELLO.size})
        client_nonce, session_id, lane = HELLO.unpack(exact(hello, HELLO.size))
        server_nonce = secrets.token_bytes(NONCE_BYTES)
        writer.write(encode(Kind.CHALLENGE, 0, server_nonce))
        await writer.drain()
        auth = bytes((await read_frame(reader, {Kind.AUTH: PROOF_BYTES + MAX_PATH_BYTES})).payload)
        answer, expect = auth[:PROOF_BYTES], auth[PROOF_BYTES:]
        if not same(answer, client_proof(self._token, server_nonce, client_nonce, session_id, lane, expect)):
            self.counters.auth_failures += 1
            raise ProtocolError("authentication failed")
        if not self._nonces.fresh(client_nonce):
            self.counters.auth_failures += 1
            raise ProtocolError("authentication failed: replayed client nonce")
        if lane >= MAX_LANES:
            raise ProtocolError(f"lane {lane} is beyond the {MAX_LANES} this receiver serves")
        self._pending.pop(me, None)
        if len(self._connections) >= self._max_connections:
            raise ProtocolError("too many connections")
        self._connections.add(me)
        if isinstance(reader, Inbound):
            reader.reserve(2 * frame_bytes(self.page_size))  # a whole frame, and the next arriving
        session = await self._admit(session_id, lane, me)
        body = self._welcome(expect).encode()
        proof = server_proof(self._token, server_nonce, client_nonce, session_id, lane, body, expect)
        writer.write(encode(Kind.WELCOME, 0, body + proof))
        await writer.drain()
        return session, lane

    def _welcome(self, expect: bytes) -> Welcome:
        """This receiver's facts, and what the sender's expected path (the destination QEMU's
        mem-path) names on this host: the sender compares the two. Only an authenticated
        sender learns them."""
        found, err = None, 0
        if expect:
            try:
                st = os.stat(expect)  # following symlinks, as QEMU's open did
                found = FileId(st.st_dev, st.st_ino)
            except OSError as exc:
                err = exc.errno or errno.ENOENT
        return Welcome(self.epoch, self.file_size, self.page_size, self.file, self.path, found, err)

    async def _admit(self, session_id: bytes, lane: int, me: asyncio.Task) -> _Session:
        """Join or start the session; one at a time, unless the current one is abandoned."""
        now = asyncio.get_running_loop().time()
        s = self.session
        if s is not None and s.id != session_id:
            if s.lanes or now - s.idle_since < self._idle_timeout:
                raise ProtocolError("receiver busy: another migration session is in progress")
            log.warning("session %s abandoned (no connection for %gs)", s.id.hex()[:8], self._idle_timeout)
            s = None
        if s is None:
            s = self.session = _Session(session_id, idle_since=now)
            log.info("session %s started", session_id.hex()[:8])
        old = s.lanes.get(lane)
        if old is not None:
            log.info("session %s: lane %d reconnected", session_id.hex()[:8], lane)
            old.cancel()
            await asyncio.wait([old])
        s.lanes[lane] = me
        return s

    async def _serve_lane(self, s: _Session, reader, writer) -> None:
        while True:
            frame = await read_frame(reader, self._accept)
            if frame.kind == Kind.PAGES:
                batch = decode_pages(frame.payload, self.page_size, self.file_pages)
                self.apply(batch)
                s.pages += batch.index.size + batch.zero.size
                writer.write(encode(Kind.ACK, frame.seq))
                await writer.drain()
            elif frame.kind == Kind.ROUND_END:
                number, sent = ROUND_END.unpack(exact(frame, ROUND_END.size))
                log.info("round %d: %d pages sent, %d written", number, sent, s.pages)
                s.rounds, s.pages = s.rounds + 1, 0
            elif frame.kind == Kind.VERIFY:
                await self._digests(frame.seq, decode_ranges(frame.payload, self.file_pages), writer)
            elif frame.kind == Kind.CLEAR:
                self.clear(decode_ranges(frame.payload, self.file_pages))
                writer.write(encode(Kind.ACK, frame.seq))
                await writer.drain()
            else:  # BYE
                self._end(s)
                return

    def apply(self, batch: PageBatch) -> None:
        """Write a checked batch (`decode_pages` bounded every index by the file). A batch of
        a few runs of consecutive pages is written run by run, as plain copies: faster than
        an indexed write."""
        runs = page_runs(batch.index)
        if len(runs) <= MAX_PLANNED_RUNS:
            at = 0
            for first, n in runs.tolist():
                self.pages[first : first + n] = batch.data[at : at + n]
                at += n
        else:
            self.pages[batch.index] = batch.data
        if batch.zero.size:
            self.pages[batch.zero] = 0

    def clear(self, ranges: np.ndarray) -> None:
        """Make these file pages read as zeros. In the event loop, like `apply`: a CLEAR is
        done whole before any later frame is written, and none of it can land after one."""
        for first, count in ranges.tolist():
            clear(self._fd, first * self.page_size, count * self.page_size)
        log.info("cleared %d pages", int(ranges[:, 1].sum()))

    async def _digests(self, seq: int, ranges: np.ndarray, writer) -> None:
        for first, count in digest_chunks(ranges):
            rows = self.pages[first : first + count]
            writer.write(encode_digests(seq, first, await asyncio.to_thread(page_hashes, rows, self.page_size)))
            await writer.drain()
        log.info("verification: hashes of %d pages sent", int(ranges[:, 1].sum()))

    def _end(self, s: _Session) -> None:
        log.info("session %s ended after %d rounds", s.id.hex()[:8], s.rounds)
        me = asyncio.current_task()
        for task in s.lanes.values():
            if task is not me:
                task.cancel()
        s.lanes.clear()
        if self.session is s:
            self.session = None
        self.finished.set()


async def _refuse(writer: asyncio.StreamWriter | Inbound, reason: str) -> None:
    try:
        writer.write(error_frame(reason))
        await writer.drain()
    except OSError:
        pass
    writer.close()
