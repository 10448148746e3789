"""Running a page-stream receiver: the `receive` command on the destination host, and a
loopback receiver for the demo (same code path, a generated token in a private file)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from .transport.auth import load_token, write_token
from .transport.endpoint import Endpoint, parse_endpoint, server_context
from .transport.receiver import Receiver


async def serve(ram: Path, listen: str, token_file: Path, tls_cert: Path | None, tls_key: Path | None, once: bool) -> int:
    """Serve until SIGINT/SIGTERM, or with `once` until the first session says BYE."""
    logging.basicConfig(level=logging.INFO, format="receiver: %(message)s", stream=sys.stdout)
    token = load_token(token_file)
    where = parse_endpoint(listen)
    tls = server_context(tls_cert, tls_key) if tls_cert else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Receiver(str(ram), token, ssl_context=tls) as receiver:
        host, port = await receiver.start(where.host, where.port)
        print(f"receiving on {Endpoint(host, port)}{' (TLS)' if tls else ''} into {ram} ({receiver.file_size} bytes)", flush=True)
        waits = [asyncio.ensure_future(stop.wait())]
        if once:
            waits.append(asyncio.ensure_future(receiver.finished.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
    return 0


@asynccontextmanager
async def loopback_receiver(ram: Path) -> AsyncIterator[tuple[Endpoint, Path]]:
    """A receiver on 127.0.0.1 writing into `ram`; yields its address and a token file
    (mode 0600 in a private directory) for the sender. Everything goes on exit."""
    with tempfile.TemporaryDirectory(prefix="orchestrator-token-") as tmp:
        token_file = Path(tmp) / "token"
        write_token(token_file)
        async with Receiver(str(ram), load_token(token_file)) as receiver:
            host, port = await receiver.start("127.0.0.1", 0)
            yield Endpoint(host, port), token_file
