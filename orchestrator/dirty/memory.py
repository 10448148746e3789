"""Guest memory layout: which guest-physical ranges are RAM, and where their bytes live.

Without a vIOMMU a device's IOVA space is the guest-physical space, so the same ranges are
what trackers are asked to cover and what the bitmap indexes.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.dirty.ranges import IovaRange, normalize


@dataclass(frozen=True)
class RamRegion:
    """`length` bytes of guest RAM at guest-physical `gpa`, stored at `offset` in `path`."""

    gpa: int
    length: int
    path: str | None = None
    offset: int = 0

    @property
    def end(self) -> int:
        return self.gpa + self.length


@dataclass(frozen=True)
class MemoryLayout:
    regions: tuple[RamRegion, ...]
    page_size: int = 4096

    def __post_init__(self) -> None:
        if not self.regions:
            raise ValueError("a memory layout needs at least one RAM region")
        for r in self.regions:
            if r.gpa < 0 or r.length <= 0 or r.gpa % self.page_size or r.length % self.page_size:
                raise ValueError(
                    f"RAM region {r.gpa:#x}+{r.length:#x} is not a non-empty multiple of the {self.page_size:#x} page"
                )

    @classmethod
    def flat(cls, size: int, page_size: int = 4096, path: str | None = None) -> MemoryLayout:
        """One region at guest-physical 0: small guests and tests."""
        return cls((RamRegion(0, size, path),), page_size)

    @property
    def npages(self) -> int:
        """Bitmap size: every page up to the highest RAM byte."""
        return max(r.end for r in self.regions) // self.page_size

    def ranges(self) -> list[IovaRange]:
        return normalize([IovaRange(r.gpa, r.length) for r in self.regions], self.page_size)
