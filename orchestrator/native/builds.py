"""What the demo and the vCPU tracker run that is not Python: the fixture guest kernel, the
vCPU dirty-log TCG plugin and the fw_cfg data file. Their sources ship inside the package
(`csrc/`), so an installed package builds them itself, into a per-user cache, on first use.

An artifact lives at `$XDG_CACHE_HOME/orchestrator/<key>/<name>` (default `~/.cache`), `key`
a hash of its recipe and of the bytes of its sources: an edited source builds a new entry
instead of reusing a stale one, and a checkout and an installed wheel of the same sources
share one. A lock file in the entry keeps two processes from building it at once, and the
artifact appears by rename, so it is either whole or absent. `make fixtures` builds them
all through `python -m orchestrator.native.builds`, the same recipe an installed package uses.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from orchestrator.native.fwcfg import write_fwcfg

PACKAGE = Path(__file__).resolve().parent

#: Debian packages of the C builds: the compiler, the assembler and linker, libc's headers.
C_PACKAGES = ("gcc", "binutils", "libc6-dev")


class BuildError(OSError):
    """An artifact that could not be built: a missing tool or a failed command, with the
    Debian packages that provide what the build needs. An OSError, like a missing file,
    because it is the host that lacks something."""


@dataclass(frozen=True)
class Artifact:
    """One file made from package sources, by commands or by a Python function."""

    name: str
    #: Package-relative files whose bytes, with the commands, make the cache key (a
    #: `write` function's module among them).
    sources: tuple[str, ...]
    #: Run in order in a scratch directory; `{pkg}` is the package directory, `{out}` the file to make.
    commands: tuple[tuple[str, ...], ...] = ()
    write: Callable[[Path], None] | None = None
    #: Programs the commands run, looked up on PATH before the build starts.
    tools: tuple[str, ...] = ()
    #: Debian packages that provide them (and the headers they compile against).
    packages: tuple[str, ...] = ()

    def key(self) -> str:
        digest = hashlib.sha256(f"{self.name}\0{self.commands!r}\0".encode())
        for source in self.sources:
            digest.update(f"{source}\0".encode())
            digest.update((PACKAGE / source).read_bytes())
        return digest.hexdigest()[:16]


# The guest is freestanding 32-bit code linked by hand: no libc, no libgcc, so plain
# gcc/binutils suffice (no multilib).
GUEST_CFLAGS = (
    "-m32",
    "-ffreestanding",
    "-fno-pic",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-O2",
    "-msse2",
    "-Wall",
    "-Wextra",
    "-Werror",
)
HOST_CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden")

GUEST = Artifact(
    "guest.elf",
    ("csrc/guest/boot.S", "csrc/guest/guest.c", "csrc/guest/guest.ld"),
    (
        ("gcc", "-m32", "-c", "{pkg}/csrc/guest/boot.S", "-o", "boot.o"),
        ("gcc", *GUEST_CFLAGS, "-c", "{pkg}/csrc/guest/guest.c", "-o", "guest.o"),
        (
            "ld",
            "-m",
            "elf_i386",
            "-nostdlib",
            "-z",
            "noexecstack",
            "--no-warn-rwx-segments",
            "-T",
            "{pkg}/csrc/guest/guest.ld",
            "-o",
            "{out}",
            "boot.o",
            "guest.o",
        ),
    ),
    tools=("gcc", "as", "ld"),
    packages=C_PACKAGES,
)

# QEMU's plugin API header is not packaged by Debian: csrc/plugin/qemu_plugin_api.h declares
# the part of the documented ABI the plugin uses, so the plugin builds without QEMU's sources.
PLUGIN = Artifact(
    "libdirtylog.so",
    ("csrc/plugin/dirtylog.c", "csrc/plugin/dirtylog.h", "csrc/plugin/qemu_plugin_api.h"),
    (("gcc", *HOST_CFLAGS, "-fPIC", "-shared", "-o", "{out}", "{pkg}/csrc/plugin/dirtylog.c"),),
    tools=("gcc", "as", "ld"),
    packages=C_PACKAGES,
)

FWCFG = Artifact("fwcfg.bin", ("fwcfg.py",), write=write_fwcfg)

ARTIFACTS = {a.name: a for a in (GUEST, PLUGIN, FWCFG)}


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/orchestrator`; `~/.cache/orchestrator` when it is unset or not
    absolute, as the XDG base directory specification says."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "orchestrator"


def location(artifact: Artifact) -> Path:
    """Where `artifact` of the current sources is, or will be once built."""
    return cache_root() / artifact.key() / artifact.name


def ensure(artifact: Artifact) -> Path:
    """The path of `artifact`, built first unless the cache has it."""
    out = location(artifact)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():  # unless another process built it while this one waited
            _build(artifact, out)
    return out


def _install_hint(artifact: Artifact) -> str:
    return (
        f"it needs the Debian packages {', '.join(artifact.packages)} (apt-get install {' '.join(artifact.packages)})"
    )


def _build(artifact: Artifact, out: Path) -> None:
    missing = [tool for tool in artifact.tools if shutil.which(tool) is None]
    if missing:
        raise BuildError(f"cannot build {artifact.name}: {', '.join(missing)} not found; {_install_hint(artifact)}")
    print(f"orchestrator: building {artifact.name} in {out.parent}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=out.parent) as scratch:
        made = Path(scratch) / artifact.name
        for command in artifact.commands:
            argv = [word.format(pkg=PACKAGE, out=made) for word in command]
            run = subprocess.run(argv, cwd=scratch, capture_output=True, text=True)
            if run.returncode:
                raise BuildError(
                    f"cannot build {artifact.name}: `{shlex.join(argv)}` exited with status "
                    f"{run.returncode}:\n{run.stderr.strip()}\n{_install_hint(artifact)}"
                )
        if artifact.write is not None:
            artifact.write(made)
        os.replace(made, out)


def main(argv: list[str]) -> int:
    """`python -m orchestrator.native.builds [NAME...]`: build the named artifacts (all without
    names) and print where each is."""
    unknown = sorted(set(argv) - ARTIFACTS.keys())
    if unknown:
        print(f"unknown artifact {', '.join(unknown)}; choose from {', '.join(ARTIFACTS)}", file=sys.stderr)
        return 2
    try:
        for name in argv or ARTIFACTS:
            print(f"{name} {ensure(ARTIFACTS[name])}")
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
