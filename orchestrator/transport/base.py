"""What the migration driver needs from wherever pages go."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

# Called with (guest page numbers, the exact bytes sent for them, one row per page): content
# trackers hash what the destination now holds.
OnSent = Callable[[np.ndarray, np.ndarray], None]


class SinkError(RuntimeError):
    """A page sink cannot do its job (bad RAM file, unreachable or refusing receiver)."""


class PageSink(Protocol):
    page_size: int

    async def send_round0(self, on_sent: OnSent | None = None) -> tuple[int, int]:
        """Every page that is not all zero (the destination starts zeroed): (pages, bytes)."""

    async def send_pages(self, pages: np.ndarray, on_sent: OnSent | None = None) -> int:
        """These guest pages (sorted page numbers), each as it is now; returns bytes moved.
        When it returns, the destination holds them."""

    async def verify(self) -> np.ndarray:
        """Guest page numbers whose bytes differ between source and destination; called while
        both are paused."""

    def close(self) -> None: ...
