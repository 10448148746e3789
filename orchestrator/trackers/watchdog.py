"""Run a blocking call in its own daemon thread and await it with a watchdog.

A device ioctl can hang (a wedged device, or one stuck behind a hung REPORT holding the
driver's mutex); such a thread cannot be killed. Daemon threads keep a hung call from
blocking interpreter exit, and a fresh thread per call means one hung device never starves
the others of workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any


def run_blocking(fn: Callable[..., Any], *args: Any, name: str = "tracker-call") -> asyncio.Future[Any]:
    """Start `fn(*args)` in a daemon thread; the returned future resolves with its result."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def body() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:
            ok, value = False, exc
        else:
            ok, value = True, result
        with contextlib.suppress(RuntimeError):  # the loop is gone; nobody is waiting any more
            loop.call_soon_threadsafe(settle, ok, value)

    threading.Thread(target=body, name=name, daemon=True).start()
    return fut


async def watched(
    fn: Callable[..., Any], *args: Any, timeout: float, name: str, on_settled: Callable[[], None] | None = None
) -> Any:
    """`fn(*args)` in a daemon thread; TimeoutError naming the call if it takes longer than
    `timeout` seconds (the thread is abandoned, not stopped). `on_settled` runs when the call
    really ends, even long after a timeout: until then it may still hold the device."""
    fut = run_blocking(fn, *args, name=name)

    def settled(f: asyncio.Future[Any]) -> None:
        if not f.cancelled():
            f.exception()  # a late failure of an abandoned call is expected, not "never retrieved"
        if on_settled is not None:
            on_settled()

    fut.add_done_callback(settled)
    try:
        return await asyncio.wait_for(asyncio.shield(fut), timeout)
    except TimeoutError:
        raise TimeoutError(f"{name} did not return within {timeout:g}s") from None
