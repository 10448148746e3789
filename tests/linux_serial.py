"""Watching the Linux guest's console from tests: every wait fails at once on a failed check
of the guest's own (an E line) or a dead kernel, instead of running into its timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from orchestrator.lab import linux
from orchestrator.lab.launcher import QemuVm


async def wait_until(vm: QemuVm, done: Callable[[str], bool], timeout: float, what: str) -> str:
    """Poll the serial file until `done(text)`; fail at once on an E line or a dead kernel."""
    deadline = time.monotonic() + timeout
    while True:
        text = vm.read_serial()
        assert not linux.failed(text), f"{vm.name}:\n{text[-1500:]}"
        if done(text):
            return text
        vm.check_running()
        assert time.monotonic() < deadline, f"{vm.name}: no {what} within {timeout:g}s:\n{text[-800:]}"
        await asyncio.sleep(0.1)
