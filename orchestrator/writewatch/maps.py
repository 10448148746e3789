"""Where another process maps a file: /proc/PID/smaps, matched by device and inode (a path
can be renamed or reused; the open file cannot), with each mapping's kernel page size."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import Refusal, WriteWatchRefused


@dataclass(frozen=True)
class Mapping:
    """[start, end) of the process's address space maps the file from `offset`."""

    start: int
    end: int
    offset: int
    shared: bool
    page_size: int  # KernelPageSize: 4 KiB, or the huge page size on hugetlbfs

    @property
    def length(self) -> int:
        return self.end - self.start


def _parse_header(line: str) -> tuple[int, int, str, int, int, int, int] | None:
    fields = line.split(None, 5)
    if len(fields) < 5 or "-" not in fields[0]:
        return None
    lo, hi = (int(v, 16) for v in fields[0].split("-"))
    major, minor = (int(v, 16) for v in fields[3].split(":"))
    return lo, hi, fields[1], int(fields[2], 16), major, minor, int(fields[4])


def mappings_of(pid: int, path: str) -> list[Mapping]:
    """Every mapping of `path`'s file in process `pid`, in address order."""
    st = os.stat(path)
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    found: list[Mapping] = []
    current: tuple[int, int, str, int] | None = None
    try:
        smaps = open(f"/proc/{pid}/smaps")
    except FileNotFoundError:
        raise WriteWatchRefused(Refusal.PROCESS_GONE, f"no process {pid}") from None
    except PermissionError:
        raise WriteWatchRefused(
            Refusal.PTRACE_DENIED, f"cannot read process {pid}'s mappings: run as root or with CAP_SYS_PTRACE"
        ) from None
    with smaps:
        for line in smaps:
            head = _parse_header(line) if not line[:1].isupper() else None
            if head is not None:
                lo, hi, perms, offset, major, minor, inode = head
                current = (lo, hi, perms, offset) if (major, minor, inode) == want else None
            elif current is not None and line.startswith("KernelPageSize:"):
                lo, hi, perms, offset = current
                found.append(Mapping(lo, hi, offset, perms[3] == "s", int(line.split()[1]) << 10))
                current = None
    return found
