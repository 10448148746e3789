"""Tracking another process's writes: a ptrace syscall injector, a seccomp verdict, and the
userfaultfd write-watch built on them."""

from orchestrator.writewatch.errors import Refusal, WriteWatchRefused
from orchestrator.writewatch.watch import WriteWatch

__all__ = ["Refusal", "WriteWatch", "WriteWatchRefused"]
