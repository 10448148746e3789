"""The import graph between the package's rooms, and the check that no arrow points up.

`python tools/import_graph.py` prints each room's imports of other rooms; `--check` exits 1
naming every import a room may not make (ROOMS: a room imports only rooms of a lower rank);
`--dot` prints the graph for Graphviz. `tests/test_layout.py` runs the check.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "orchestrator"

#: Room -> rank, bottom up. The same table, with each room's job, is in docs/ARCHITECTURE.md.
ROOMS: dict[str, int] = {
    "uapi": 0,
    "dirty": 0,
    "native": 0,
    "encoding": 0,
    "vfio": 1,
    "emulated": 1,
    "writewatch": 1,
    "qemu": 1,
    "transport": 1,
    "trackers": 2,
    "migration": 3,
    "lab": 4,
    "control": 4,
    "experiments": 4,
    "app": 5,
    "__main__": 6,
}


def _room(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0]


def _targets(node: ast.AST) -> list[str]:
    """Rooms one import statement reaches: `orchestrator.room...`, `from orchestrator import room`."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "orchestrator" else [node.module]
    else:
        return []
    return [n.split(".")[1] for n in names if n.startswith("orchestrator.")]


def edges() -> dict[str, dict[str, set[str]]]:
    """room -> imported room -> the files that import it."""
    out: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for path in sorted(PACKAGE.rglob("*.py")):
        room = _room(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _targets(node):
                if target != room:
                    out[room][target].add(str(path.relative_to(PACKAGE.parent)))
    return out


def violations() -> list[str]:
    found = []
    rooms = {_room(p) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE}
    found += [f"{room}: a room the layout does not know" for room in sorted(rooms - set(ROOMS))]
    for room, targets in sorted(edges().items()):
        for target, files in sorted(targets.items()):
            if room not in ROOMS or target not in ROOMS or ROOMS[target] >= ROOMS[room]:
                found.append(f"{room} -> {target} points up or sideways ({', '.join(sorted(files))})")
    return found


def main(argv: list[str]) -> int:
    if "--check" in argv:
        bad = violations()
        print("\n".join(bad) if bad else "import graph: no arrow up or sideways")
        return 1 if bad else 0
    graph = edges()
    if "--dot" in argv:
        print("digraph rooms {\n  rankdir=BT;")
        for room, targets in sorted(graph.items()):
            for target in sorted(targets):
                print(f'  "{room}" -> "{target}";')
        print("}")
        return 0
    for room in sorted(ROOMS, key=lambda r: (-ROOMS[r], r)):
        print(f"{room:11s} -> {', '.join(sorted(graph.get(room, {}))) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
