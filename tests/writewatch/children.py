"""Child processes (not QEMU) whose writes the write-watch tests track: each maps a shared
file and writes pages of it, by command or on its own."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Waits in read() for a line of page numbers, bumps the first byte of each page, answers "ok".
BY_COMMAND = """
import mmap, sys
f = open(sys.argv[1], 'r+b'); m = mmap.mmap(f.fileno(), 0)
print('ready', flush=True)
for line in sys.stdin:
    for p in map(int, line.split()):
        m[p * 4096] = (m[p * 4096] + 1) % 256 or 1
    print('ok', flush=True)
"""

# Writes a fresh counter value into a random page, as fast as it can, until killed: every
# write changes the page's content, so a content snapshot shows each page it touched.
RANDOM_WRITER = """
import mmap, random, struct, sys
f = open(sys.argv[1], 'r+b'); m = mmap.mmap(f.fileno(), 0)
pages = len(m) // 4096
rng = random.Random(int(sys.argv[2]))
print('ready', flush=True)
n = 0
while True:
    n += 1
    p = rng.randrange(pages)
    m[p * 4096 + 8 * (n % 512): p * 4096 + 8 * (n % 512) + 8] = struct.pack('<Q', n)
"""


@contextmanager
def spawned(program: str, path: Path, *args: str) -> Iterator[subprocess.Popen]:
    """`spawn`, killed and reaped on exit."""
    child = spawn(program, path, *args)
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def spawn(program: str, path: Path, *args: str) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", program, str(path), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    if child.stdout.readline().strip() != "ready":
        child.kill()
        raise RuntimeError("child did not start")
    return child


def command(child: subprocess.Popen, pages) -> None:
    child.stdin.write(" ".join(map(str, pages)) + "\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "ok"
