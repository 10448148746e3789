"""Why write-watch could not be set up: one exception, its cause as an enum, a message that
names what to change. A refusal always leaves the target process exactly as it was."""

from __future__ import annotations

import enum


class Refusal(enum.Enum):
    UNSUPPORTED_ARCH = "unsupported-arch"
    KERNEL = "kernel"  # no PAGEMAP_SCAN or no async userfaultfd write-protection (Linux < 6.7)
    PTRACE_DENIED = "ptrace-denied"
    SECCOMP_FORBIDS = "seccomp-forbids"  # the target's filter would deny or kill the call
    SECCOMP_UNVERIFIED = "seccomp-unverified"  # a filter we cannot evaluate
    USERFAULTFD_DENIED = "userfaultfd-denied"  # the call itself failed in the target
    REGISTER_REFUSED = "register-refused"  # e.g. the memory is already registered (postcopy)
    NO_MAPPING = "no-mapping"  # the target does not map the RAM file
    PROCESS_GONE = "process-gone"
    STOPPED = "stopped"  # the target is in a group-stop (SIGSTOP)


class WriteWatchError(Exception):
    """Root of write-watch's errors."""


class WriteWatchRefused(WriteWatchError):
    """Write-watch cannot track this process; `cause` says why, the message what to do."""

    def __init__(self, cause: Refusal, message: str) -> None:
        self.cause = cause
        super().__init__(f"write-watch refused ({cause.value}): {message}")
