"""The `receive` command: a page-stream receiver on the destination host until a signal (or,
with `--once`, until its first session ends)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

from orchestrator.app.metrics import receiver_metrics
from orchestrator.transport.auth import load_token
from orchestrator.transport.endpoint import Endpoint, TlsSetupError, parse_endpoint, server_context
from orchestrator.transport.receiver import Receiver


async def serve(
    ram: Path,
    listen: str,
    token_file: Path,
    tls_cert: Path | None,
    tls_key: Path | None,
    once: bool,
    metrics: Endpoint | None = None,
) -> int:
    """Serve until SIGINT/SIGTERM, or with `once` until the first session says BYE; with
    `metrics`, the receiver's counters are served there over HTTP meanwhile."""
    logging.basicConfig(level=logging.INFO, format="receiver: %(message)s", stream=sys.stdout)
    token = load_token(token_file)
    where = parse_endpoint(listen)
    tls = None
    if tls_cert is not None:
        if tls_key is None:
            raise TlsSetupError("a TLS certificate needs its key")
        tls = server_context(tls_cert, tls_key)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Receiver(str(ram), token, ssl_context=tls) as receiver:
        host, port = await receiver.start(where.host, where.port)
        print(
            f"receiving on {Endpoint(host, port)}{' (TLS)' if tls else ''} into {ram} ({receiver.file_size} bytes)",
            flush=True,
        )
        with receiver_metrics(receiver, metrics) as served:
            if served is not None:
                print(f"metrics: http://{served}/metrics", flush=True)
            waits = [asyncio.ensure_future(stop.wait())]
            if once:
                waits.append(asyncio.ensure_future(receiver.finished.wait()))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
    return 0
