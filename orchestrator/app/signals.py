"""One signal policy for every command: SIGINT, SIGTERM and SIGHUP all stop it the same way.

The first of them cancels the command's task, so the command's own unwinding does the work: a
migration before `migrate-continue` aborts (devices back to RUNNING, QEMU's migration
cancelled, the source resumed if it ran), after it finishes the switchover; QEMUs the
command launched and every file it made are removed. Later signals only say that this is
under way: a second Ctrl-C or a service manager's repeated TERM must not cut the cleanup
short and leave a paused guest behind. Once a command's outcome is settled (the migration has
ended and only reporting and closing remain) it says so with `settle()`, and a signal then
changes nothing: the exit status must tell what happened to the guest.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Coroutine
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

_T = TypeVar("_T")

#: What a terminal, an ssh session ending, `kill` and a service manager send.
TERMINATING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class _Policy:
    received: list[signal.Signals] = field(default_factory=list)
    settled: bool = False


_current: ContextVar[_Policy | None] = ContextVar("signal_policy", default=None)


def settle() -> None:
    """The command's outcome is decided: from now on signals are noted, not acted on."""
    policy = _current.get()
    if policy is not None:
        policy.settled = True


class Interrupted(Exception):
    """The command was stopped by a signal (after it cleaned up)."""

    def __init__(self, sig: signal.Signals) -> None:
        self.signal = sig
        super().__init__(f"interrupted by {sig.name}")


async def under_signal_policy(command: Coroutine[Any, Any, _T]) -> _T:
    """Run `command` in this task with the policy installed. A command that completes anyway
    (a switchover past `migrate-continue`) returns normally; one that was cancelled raises
    `Interrupted` naming the signal."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    policy = _Policy()
    _current.set(policy)

    def on_signal(sig: signal.Signals) -> None:
        policy.received.append(sig)
        if policy.settled:
            print(f"{sig.name}: the migration has ended, finishing its report", file=sys.stderr, flush=True)
        elif len(policy.received) == 1:
            print(f"{sig.name}: stopping, putting everything back first", file=sys.stderr, flush=True)
            task.cancel()
        else:
            print(f"{sig.name}: still putting everything back, please wait", file=sys.stderr, flush=True)

    for sig in TERMINATING:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await command
    except asyncio.CancelledError:
        if not policy.received or task.uncancel() > 0:
            raise
        raise Interrupted(policy.received[0]) from None
    finally:
        for sig in TERMINATING:
            loop.remove_signal_handler(sig)
