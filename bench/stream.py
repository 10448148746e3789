"""Loopback throughput of the TCP page stream beside a raw socket baseline, in the same run.

The stream figure is round 0 of a guest whose every page is non-zero, sent by `TcpSink` to a
`Receiver` in another process (so each side has its own interpreter, as across hosts): the
zero-page scan, framing (authentication already done), page runs written from the source
mapping, the receiver's bounds checks and copy into its mapped RAM file, ACKs. Round 0 first
clears the receiver's file (holes punched: it assumes nothing about what the file held), so
every page it receives is allocated anew, as in a destination QEMU that has just started. The
baseline moves the same number of bytes over one plain TCP connection between two processes
into the same kind of destination: `sendall` of 2 MiB slices of the source mapping,
`recv_into` a shared mapping of a file in the same directory whose pages are punched out before
each transfer, nothing else. (A baseline receiving into one reused buffer would leave the
kernel's page allocation, which no real destination avoids, to the stream alone.) The
scattered round writes into pages its destination already holds, so its ratio is against a
second baseline into a file that is not punched (`raw_socket_warm_gbps`).

Four stream figures: the default four lanes (the target's figure); one lane (the baseline's
connection count); round 0 for a content-hash tracker, which needs a snapshot of the bytes sent,
so every batch is gathered into its frame and hashed once acknowledged (what `migrate` does);
and a dirty round of every other page over four lanes (scattered pages are gathered; its GB/s
counts the pages sent). Entry point: `stream_throughput`.
"""

from __future__ import annotations

import asyncio
import mmap
import multiprocessing as mp
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import Options, Result, suite
from orchestrator.dirty.memory import MemoryLayout
from orchestrator.trackers import content_trackers
from orchestrator.transport.endpoint import Endpoint
from orchestrator.transport.ramfile import clear_file
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


def _serve_raw(path: str, nbytes: int, repeat: int, fresh: bool, ready) -> None:
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), nbytes) as mapped, socket.create_server(("127.0.0.1", 0)) as srv:
        view = memoryview(mapped)
        ready.send(srv.getsockname()[1])
        for _ in range(repeat):
            conn, _ = srv.accept()
            if fresh:
                clear_file(path, 0, nbytes)  # a fresh destination, as round 0 makes the stream's
            with conn:
                got = 0
                while got < nbytes:
                    n = conn.recv_into(view[got : min(got + CHUNK, nbytes)])
                    if not n:
                        break
                    got += n
                conn.sendall(b"k")
        view.release()


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

    def __init__(self, port: int, layout: MemoryLayout, src: str, streams: int, content: bool) -> None:
        self.loop = asyncio.new_event_loop()
        options = TcpOptions(streams=streams)
        self.sink = self.loop.run_until_complete(
            TcpSink.connect(layout, src, Endpoint("127.0.0.1", port), TOKEN, options)
        )
        self.on_sent = None
        if content:
            (tracker,) = content_trackers(layout, src)
            tracker.start(layout)
            self.on_sent = tracker.record_sent

    def timed(self, pages: np.ndarray | None = None) -> float:
        """Seconds for round 0 (no `pages`) or for a round sending `pages`."""
        start = time.perf_counter()
        send = self.sink.send_round0(self.on_sent) if pages is None else self.sink.send_pages(pages, self.on_sent)
        self.loop.run_until_complete(send)
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
    """Figures (GB/s of page payload) for the stream and the raw socket, and their ratios.

    All servers run at once and the transfers alternate, one of each per repetition (after a
    warm-up set), so load from neighbours hits all alike. Each stream figure has a receiver
    and a destination file of its own, checked bit-exact at the end."""
    size = (size_mib or (128 if quick else 512)) << 20
    repeat = 3 if quick else 9
    every_other = np.arange(0, size // PAGE, 2)
    figures = {  # name: (lanes, content tracking, pages of the timed round or None for round 0)
        "stream": (streams, False, None),
        "stream_1lane": (1, False, None),
        "stream_content": (streams, True, None),
        "stream_scattered": (streams, False, every_other),
    }
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        src = Path(tmp, "src")
        np.random.default_rng(0).integers(1, 256, size, dtype=np.uint8).tofile(src)
        source = np.memmap(src, np.uint8, mode="r")
        raw_pipes, servers = {}, []
        for raw, fresh in (("raw", True), ("raw_warm", False)):
            with open(Path(tmp, raw), "wb") as f:
                f.truncate(size)
            raw_pipes[raw], child = ctx.Pipe()
            servers.append(ctx.Process(target=_serve_raw, args=(str(Path(tmp, raw)), size, repeat + 1, fresh, child)))
        pipes, senders = [], {}
        for name in figures:
            with open(Path(tmp, name), "wb") as f:
                f.truncate(size)
            pipe, child = ctx.Pipe()
            pipes.append(pipe)
            servers.append(ctx.Process(target=_serve_pages, args=(str(Path(tmp, name)), child)))
        for p in servers:
            p.start()
        try:
            raw_ports = {raw: pipe.recv() for raw, pipe in raw_pipes.items()}
            for (name, (lanes, content, _)), pipe in zip(figures.items(), pipes, strict=False):
                senders[name] = _Sender(pipe.recv(), MemoryLayout.flat(size), str(src), lanes, content)
            times: dict[str, list[float]] = {raw: [] for raw in raw_ports} | {name: [] for name in figures}
            for _ in range(repeat + 1):
                for raw, port in raw_ports.items():
                    times[raw].append(_raw_seconds(port, source))
                for name, (_, _, pages) in figures.items():
                    times[name].append(senders[name].timed(pages))
        finally:
            for sender in senders.values():
                sender.close()
            for pipe in pipes:
                pipe.send("stop")
            for p in servers:
                p.join(30)
                p.kill()
        rounds0 = [name for name, (_, _, pages) in figures.items() if pages is None]
        exact = all(np.array_equal(np.fromfile(Path(tmp, name), np.uint8), source) for name in rounds0)
        scattered = np.fromfile(Path(tmp, "stream_scattered"), np.uint8).reshape(-1, PAGE)
        exact = exact and bool(np.array_equal(scattered[every_other], source.reshape(-1, PAGE)[every_other]))
        del source, scattered

    def gbps(name: str, nbytes: int = size) -> float:
        return nbytes / statistics.median(times[name][1:]) / 1e9

    raw, warm = gbps("raw"), gbps("raw_warm")
    out: dict[str, float | int] = {
        "stream_size_mib": size >> 20,
        "stream_streams": streams,
        "raw_socket_gbps": round(raw, 2),
        "raw_socket_warm_gbps": round(warm, 2),
    }
    for name, (_, _, pages) in figures.items():
        figure = gbps(name, size if pages is None else pages.size * PAGE)
        out[f"{name}_gbps"] = round(figure, 2)
        # Round 0 writes into a cleared file, a later round into pages already there: each
        # against the baseline whose destination is in the same state.
        out[f"{name}_ratio"] = round(figure / (raw if pages is None else warm), 3)
    out["stream_bit_exact"] = int(exact)
    return out
