"""Input checks the commands make before anything changes, each raising `InputError` with a
message that names the option or file and what to do about it."""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path


class InputError(ValueError):
    """What the user gave cannot work; the message names the option or file."""


def positive(option: str, value: float, unit: str) -> None:
    """A cap or limit: a finite number above zero (argparse takes 'nan' and 'inf' as floats)."""
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"{option} must be a finite number of {unit} above 0, not {value!r}")


def writable_target(option: str, where: str | None) -> None:
    """A report file named on the command line can be written: tried first (opened to append,
    and removed again if this made it), so a migration is never followed by a failure to say
    how it went."""
    if where in (None, "-"):
        return
    path = Path(where)
    if path.is_dir():
        raise InputError(f"{option} {path} is a directory: name a file")
    existed = path.exists()
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    except OSError as exc:
        raise InputError(f"{option} {path} cannot be written ({exc.strerror}): choose another path") from None
    if not existed:
        path.unlink()


def distinct_sockets(src: Path, dst: Path) -> None:
    """Both QMP options name one socket: QEMU would be migrating to itself."""
    try:
        same = os.path.samefile(src, dst)
    except FileNotFoundError:
        return  # the connect names the missing one
    if same:
        raise InputError(f"--src-qmp and --dst-qmp are the same socket ({src}): give the destination QEMU's")


def private_ram(path: Path, side: str, qemu_uid: int | None) -> None:
    """Guest memory is secret: its file must be readable by no other local user. Refused:
    permission bits for 'other', and an owner that is neither this process's user nor the
    user QEMU runs as (that owner can read it, and chmod it) — when QEMU's is known."""
    st = os.stat(path)
    if st.st_mode & stat.S_IRWXO:
        raise InputError(
            f"{side} RAM file {path} is open to every local user (mode {stat.S_IMODE(st.st_mode):04o}), and it holds "
            f"the guest's memory: chmod o-rwx {path}"
        )
    if qemu_uid is not None and st.st_uid not in (os.geteuid(), qemu_uid):
        raise InputError(
            f"{side} RAM file {path} belongs to uid {st.st_uid}, neither this user ({os.geteuid()}) nor QEMU's "
            f"({qemu_uid}), who can read the guest's memory: chown it to QEMU's user"
        )


def process_uid(pid: int) -> int:
    """The user a process runs as (its /proc directory's owner is its effective uid)."""
    return os.stat(f"/proc/{pid}").st_uid
