"""A page-stream receiver on loopback for the demo: the same receiver as the `receive`
command, with a generated token in a private file."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from orchestrator.transport.auth import load_token, write_token
from orchestrator.transport.endpoint import Endpoint
from orchestrator.transport.receiver import Receiver


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
