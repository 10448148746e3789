"""Reader of the vCPU dirty log that the TCG plugin (csrc/plugin, built by `builds`) writes.

The log is a shared-memory file: a header and two bitmaps in the kernel's
layout (little-endian u64 words, bit k = page k, LSB first). Each vCPU store
sets its page's bit in bitmap ``epoch & 1`` while counted in
``inflight[epoch & 1]``. A harvest flips ``epoch``, waits for the old
bitmap's in-flight count to drain, then ORs it into the caller's bitmap and
zeroes it. After the flip and the drain no writer touches the old bitmap
again (a writer re-checks ``epoch`` after announcing itself and retries on
the new one), so plain numpy reads and writes of it are safe. The flip itself
must be an atomic, fully ordered read-modify-write so that the drain cannot
miss a writer that is about to use the old bitmap; it is done by the kernel
with ``FUTEX_WAKE_OP`` (atomic XOR on the epoch word, waking nobody).

Bit k stands for the address k * page_size as QEMU reported it for a store, and the header
says which kind of address that is (``Addresses``): the plugin records it when it attaches,
and a reader turns log pages into guest pages with the guest's RAM layout
(``trackers.vcpu``).

There is exactly one harvester per log. Layout and writer: dirtylog.h.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import mmap
import os
import platform
import struct
import time
from pathlib import Path

import numpy as np

from orchestrator.dirty.bits import set_bit_range, words_for
from orchestrator.native import builds
from orchestrator.trackers.errors import TrackerError, TrackerSetupError

MAGIC = 0x474F4C5954524944  # b"DIRTYLOG"
VERSION = 2
HEADER_SIZE = 320
BITMAP_OFFSET = 4096
#: The plugin in the per-user cache; `plugin_args()` builds it there on first use.
PLUGIN = builds.location(builds.PLUGIN)

_HEADER = struct.Struct("<QIIQQQII")  # magic .. spare (offsets 0..47)
_U64_UNRESOLVED = 48 // 8
_U32_ATTACHED, _U32_SPARE, _U32_EPOCH = 40 // 4, 44 // 4, 64 // 4
_U32_INFLIGHT = (128 // 4, 192 // 4)
_U32_ADDRESSES = 256 // 4

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine())
_FUTEX_WAKE_OP = 5
_FLIP_OP = (4 << 28) | (1 << 12)  # FUTEX_OP_XOR with oparg 1, compare unused
_SPINS = 1000
_libc = ctypes.CDLL(None, use_errno=True)


class Addresses(enum.IntEnum):
    """What the addresses in a log are (the header's ``addresses`` word, DIRTYLOG_ADDR_*)."""

    #: No plugin has attached yet.
    UNKNOWN = 0
    #: QEMU's RAM-block numbering (QEMU up to 8.1). Guest RAM from one memory backend is
    #: QEMU's first RAM block, at 0, so these are offsets in the RAM file.
    RAM_BLOCK = 1
    #: Guest-physical addresses (QEMU 8.2 and later).
    PHYSICAL = 2


#: The plugin's ``addr=`` value that forces each kind.
_ADDR_ARG = {Addresses.RAM_BLOCK: "ram", Addresses.PHYSICAL: "gpa"}


def log_pages(ram_bytes: int, page_size: int = 4096) -> int:
    """Pages a log needs for an x86 guest with ``ram_bytes`` of RAM, in either numbering:
    RAM that does not fit below the 32-bit PCI hole goes on at 4 GiB, so no guest-physical
    RAM address reaches ``ram_bytes + 4 GiB``, and no RAM file offset reaches ``ram_bytes``."""
    return -(-(ram_bytes + (4 << 30)) // page_size)


class DrainTimeout(TrackerError, RuntimeError):
    """A writer kept the old bitmap busy past the timeout (a hung vCPU or plugin)."""


def _popcount(words: np.ndarray) -> int:
    return int(np.unpackbits(words.view(np.uint8)).sum())


class VcpuDirtyLog:
    """One shared dirty-log file and its single harvester."""

    def __init__(self, path: Path, fd: int, npages: int, page_size: int, stride: int) -> None:
        self.path = path
        self.npages = npages
        self.page_size = page_size
        self._map = mmap.mmap(fd, BITMAP_OFFSET + 2 * stride)
        mem = np.frombuffer(self._map, dtype=np.uint8)
        self._base = mem.ctypes.data
        self._u32 = mem[:HEADER_SIZE].view("<u4")
        self._u64 = mem[:HEADER_SIZE].view("<u8")
        nwords = words_for(npages)
        self._bufs = tuple(
            mem[BITMAP_OFFSET + b * stride : BITMAP_OFFSET + b * stride + 8 * nwords].view("<u8") for b in (0, 1)
        )
        self._seen_unresolved = int(self._u64[_U64_UNRESOLVED])
        self._broken: str | None = None

    @classmethod
    def create(cls, path: str | Path, npages: int, page_size: int = 4096) -> VcpuDirtyLog:
        """Create the log file (mode 0600; it must not exist) with an empty log."""
        if npages <= 0 or page_size < 4096 or page_size & (page_size - 1):
            raise TrackerSetupError("npages must be positive and page_size a power of two >= 4096")
        path = Path(path)
        stride = -(-words_for(npages) * 8 // 4096) * 4096
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, BITMAP_OFFSET + 2 * stride)
            header = _HEADER.pack(MAGIC, VERSION, page_size.bit_length() - 1, npages, BITMAP_OFFSET, stride, 0, 0)
            os.pwrite(fd, header, 0)
            return cls(path, fd, npages, page_size, stride)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)

    @classmethod
    def open(cls, path: str | Path) -> VcpuDirtyLog:
        """An existing log (created by `create`, e.g. through `orchestrator vcpu-log`), checked
        against its header before it is mapped."""
        path = Path(path)
        fd = os.open(path, os.O_RDWR)
        try:
            magic, version, shift, npages, offset, stride, _, _ = _HEADER.unpack(os.pread(fd, _HEADER.size, 0))
            if magic != MAGIC or version != VERSION or offset != BITMAP_OFFSET:
                raise TrackerSetupError(f"{path} is not a version {VERSION} vCPU dirty log")
            if os.fstat(fd).st_size < BITMAP_OFFSET + 2 * stride or stride < words_for(npages) * 8:
                raise TrackerSetupError(f"{path} is shorter than its header says")
            return cls(path, fd, npages, 1 << shift, stride)
        finally:
            os.close(fd)

    def plugin_args(self, plugin: str | Path | None = None, addresses: Addresses | None = None) -> str:
        """The value of QEMU's ``-plugin`` option that logs into this file, with ``plugin``
        or else ``PLUGIN`` (built first if the cache lacks it). The plugin infers what QEMU's
        addresses are from its plugin API; ``addresses`` overrides that, which QEMU 8.2
        needs (``Addresses.PHYSICAL``)."""
        args = f"{plugin or builds.ensure(builds.PLUGIN)},shm={self.path},pages={self.npages}"
        return args if addresses is None else f"{args},addr={_ADDR_ARG[addresses]}"

    @property
    def attached(self) -> int:
        """How many plugin instances have mapped this log."""
        return int(self._u32[_U32_ATTACHED])

    @property
    def addresses(self) -> Addresses:
        """What the plugin logs: set when it attaches, before ``attached`` counts it."""
        return Addresses(int(self._u32[_U32_ADDRESSES]))

    @property
    def unresolved(self) -> int:
        """Stores whose physical address the plugin could not resolve."""
        return int(self._u64[_U64_UNRESOLVED])

    def harvest(self, out_words: np.ndarray, timeout: float = 2.0) -> int:
        """OR the pages dirtied since the last harvest into ``out_words``.

        ``out_words`` is the caller's uint64 bitmap of at least
        ``words_for(npages)`` words. Returns how many bits this harvest
        carried (``npages`` when the plugin lost addresses and everything is
        reported dirty). Raises DrainTimeout if a writer never leaves the old
        bitmap; the log is unusable after that.
        """
        self._check(out_words)
        old = int(self._u32[_U32_EPOCH]) & 1
        self._flip()
        self._drain((old,), timeout)
        return self._take((old,), out_words)

    def harvest_final(self, out_words: np.ndarray, timeout: float = 2.0) -> int:
        """Harvest both bitmaps; for the last round, with the vCPUs stopped."""
        self._check(out_words)
        self._drain((0, 1), timeout)
        return self._take((0, 1), out_words)

    def _check(self, out_words: np.ndarray) -> None:
        if self._map.closed:
            raise ValueError("dirty log is closed")
        if self._broken:
            raise DrainTimeout(self._broken)
        if out_words.dtype != np.uint64 or out_words.size < words_for(self.npages):
            raise ValueError(f"need a uint64 bitmap of {words_for(self.npages)} words")

    def _flip(self) -> None:
        if _SYS_FUTEX is None:
            raise OSError(f"no futex syscall number known for {platform.machine()}")
        ret = _libc.syscall(
            ctypes.c_long(_SYS_FUTEX),
            ctypes.c_void_p(self._base + 4 * _U32_SPARE),
            ctypes.c_int(_FUTEX_WAKE_OP),
            ctypes.c_int(0),
            ctypes.c_void_p(0),
            ctypes.c_void_p(self._base + 4 * _U32_EPOCH),
            ctypes.c_int(_FLIP_OP),
        )
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"flipping the dirty-log epoch: {os.strerror(err)}")

    def _drain(self, bufs: tuple[int, ...], timeout: float) -> None:
        """Wait, spinning briefly then sleeping, until no writer holds ``bufs``."""
        deadline = time.monotonic() + timeout
        for b in bufs:
            spins = 0
            while (held := int(self._u32[_U32_INFLIGHT[b]])) != 0:
                spins += 1
                if spins < _SPINS:
                    continue
                if time.monotonic() > deadline:
                    self._broken = (
                        f"dirty-log writer held bitmap {b} of {self.path} for over "
                        f"{timeout}s (inflight={held}); is the vCPU thread hung?"
                    )
                    raise DrainTimeout(self._broken)
                time.sleep(0.0002)

    def _take(self, bufs: tuple[int, ...], out_words: np.ndarray) -> int:
        count = 0
        for b in bufs:
            buf = self._bufs[b]
            nz = np.flatnonzero(buf)
            if nz.size:
                bits = buf[nz]
                out_words[nz] |= bits
                buf[nz] = 0
                count += _popcount(bits)
        # Read after the drain: a store counted here is at least as old as
        # the bits just taken, so the next copy of all pages covers it.
        unresolved = int(self._u64[_U64_UNRESOLVED])
        if unresolved != self._seen_unresolved:
            self._seen_unresolved = unresolved
            set_bit_range(out_words, 0, self.npages)
            count = self.npages
        return count

    def close(self) -> None:
        """Unmap the log (the file stays; see ``unlink``). A harvest the watchdog abandoned
        may still hold a view of it: then the mapping goes when that view does."""
        if self._map.closed:
            return
        del self._u32, self._u64, self._bufs
        with contextlib.suppress(BufferError):  # views still exported: unmapped when they go
            self._map.close()

    def unlink(self) -> None:
        """Remove the log file."""
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> VcpuDirtyLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        self.unlink()
