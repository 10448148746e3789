"""A receiver on loopback over a RAM file, and a raw authenticated client to poke it with."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from orchestrator.dirty.memory import MemoryLayout
from orchestrator.transport.auth import client_proof
from orchestrator.transport.endpoint import Endpoint
from orchestrator.transport.protocol import (
    HELLO,
    MAX_PATH_BYTES,
    NONCE_BYTES,
    PROOF_BYTES,
    WELCOME,
    Kind,
    encode,
    exact,
    read_frame,
)
from orchestrator.transport.receiver import Receiver
from orchestrator.transport.tcp import Reconnect, TcpOptions, TcpSink

PAGE = 4096
NPAGES = 256
TOKEN = b"test-token-0123456789abcdef"
WELCOME_LIMIT = WELCOME.size + MAX_PATH_BYTES + PROOF_BYTES
FAST = TcpOptions(streams=2, reconnect=Reconnect(attempts=3, first_delay_s=0.01, max_delay_s=0.05), ack_timeout_s=5)


def ram(path: Path, data: np.ndarray | None = None) -> Path:
    """A RAM file as a careful user makes one: readable by its owner only."""
    (np.zeros(NPAGES * PAGE, np.uint8) if data is None else data).tofile(path)
    path.chmod(0o600)
    return path


def random_ram(path: Path, seed: int = 0) -> np.ndarray:
    data = np.random.default_rng(seed).integers(0, 256, NPAGES * PAGE, dtype=np.uint8)
    data[3 * PAGE : 9 * PAGE] = 0  # some zero pages for round 0 to skip
    ram(path, data)
    return data


@dataclass
class Served:
    receiver: Receiver
    endpoint: Endpoint
    dst: Path

    def held(self) -> np.ndarray:
        return np.fromfile(self.dst, np.uint8)


@pytest.fixture
async def served(tmp_path):
    dst = ram(tmp_path / "dst")
    receiver = Receiver(str(dst), TOKEN, handshake_timeout_s=5)
    try:
        host, port = await receiver.start("127.0.0.1", 0)
        yield Served(receiver, Endpoint(host, port), dst)
    finally:
        await receiver.close()


async def open_sink(
    tmp_path: Path, endpoint: Endpoint, options: TcpOptions = FAST, seed: int = 0
) -> tuple[TcpSink, Path, np.ndarray]:
    src = tmp_path / "src"
    data = random_ram(src, seed)
    sink = await TcpSink.connect(MemoryLayout.flat(NPAGES * PAGE), str(src), endpoint, TOKEN, options)
    return sink, src, data


class RawClient:
    """Speaks the protocol by hand, so tests can send what a real sender never would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.session = secrets.token_bytes(16)
        self.sent: list[bytes] = []

    @classmethod
    async def connect(cls, endpoint: Endpoint) -> RawClient:
        return cls(*await asyncio.open_connection(endpoint.host, endpoint.port))

    def send(self, data: bytes) -> None:
        self.sent.append(data)
        self.writer.write(data)

    async def hello(self, nonce: bytes | None = None, lane: int = 0) -> bytes:
        """Send HELLO; returns the server nonce of the CHALLENGE."""
        self.nonce = nonce or secrets.token_bytes(NONCE_BYTES)
        self.lane = lane
        self.send(encode(Kind.HELLO, 0, HELLO.pack(self.nonce, self.session, lane)))
        return bytes(exact(await read_frame(self.reader, {Kind.CHALLENGE: NONCE_BYTES}), NONCE_BYTES))

    async def login(self, token: bytes = TOKEN, lane: int = 0) -> None:
        server_nonce = await self.hello(lane=lane)
        self.send(encode(Kind.AUTH, 0, client_proof(token, server_nonce, self.nonce, self.session, lane)))
        await read_frame(self.reader, {Kind.WELCOME: WELCOME_LIMIT})

    async def reply(self, accept: dict[Kind, int]):
        return await read_frame(self.reader, accept)

    def close(self) -> None:
        self.writer.close()
