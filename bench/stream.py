"""Loopback throughput of the TCP page stream beside a raw socket baseline, in the same run.

The stream figure is round 0 of a guest whose every page is non-zero, sent by `TcpSink` to a
`Receiver` in another process (so each side has its own interpreter, as across hosts): gather
from the source mapping, framing, authentication already done, the receiver's bounds checks
and scatter into its mapped RAM file, ACKs. The baseline moves the same number of bytes over
one plain TCP connection between two processes: `sendall` of 2 MiB slices of the source
mapping, `recv_into` one preallocated buffer, nothing else. Entry point: `stream_throughput`.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import Options, Result, suite

from orchestrator.memory import MemoryLayout
from orchestrator.transport.endpoint import Endpoint
from orchestrator.transport.receiver import Receiver
from orchestrator.transport.tcp import TcpOptions, TcpSink

PAGE = 4096
CHUNK = 2 << 20
TOKEN = b"bench-token-0123456789abcdef"


def _serve_pages(ram: str, ready) -> None:
    async def main() -> None:
        async with Receiver(ram, TOKEN) as receiver:
            ready.send((await receiver.start("127.0.0.1", 0))[1])
            await asyncio.get_running_loop().run_in_executor(None, ready.recv)  # until told to stop

    asyncio.run(main())


def _serve_raw(nbytes: int, repeat: int, ready) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with socket.create_server(("127.0.0.1", 0)) as srv:
        ready.send(srv.getsockname()[1])
        for _ in range(repeat):
            conn, _ = srv.accept()
            with conn:
                got = 0
                while got < nbytes:
                    n = conn.recv_into(view)
                    if not n:
                        break
                    got += n
                conn.sendall(b"k")


def _raw_seconds(port: int, src: np.ndarray) -> float:
    data = memoryview(src)
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        for lo in range(0, len(data), CHUNK):
            s.sendall(data[lo : lo + CHUNK])
        s.recv(1)  # the receiver has everything
    return time.perf_counter() - start


class _Sender:
    """The stream's sending side, kept connected across timed rounds on its own event loop."""

    def __init__(self, port: int, layout: MemoryLayout, src: str, streams: int) -> None:
        self.loop = asyncio.new_event_loop()
        options = TcpOptions(streams=streams)
        self.sink = self.loop.run_until_complete(TcpSink.connect(layout, src, Endpoint("127.0.0.1", port), TOKEN, options))

    def round0(self) -> float:
        start = time.perf_counter()
        self.loop.run_until_complete(self.sink.send_round0())
        return time.perf_counter() - start

    def close(self) -> None:
        self.sink.close()
        self.loop.run_until_complete(asyncio.sleep(0))  # let the BYEs go out
        self.loop.close()


@suite("micro")
def stream(options: Options) -> Result:
    """The cross-host page stream over loopback beside a raw socket, in the same run."""
    return stream_throughput(quick=options.quick)


def stream_throughput(quick: bool = False, size_mib: int | None = None, streams: int = 4) -> dict[str, float | int]:
    """Figures (GB/s of page payload) for the stream and the raw socket, and their ratio.

    Both servers run at once and the two transfers alternate, one of each per repetition
    (after a warm-up pair), so load from neighbours hits both alike."""
    size = (size_mib or (128 if quick else 512)) << 20
    repeat = 3 if quick else 7
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        src, dst = Path(tmp, "src"), Path(tmp, "dst")
        np.random.default_rng(0).integers(1, 256, size, dtype=np.uint8).tofile(src)
        with open(dst, "wb") as f:
            f.truncate(size)
        source = np.memmap(src, np.uint8, mode="r")
        raw_pipe, raw_child = ctx.Pipe()
        page_pipe, page_child = ctx.Pipe()
        servers = [
            ctx.Process(target=_serve_raw, args=(size, repeat + 1, raw_child)),
            ctx.Process(target=_serve_pages, args=(str(dst), page_child)),
        ]
        for p in servers:
            p.start()
        sender = None
        try:
            raw_port, page_port = raw_pipe.recv(), page_pipe.recv()
            sender = _Sender(page_port, MemoryLayout.flat(size), str(src), streams)
            raw_times, stream_times = [], []
            for _ in range(repeat + 1):
                raw_times.append(_raw_seconds(raw_port, source))
                stream_times.append(sender.round0())
        finally:
            if sender is not None:
                sender.close()
            page_pipe.send("stop")
            for p in servers:
                p.join(30)
                p.kill()
        exact = bool(np.array_equal(np.fromfile(dst, np.uint8), source))
        del source

    raw_gbps = size / statistics.median(raw_times[1:]) / 1e9
    stream_gbps = size / statistics.median(stream_times[1:]) / 1e9
    return {
        "stream_size_mib": size >> 20,
        "stream_streams": streams,
        "stream_gbps": round(stream_gbps, 2),
        "raw_socket_gbps": round(raw_gbps, 2),
        "stream_ratio": round(stream_gbps / raw_gbps, 3),
        "stream_bit_exact": int(exact),
    }
