"""The per-user build cache: keys follow the sources, a build happens once and whole, and a
host without the tools gets told which Debian packages to install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.native import builds
from orchestrator.native.builds import Artifact, BuildError

ROOT = Path(__file__).resolve().parent.parent
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed (make fixtures installs it)")

OBJECT = Artifact(
    "probe.o", ("probe.c",), (("gcc", "-c", "{pkg}/probe.c", "-o", "{out}"),), tools=("gcc",), packages=("gcc",)
)


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A package directory holding probe.c, and a private cache."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "probe.c").write_text("int probe(void) { return 1; }\n")
    monkeypatch.setattr(builds, "PACKAGE", pkg)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return pkg


def test_cache_root_follows_xdg_and_ignores_a_relative_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert builds.cache_root() == tmp_path / "orchestrator"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for unusable in ("", "relative/cache"):
        monkeypatch.setenv("XDG_CACHE_HOME", unusable)
        assert builds.cache_root() == tmp_path / "home" / ".cache" / "orchestrator"


def test_key_changes_with_a_source_and_with_the_commands(package: Path) -> None:
    before = OBJECT.key()
    assert OBJECT.key() == before
    (package / "probe.c").write_text("int probe(void) { return 2; }\n")
    edited = OBJECT.key()
    assert edited != before
    assert (
        Artifact(OBJECT.name, OBJECT.sources, (("gcc", "-O2", "-c", "{pkg}/probe.c", "-o", "{out}"),)).key() != edited
    )


def test_key_is_the_same_for_the_same_sources_anywhere(
    package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    here = OBJECT.key()
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(package, elsewhere)
    monkeypatch.setattr(builds, "PACKAGE", elsewhere)
    assert OBJECT.key() == here


@needs_gcc
def test_builds_once_into_the_entry_of_its_key(package: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = builds.ensure(OBJECT)
    assert out == builds.location(OBJECT) == builds.cache_root() / OBJECT.key() / "probe.o"
    assert out.read_bytes()[:4] == b"\x7fELF"
    assert capsys.readouterr().err.count("building probe.o") == 1
    built_at = out.stat().st_mtime_ns
    assert builds.ensure(OBJECT) == out
    assert out.stat().st_mtime_ns == built_at and "building" not in capsys.readouterr().err
    assert sorted(p.name for p in out.parent.iterdir()) == [".lock", "probe.o"]  # no scratch left


@needs_gcc
def test_an_edited_source_builds_a_new_entry(package: Path) -> None:
    first = builds.ensure(OBJECT)
    (package / "probe.c").write_text("int probe(void) { return 2; }\n")
    second = builds.ensure(OBJECT)
    assert second.parent != first.parent and first.exists() and second.exists()


@needs_gcc
def test_two_processes_build_it_once(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "orchestrator.native.builds", "guest.elf"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sum(err.count("building guest.elf") for _, err in outputs) == 1
    paths = {out.split()[1] for out, _ in outputs}
    assert paths == {str(tmp_path / "orchestrator" / builds.GUEST.key() / "guest.elf")}


def test_a_missing_tool_names_the_packages(package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(BuildError, match=r"gcc not found; it needs the Debian packages gcc \(apt-get install gcc\)"):
        builds.ensure(OBJECT)
    assert not builds.location(OBJECT).exists()


@needs_gcc
def test_a_failed_command_reports_its_errors_and_leaves_nothing(package: Path) -> None:
    (package / "probe.c").write_text("int probe(void) { return }\n")
    with pytest.raises(BuildError, match=r"(?s)gcc -c .*probe\.c.* exited with status 1:.*error.*apt-get install gcc"):
        builds.ensure(OBJECT)
    out = builds.location(OBJECT)
    assert [p.name for p in out.parent.iterdir()] == [".lock"]


def test_the_command_names_unknown_artifacts() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "orchestrator.native.builds", "kernel.bin"], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 2
    assert "unknown artifact kernel.bin; choose from guest.elf, libdirtylog.so, fwcfg.bin" in run.stderr
