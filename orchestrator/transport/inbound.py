"""One receiving connection: the socket reads straight into a reusable buffer.

`asyncio.StreamReader` copies every byte twice on top of the kernel's copy (into its buffer,
then out into a fresh `bytes` per `readexactly`), which halves a receiver's throughput for
multi-megabyte frames. This protocol has the same `readexactly`/`write`/`drain`/`close` surface
the receiver uses, but `readexactly` returns a view into one preallocated buffer, valid until
the next read, and the transport receives into that buffer directly (`BufferedProtocol`).
The buffer starts small (what a handshake needs) and grows by `reserve` once the peer has
authenticated, so a connection nobody vouched for costs kilobytes, not megabytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


class Inbound(asyncio.BufferedProtocol):
    def __init__(self, capacity: int, serve: Callable[[Inbound], Coroutine[Any, Any, None]]) -> None:
        """`capacity`: the largest read plus room to receive the next one meanwhile (until
        `reserve`); `serve(self)` runs as a task once the connection is made."""
        self._buf = bytearray(capacity)
        self._view = memoryview(self._buf)
        self._start = self._end = 0  # unread bytes are _buf[_start:_end]
        self._want = 0
        self._eof = False
        self._error: Exception | None = None
        self._data = asyncio.Event()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._paused = False
        self._serve = serve
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task | None = None

    @property
    def _transport(self) -> asyncio.Transport:
        if self.transport is None:
            raise RuntimeError("Inbound: no connection has been made yet")
        return self.transport

    # --- protocol callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.task = asyncio.get_running_loop().create_task(self._serve(self))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        if self._end == len(self._buf):
            self._transport.pause_reading()  # full: resumes when a read makes room
            self._paused = True
        if self._end - self._start >= self._want:
            self._data.set()

    def eof_received(self) -> bool:
        self._eof = True
        self._data.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._error = exc
        self._data.set()
        self._can_write.set()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # --- the reader/writer surface -----------------------------------------------------------

    def reserve(self, capacity: int) -> None:
        """Grow the buffer to `capacity`, keeping the unread bytes. A view an earlier read
        returned keeps the old buffer alive while it is held."""
        if capacity <= len(self._buf):
            return
        buf = bytearray(capacity)
        unread = self._end - self._start
        buf[:unread] = self._view[self._start : self._end]
        self._buf, self._view = buf, memoryview(buf)
        self._start, self._end = 0, unread
        if self._paused:
            self._paused = False
            self._transport.resume_reading()

    async def readexactly(self, n: int) -> memoryview:
        if n > len(self._buf):
            raise ValueError(f"read of {n} bytes exceeds the {len(self._buf)}-byte buffer")
        if len(self._buf) - self._start < n:  # no room behind: move the unread bytes first
            unread = self._end - self._start
            self._buf[:unread] = self._view[self._start : self._end]
            self._start, self._end = 0, unread
            if self._paused:
                self._paused = False
                self._transport.resume_reading()
        while self._end - self._start < n:
            if self._eof:
                if self._error is not None:
                    raise self._error
                raise asyncio.IncompleteReadError(bytes(self._view[self._start : self._end]), n)
            self._want = n
            self._data.clear()
            await self._data.wait()
        out = self._view[self._start : self._start + n]
        self._start += n
        return out

    def write(self, data: bytes) -> None:
        self._transport.write(data)

    async def drain(self) -> None:
        if self._transport.is_closing():
            raise ConnectionResetError("connection closed")
        await self._can_write.wait()

    def close(self) -> None:
        self._transport.close()

    def get_extra_info(self, name: str) -> Any:
        return self._transport.get_extra_info(name)
