"""What the driver needs to slow the source guest when a policy asks: QEMU's auto-converge
acts only inside QEMU's own RAM migration, so the orchestrator brings its own actuator."""

from __future__ import annotations

from typing import Protocol


class Actuator(Protocol):
    async def set(self, level: float) -> None:
        """Take `level` (a share in [0, 1)) of the source's vCPU time away; 0 gives it all back."""

    async def release(self) -> None:
        """Undo everything `set` did (every exit path calls it, also after a failed `set`)."""
