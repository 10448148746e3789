"""Parser for the HMP `info mtree -f` text.

QMP has no command that says which guest-physical ranges map to which RAM region at which
offset; the flat view printed by `info mtree -f` is the only complete answer, so it is parsed
here, strictly enough that a format change fails loudly instead of yielding a wrong layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from orchestrator.qemu.errors import LayoutError

_VIEW = re.compile(r"^FlatView #\d+$")
_AS = re.compile(r'^ AS "(?P<name>[^"]*)", root: (?P<root>.*)$')
_ROOT = re.compile(r"^ Root memory region: (?P<root>.*)$")
_RANGE_START = re.compile(r"^\s+[0-9a-fA-F]+-[0-9a-fA-F]+ \(")
# QEMU 7.2 and 10.0 both print "(prio N, kind)" (10.0 lists the views in another order, which
# `system_view` does not depend on); a range without the priority parses too. An accelerator
# that tracks memory (KVM) appends its name once per address space, which is not part of the
# region name.
_RANGE = re.compile(
    r"^\s+(?P<start>[0-9a-fA-F]+)-(?P<last>[0-9a-fA-F]+)"
    r" \((?:prio -?\d+, )?(?P<nv>nv-)?(?P<kind>[a-z/]+)\): "
    r"(?P<name>.+?)(?: @(?P<offset>[0-9a-fA-F]+))?(?: [A-Z]+)*$"
)


@dataclass(frozen=True)
class FlatRange:
    """One rendered range: guest addresses [start, start+size) hit `region` at `offset`."""

    start: int
    size: int
    #: "ram", "rom" (also RAM mapped read-only), "romd", "ramd" or "i/o".
    kind: str
    region: str
    offset: int
    nonvolatile: bool


@dataclass(frozen=True)
class FlatView:
    address_spaces: tuple[str, ...]
    #: Name of the root memory region, or None for a view with nothing rendered.
    root: str | None
    ranges: tuple[FlatRange, ...]


def parse_flat_mtree(text: str) -> list[FlatView]:
    """All flat views in `info mtree -f` output, in printed order."""
    views: list[FlatView] = []
    spaces: list[str] = []
    root: str | None = None
    ranges: list[FlatRange] = []
    in_view = False

    def flush() -> None:
        if in_view:
            views.append(FlatView(tuple(spaces), root, tuple(ranges)))

    for lineno, line in enumerate(text.splitlines(), 1):
        if _VIEW.match(line):
            flush()
            spaces, root, ranges, in_view = [], None, [], True
        elif not in_view or not line.strip():
            continue
        elif m := _AS.match(line):
            spaces.append(m["name"])
        elif m := _ROOT.match(line):
            root = None if m["root"] == "(none)" else m["root"]
        elif _RANGE_START.match(line):
            ranges.append(_parse_range(line, lineno))
    flush()
    if not views:
        raise LayoutError(f"no flat view in 'info mtree -f' output: {text[:200]!r}")
    return views


def system_view(views: list[FlatView]) -> FlatView:
    """The view of the "memory" address space: what the CPUs and DMA see as guest-physical."""
    for view in views:
        if "memory" in view.address_spaces:
            return view
    raise LayoutError(
        "'info mtree -f' has no flat view for address space \"memory\"; "
        f"views cover {[v.address_spaces for v in views]}"
    )


def _parse_range(line: str, lineno: int) -> FlatRange:
    m = _RANGE.match(line)
    if m is None:
        raise LayoutError(f"'info mtree -f' line {lineno} is not a range: {line.strip()!r}")
    start, last = int(m["start"], 16), int(m["last"], 16)
    if last < start:
        raise LayoutError(f"'info mtree -f' line {lineno} ends before it starts: {line.strip()!r}")
    return FlatRange(
        start=start,
        size=last - start + 1,
        kind=m["kind"],
        region=m["name"],
        offset=int(m["offset"], 16) if m["offset"] else 0,
        nonvolatile=m["nv"] is not None,
    )
