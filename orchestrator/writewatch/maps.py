"""Where another process maps a file: /proc/PID/maps, matched by device and inode (a path
can be renamed or reused; the open file cannot). /proc/PID/maps, not smaps: smaps walks
every page table to count RSS, tens of milliseconds for a guest's RAM."""

from __future__ import annotations

import os
from dataclasses import dataclass

from orchestrator.writewatch.errors import Refusal, WriteWatchRefused


@dataclass(frozen=True)
class Mapping:
    """[start, end) of the process's address space maps the file from `offset`."""

    start: int
    end: int
    offset: int
    shared: bool
    page_size: int  # the file's page: 4 KiB, or the huge page size on hugetlbfs

    @property
    def length(self) -> int:
        return self.end - self.start


def mappings_of(pid: int, path: str) -> list[Mapping]:
    """Every mapping of `path`'s file in process `pid`, in address order."""
    st = os.stat(path)
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    page = max(os.statvfs(path).f_bsize, 4096)  # hugetlbfs reports its huge page size here
    try:
        maps = open(f"/proc/{pid}/maps")  # noqa: SIM115 - closed by the `with` below; only the open may fail here
    except FileNotFoundError:
        raise WriteWatchRefused(Refusal.PROCESS_GONE, f"no process {pid}") from None
    except PermissionError:
        raise WriteWatchRefused(
            Refusal.PTRACE_DENIED, f"cannot read process {pid}'s mappings: run as root or with CAP_SYS_PTRACE"
        ) from None
    found: list[Mapping] = []
    with maps:
        for line in maps:
            fields = line.split(None, 5)
            major, minor = (int(v, 16) for v in fields[3].split(":"))
            if (major, minor, int(fields[4])) != want:
                continue
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            found.append(Mapping(lo, hi, int(fields[2], 16), fields[1][3] == "s", page))
    return found
