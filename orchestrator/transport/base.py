"""What the migration driver needs from wherever pages go."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from orchestrator.transport.errors import TransportError

# Called with (guest page numbers, the exact bytes sent for them, one row per page): content
# trackers hash what the destination now holds.
OnSent = Callable[[np.ndarray, np.ndarray], None]


def page_numbers(pages: np.ndarray) -> np.ndarray:
    """`pages` as int64 page numbers, refused unless strictly increasing: sinks find regions
    by binary search and runs of pages by differences, so an unsorted or repeated page would
    otherwise go to the wrong place."""
    out = np.asarray(pages, np.int64)
    if out.ndim != 1 or (out.size > 1 and bool((np.diff(out) <= 0).any())):
        raise ValueError("pages to send must be a 1-D array of strictly increasing page numbers")
    return out


class SinkError(TransportError, RuntimeError):
    """A page sink cannot do its job (bad RAM file, unreachable or refusing receiver)."""


class PageSink(Protocol):
    page_size: int

    @property
    def max_bandwidth(self) -> float | None:
        """The cap on the page stream, bytes per second (None: uncapped)."""

    def set_max_bandwidth(self, rate: float | None) -> None:
        """Change the cap (None lifts it); takes effect from the next slice or frame."""

    async def send_round0(self, on_sent: OnSent | None = None) -> tuple[int, int]:
        """Make the destination equal to the source, assuming nothing about what it held:
        clear it, then send every page that is not all zero. Returns (pages, bytes) sent."""

    async def send_pages(self, pages: np.ndarray, on_sent: OnSent | None = None) -> int:
        """These guest pages (strictly increasing numbers), each as it is now; returns bytes moved.
        When it returns, the destination holds them."""

    async def verify(self) -> np.ndarray:
        """Guest page numbers whose bytes differ between source and destination; called while
        both are paused."""

    def close(self) -> None: ...
