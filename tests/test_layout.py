"""The package layout is the architecture: no room imports a room at or above its rank."""

import importlib.util
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "import_graph.py"


def _tool():
    spec = importlib.util.spec_from_file_location("import_graph", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_points_up_or_sideways():
    assert _tool().violations() == []


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """Negative control: a copy of a low room that imports the app is reported."""
    tool = _tool()
    pkg = tmp_path / "orchestrator"
    (pkg / "dirty").mkdir(parents=True)
    (pkg / "app").mkdir()
    (pkg / "dirty" / "bitmap.py").write_text("from orchestrator.app import cli\n")
    (pkg / "app" / "cli.py").write_text("from orchestrator import dirty\n")
    monkeypatch.setattr(tool, "PACKAGE", pkg)
    assert tool.violations() == ["dirty -> app points up or sideways (orchestrator/dirty/bitmap.py)"]


def test_every_room_is_in_the_architecture_document():
    doc = (TOOL.parent.parent / "docs" / "ARCHITECTURE.md").read_text()
    missing = [room for room in _tool().ROOMS if room != "__main__" and f"| `{room}/` |" not in doc]
    assert missing == []
