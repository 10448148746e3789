"""Who may write into the destination's RAM: a shared token, proven, never sent.

Challenge-response in both directions. The client proves the token with
HMAC-SHA256(token, "client" | server nonce | client nonce | session | lane | expected path);
the server answers with HMAC-SHA256(token, "server" | the same | the WELCOME fields), so the
sender knows it talks to a receiver holding the token too and that what it reports (epoch,
its file's size and identity, what the expected path names on its host) is genuine.
The server nonce is fresh for every connection, so a recorded proof is worthless on another
connection; the receiver also refuses a client nonce it has seen before.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import struct
from collections import OrderedDict
from pathlib import Path

from orchestrator.transport.errors import TransportError

MIN_TOKEN_BYTES = 16
_LABEL = b"orchestrator page stream v2 "


class TokenError(TransportError, ValueError):
    """A token file that cannot be used; the message says why."""


def load_token(path: Path) -> bytes:
    """The token in `path` (surrounding whitespace ignored). The file must not be readable
    by group or others, like an ssh key."""
    try:
        st = os.stat(path)
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise TokenError(f"cannot read token file {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokenError(
            f"token file {path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):o}): chmod 600 it"
        )
    token = raw.strip()
    if len(token) < MIN_TOKEN_BYTES:
        raise TokenError(f"token in {path} is {len(token)} bytes; use at least {MIN_TOKEN_BYTES}")
    return token


def write_token(path: Path) -> bytes:
    """Create `path` (mode 0600, must not exist) holding a fresh random token."""
    token = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(token + b"\n")
    return token


def _transcript(server_nonce: bytes, client_nonce: bytes, session: bytes, lane: int, expect: bytes) -> bytes:
    return server_nonce + client_nonce + session + struct.pack("<H", lane) + expect


def client_proof(
    token: bytes, server_nonce: bytes, client_nonce: bytes, session: bytes, lane: int, expect: bytes = b""
) -> bytes:
    """`expect`: the path the sender expects the receiver's file at (empty: no expectation)."""
    msg = _LABEL + b"client " + _transcript(server_nonce, client_nonce, session, lane, expect)
    return hmac.new(token, msg, hashlib.sha256).digest()


def server_proof(
    token: bytes,
    server_nonce: bytes,
    client_nonce: bytes,
    session: bytes,
    lane: int,
    welcome: bytes,
    expect: bytes = b"",
) -> bytes:
    msg = _LABEL + b"server " + _transcript(server_nonce, client_nonce, session, lane, expect) + bytes(welcome)
    return hmac.new(token, msg, hashlib.sha256).digest()


def same(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


class NonceLedger:
    """Client nonces seen lately (a bounded memory): a repeated one is a replay."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._capacity = capacity

    def fresh(self, nonce: bytes) -> bool:
        """True the first time `nonce` is offered, False on a repeat."""
        if nonce in self._seen:
            return False
        self._seen[nonce] = None
        if len(self._seen) > self._capacity:
            self._seen.popitem(last=False)
        return True
