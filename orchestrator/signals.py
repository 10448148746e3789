"""One signal policy for every command: SIGINT, SIGTERM and SIGHUP all stop it the same way.

The first of them cancels the command's task, so the command's own unwinding does the work: a
migration before `migrate-continue` aborts (devices back to RUNNING, QEMU's migration
cancelled, the source resumed if it ran), after it finishes the switchover; QEMUs the
command launched and every file it made are removed. Later signals only say that this is
under way: a second Ctrl-C or a service manager's repeated TERM must not cut the cleanup
short and leave a paused guest behind.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")

#: What a terminal, an ssh session ending, `kill` and a service manager send.
TERMINATING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


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
    received: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        if len(received) == 1:
            print(f"{sig.name}: stopping, putting everything back first", file=sys.stderr, flush=True)
            task.cancel()
        else:
            print(f"{sig.name}: still putting everything back, please wait", file=sys.stderr, flush=True)

    for sig in TERMINATING:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await command
    except asyncio.CancelledError:
        if not received or task.uncancel() > 0:
            raise
        raise Interrupted(received[0]) from None
    finally:
        for sig in TERMINATING:
            loop.remove_signal_handler(sig)
