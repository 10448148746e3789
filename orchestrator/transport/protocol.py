"""The page stream's wire format: one fixed header, typed frames, strict decoding.

Every frame is a 16-byte little-endian header, then `length` payload bytes:

    magic "OP" | version u8 | kind u8 | length u32 | seq u64

A reader states which kinds it accepts at this point of the conversation and the largest
payload of each (`read_frame`), so an unexpected kind or an oversize length is refused before
a single payload byte is read. Payload layouts (all integers little-endian):

    HELLO      client nonce[32] session id[16] lane u16
    CHALLENGE  server nonce[32]
    AUTH       HMAC-SHA256 proof[32] | expected path (UTF-8, up to 4096 bytes, may be empty)
    WELCOME    epoch[16] file size u64 page size u32 dev u64 inode u64
               | errno i32 dev u64 inode u64 (what the expected path names there)
               | path length u16 | the served file's real path | proof[32]
    PAGES      n_data u32 n_zero_runs u32 | data[n_data][page size] | index u64[n_data]
               | (first u64, count u64)[n_zero_runs]          seq = the batch number
    ACK        (empty)                                          seq = the batch written / CLEAR done
    ROUND_END  round u32 pages u64
    CLEAR      (first u64, count u64)[n]                        seq = what the ACK repeats
    VERIFY     (first u64, count u64)[n]
    DIGESTS    first u64 | hash u64[count]                      seq = the VERIFY's seq
    BYE        (empty)
    ERROR      reason, UTF-8

Page numbers on the wire are page indices into the destination RAM file (file offset / page
size), not guest-physical numbers: the receiver needs nothing but the file to check every one.
Page data comes first in PAGES so the sender can gather pages straight into the frame.
CLEAR starts round 0: the receiver makes those pages read as zeros (punching holes), so the
round need not send the source's zero pages whatever the destination file held before.
"""

from __future__ import annotations

import asyncio
import enum
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from orchestrator.dirty.ranges import page_runs
from orchestrator.transport.errors import TransportError
from orchestrator.transport.inbound import Inbound

MAGIC = b"OP"
VERSION = 2
HEADER = struct.Struct("<2sBBIQ")
HELLO = struct.Struct("<32s16sH")
WELCOME = struct.Struct("<16sQIQQiQQH")
MAX_PATH_BYTES = 4096
PROOF_BYTES = 32
NONCE_BYTES = 32
ROUND_END = struct.Struct("<IQ")
COUNTS = struct.Struct("<II")
U64 = np.dtype("<u8")

MAX_BATCH_PAGES = 512  # 2 MiB of 4 KiB pages: large frames, and a bounded receive buffer
MAX_VERIFY_RANGES = 1024
DIGEST_CHUNK = 1 << 16  # hashes per DIGESTS frame (512 KiB)
MAX_ERROR_BYTES = 512


class Kind(enum.IntEnum):
    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    WELCOME = 4
    PAGES = 5
    ACK = 6
    ROUND_END = 7
    VERIFY = 8
    DIGESTS = 9
    BYE = 10
    ERROR = 11
    CLEAR = 12


class ProtocolError(TransportError):
    """The peer sent something this side refuses: bad framing, bounds, or authentication."""


class PeerError(TransportError):
    """The peer reported an error (an ERROR frame) and is closing the connection."""


@dataclass(frozen=True)
class Frame:
    kind: Kind
    seq: int
    payload: bytes | memoryview  # a view is valid until the next read from the same stream


@dataclass(frozen=True)
class FileId:
    """A file as its host's kernel names it."""

    dev: int
    ino: int

    def __str__(self) -> str:
        return f"device {os.major(self.dev)}:{os.minor(self.dev)}, inode {self.ino}"


@dataclass(frozen=True)
class Welcome:
    """What a receiver reports about itself and its RAM file, authenticated by its proof."""

    epoch: bytes
    file_size: int
    page_size: int
    file: FileId  # the file it serves (fstat of the fd it holds)
    path: str  # that file's real path on the receiver's host
    expected: FileId | None  # what the sender's expected path names on that host
    expected_errno: int  # why it names nothing, when it does not

    def encode(self) -> bytes:
        path = self.path.encode(errors="surrogateescape")[:MAX_PATH_BYTES]
        exp = self.expected or FileId(0, 0)
        return (
            WELCOME.pack(
                self.epoch,
                self.file_size,
                self.page_size,
                self.file.dev,
                self.file.ino,
                self.expected_errno,
                exp.dev,
                exp.ino,
                len(path),
            )
            + path
        )

    @classmethod
    def decode(cls, body: bytes | memoryview) -> Welcome:
        if len(body) < WELCOME.size:
            raise ProtocolError(f"WELCOME of {len(body)} bytes is shorter than its fields")
        epoch, size, page, dev, ino, err, edev, eino, n = WELCOME.unpack_from(body)
        if len(body) != WELCOME.size + n:
            raise ProtocolError(f"WELCOME is {len(body)} bytes, its path length says {WELCOME.size + n}")
        path = bytes(body[WELCOME.size :]).decode(errors="surrogateescape")
        return cls(epoch, size, page, FileId(dev, ino), path, None if err else FileId(edev, eino), err)


def header(kind: Kind, seq: int, length: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, length, seq)


def encode(kind: Kind, seq: int = 0, payload: bytes = b"") -> bytes:
    return header(kind, seq, len(payload)) + payload


def error_frame(reason: str) -> bytes:
    return encode(Kind.ERROR, 0, reason.encode()[:MAX_ERROR_BYTES])


def parse_header(head: bytes | memoryview, accept: Mapping[Kind, int]) -> tuple[Kind, int, int]:
    """(kind, length, seq) of a header, or `ProtocolError` if this side must not read on."""
    magic, version, kind, length, seq = HEADER.unpack(head)
    if magic != MAGIC:
        raise ProtocolError(f"not a page-stream frame (magic {magic!r})")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version} is not supported (this side speaks {VERSION})")
    if kind == Kind.ERROR:
        return Kind.ERROR, min(length, MAX_ERROR_BYTES), seq
    if kind not in accept:
        name = Kind(kind).name if kind in Kind._value2member_map_ else f"unknown kind {kind}"
        raise ProtocolError(f"unexpected {name} frame here")
    if length > accept[Kind(kind)]:
        raise ProtocolError(f"{Kind(kind).name} frame of {length} bytes exceeds the {accept[Kind(kind)]}-byte limit")
    return Kind(kind), length, seq


async def read_frame(reader: asyncio.StreamReader | Inbound, accept: Mapping[Kind, int]) -> Frame:
    """The next frame of a kind in `accept` (kind -> largest payload). An ERROR frame from the
    peer is always accepted and raised as `PeerError`."""
    kind, length, seq = parse_header(await reader.readexactly(HEADER.size), accept)
    payload = await reader.readexactly(length) if length else b""
    if kind == Kind.ERROR:
        raise PeerError(bytes(payload).decode(errors="replace"))
    return Frame(kind, seq, payload)


def exact(frame: Frame, size: int) -> bytes | memoryview:
    if len(frame.payload) != size:
        raise ProtocolError(f"{frame.kind.name} payload is {len(frame.payload)} bytes, expected {size}")
    return frame.payload


# --- PAGES ------------------------------------------------------------------------------------


def pages_limit(page_size: int) -> int:
    """Largest PAGES payload: a full batch as data, plus a zero run per page (the worst case)."""
    return COUNTS.size + MAX_BATCH_PAGES * (page_size + U64.itemsize + 2 * U64.itemsize)


@dataclass
class EncodedPages:
    """A PAGES frame built around one gather of the source pages."""

    frame: memoryview
    data: np.ndarray  # (n, page size): the rows sent as data, a view into the frame
    is_data: np.ndarray  # per batch page: sent as data (True) or inside a zero run (False)

    @property
    def nbytes(self) -> int:
        return len(self.frame)

    def pieces(self) -> list[memoryview]:
        return [self.frame]


@dataclass
class PlannedPages:
    """A PAGES frame whose page data is not copied: `head`, then the source rows of each
    run in `runs` as they are when written out, then `tail`."""

    head: bytes
    rows: np.ndarray  # the source, one page per row
    runs: list[tuple[int, int]]  # (first row, count) of the data pages, in frame order
    tail: bytes
    is_data: np.ndarray

    @property
    def nbytes(self) -> int:
        return len(self.head) + len(self.tail) + sum(n for _, n in self.runs) * self.rows.shape[1]

    def pieces(self) -> list[bytes | memoryview]:
        """The frame as the buffers to write one after another; the page runs are views."""
        views = [self.rows[first : first + n].data.cast("B") for first, n in self.runs]
        return [self.head, *views, self.tail]


MAX_PLANNED_RUNS = 8  # more (shorter) runs than this are cheaper to gather than to send one by one


def frame_bytes(page_size: int) -> int:
    """The largest PAGES frame, header included: the size of a sender's frame buffer."""
    return HEADER.size + pages_limit(page_size)


def _check_batch(n: int) -> None:
    if not 0 < n <= MAX_BATCH_PAGES:
        raise ValueError(f"a batch holds 1..{MAX_BATCH_PAGES} pages, not {n}")


def _head_and_tail(seq: int, index: np.ndarray, is_data: np.ndarray, page_size: int) -> tuple[bytes, bytes]:
    """Header and counts, and the index tail (data page numbers, then zero runs)."""
    k = int(np.count_nonzero(is_data))
    if k == index.size:
        tail, nruns = index.astype(U64).tobytes(), 0
    else:
        runs = page_runs(index[~is_data])
        tail, nruns = np.concatenate((index[is_data], runs.ravel())).astype(U64).tobytes(), len(runs)
    length = COUNTS.size + k * page_size + len(tail)
    return header(Kind.PAGES, seq, length) + COUNTS.pack(k, nruns), tail


def encode_pages(
    seq: int, rows: np.ndarray, local: np.ndarray, index: np.ndarray, buf: bytearray, find_zero: bool = True
) -> EncodedPages:
    """Gather `rows[local]` (each row one page) straight into a PAGES frame in `buf` (at least
    `frame_bytes` long) whose wire page numbers are `index`. With `find_zero`, pages that are
    all zero travel as runs, without their bytes (round 0 has skipped zero pages already)."""
    n, page_size = local.size, rows.shape[1]
    _check_batch(n)
    top = HEADER.size + COUNTS.size
    data = np.frombuffer(buf, np.uint8, n * page_size, top).reshape(n, page_size)
    np.take(rows, local, axis=0, out=data, mode="clip")  # 'raise' would buffer `out`; `local` is in range
    is_data = np.bitwise_or.reduce(data.view(U64), axis=1) != 0 if find_zero else np.ones(n, bool)
    k = int(np.count_nonzero(is_data))
    if k < n:
        data[:k] = data[is_data]
    head, tail = _head_and_tail(seq, index, is_data, page_size)
    at = top + k * page_size
    buf[:top] = head
    buf[at : at + len(tail)] = tail
    return EncodedPages(memoryview(buf)[: at + len(tail)], data[:k], is_data)


def plan_pages(
    seq: int, rows: np.ndarray, local: np.ndarray, index: np.ndarray, find_zero: bool = True
) -> PlannedPages | None:
    """The same frame as `encode_pages` without gathering: the data pages are named as runs of
    consecutive rows (`local` is sorted), for the caller to send from the source itself. There
    is no snapshot, so this is only for when nothing needs the bytes that went out. None when
    the batch is too scattered for that to pay (more than `MAX_PLANNED_RUNS` runs)."""
    n, page_size = local.size, rows.shape[1]
    _check_batch(n)
    first, last = int(local[0]), int(local[-1])
    spans = np.array([[first, n]]) if last - first == n - 1 else page_runs(local)  # sorted: one run
    if len(spans) > MAX_PLANNED_RUNS:
        return None
    is_data = np.ones(n, bool)
    if find_zero:  # run by run on the source rows: a fancy index would copy them
        is_data = np.concatenate(
            [np.bitwise_or.reduce(rows[f : f + c].view(U64), axis=1) != 0 for f, c in spans.tolist()]
        )
        spans = page_runs(local[is_data])
        if len(spans) > MAX_PLANNED_RUNS:
            return None
    head, tail = _head_and_tail(seq, index, is_data, page_size)
    return PlannedPages(head, rows, [(f, c) for f, c in spans.tolist()], tail, is_data)


@dataclass
class PageBatch:
    index: np.ndarray  # int64 file page numbers, one per data row
    data: np.ndarray  # (n, page size) uint8, a view into the payload
    zero: np.ndarray  # int64 file page numbers to clear


def decode_pages(payload: bytes | memoryview, page_size: int, file_pages: int) -> PageBatch:
    """Check a PAGES payload against the RAM file (`file_pages` pages) and return what to
    write; raises `ProtocolError` on any inconsistency, before anything is written."""
    if len(payload) < COUNTS.size:
        raise ProtocolError(f"PAGES payload of {len(payload)} bytes is shorter than its counts")
    n, nruns = COUNTS.unpack_from(payload)
    if n > MAX_BATCH_PAGES or nruns > MAX_BATCH_PAGES:
        raise ProtocolError(f"PAGES with {n} data pages and {nruns} zero runs exceeds {MAX_BATCH_PAGES}")
    size = COUNTS.size + n * (page_size + U64.itemsize) + nruns * 2 * U64.itemsize
    if len(payload) != size:
        raise ProtocolError(f"PAGES payload is {len(payload)} bytes, its counts say {size}")
    at = COUNTS.size + n * page_size
    data = np.frombuffer(payload, np.uint8, n * page_size, COUNTS.size).reshape(n, page_size)
    index = np.frombuffer(payload, U64, n, at)
    runs = np.frombuffer(payload, U64, 2 * nruns, at + n * U64.itemsize).reshape(nruns, 2)
    if n and int(index.max()) >= file_pages:
        raise ProtocolError(f"page {int(index.max())} is outside the RAM file ({file_pages} pages)")
    first, count = runs[:, 0], runs[:, 1]
    if nruns and (int(count.min()) == 0 or int(first.max()) >= file_pages or bool((count > file_pages - first).any())):
        raise ProtocolError(f"a zero run is empty or reaches past the RAM file ({file_pages} pages)")
    total = int(count.sum(dtype=np.uint64)) if nruns else 0
    if n + total > MAX_BATCH_PAGES:
        raise ProtocolError(f"PAGES covers {n + total} pages, more than {MAX_BATCH_PAGES}")
    offsets = np.cumsum(count) - count
    zero = np.arange(total, dtype=np.int64) + np.repeat((first - offsets).astype(np.int64), count.astype(np.int64))
    return PageBatch(index.astype(np.int64), data, zero)


# --- VERIFY / DIGESTS ---------------------------------------------------------------------------


def encode_ranges(ranges: np.ndarray) -> bytes:
    """(first, count) rows of file pages."""
    return np.ascontiguousarray(ranges, U64).tobytes()


def decode_ranges(payload: bytes | memoryview, file_pages: int) -> np.ndarray:
    """The (first, count) rows of a VERIFY or CLEAR payload, each inside the RAM file."""
    if len(payload) % 16 or not 0 < len(payload) // 16 <= MAX_VERIFY_RANGES:
        raise ProtocolError(f"a payload of {len(payload)} bytes is not 1..{MAX_VERIFY_RANGES} page ranges")
    ranges = np.frombuffer(payload, U64).reshape(-1, 2)
    first, count = ranges[:, 0], ranges[:, 1]
    if (
        int(first.max()) >= file_pages
        or bool((count > file_pages - first).any())
        or int(count.sum(dtype=np.uint64)) > file_pages
    ):
        raise ProtocolError(f"page ranges reach past the RAM file ({file_pages} pages)")
    return ranges.astype(np.int64)


def digest_chunks(ranges: np.ndarray):
    """(first, count) of each DIGESTS frame answering `ranges`: both sides derive the same."""
    for first, count in ranges.tolist():
        for lo in range(0, count, DIGEST_CHUNK):
            yield first + lo, min(DIGEST_CHUNK, count - lo)


def encode_digests(seq: int, first: int, hashes: np.ndarray) -> bytes:
    return encode(Kind.DIGESTS, seq, struct.pack("<Q", first) + hashes.astype(U64).tobytes())


def decode_digests(frame: Frame, first: int, count: int) -> np.ndarray:
    payload = exact(frame, 8 + 8 * count)
    got = struct.unpack_from("<Q", payload)[0]
    if got != first:
        raise ProtocolError(f"DIGESTS for page {got}, expected {first}")
    return np.frombuffer(payload, U64, count, 8)
