"""The built wheel on its own: installed into a fresh venv, its `orchestrator` command runs the
demo from `/` with a private cache, building the guest (and the plugin, and the fw_cfg file)
from the sources it ships. The wheel is built from a copy of the package's files that is
deleted before the install, so nothing of the source tree can be used, and the installed
package is left as pip put it: every build lands in the cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.app.cli import EXIT_BAD_INPUT
from orchestrator.native import builds

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None and not os.environ.get("ORCHESTRATOR_QEMU"),
        reason="qemu-system-x86_64 is not installed (make fixtures installs it)",
    ),
]

ROOT = Path(__file__).resolve().parent.parent
#: What the wheel is built from (pyproject.toml's readme is README.md).
WHEEL_INPUTS = ("pyproject.toml", "README.md", "orchestrator")


@dataclass(frozen=True)
class Install:
    command: Path  # the venv's `orchestrator` console script
    package: Path  # the installed package directory


def _files(package: Path) -> dict[str, int]:
    """Every file of an installed package but bytecode, with its modification time."""
    return {
        str(p.relative_to(package)): p.stat().st_mtime_ns
        for p in package.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Install:
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in WHEEL_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(work / "dist"), str(src)],
        check=True,
        cwd=work,
    )
    shutil.rmtree(src)
    [wheel] = (work / "dist").glob("orchestrator-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", str(wheel)], check=True, cwd=work)
    [package] = (venv / "lib").glob("python3*/site-packages/orchestrator")
    return Install(venv / "bin" / "orchestrator", package)


def demo(install: Install, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`orchestrator demo ARGS` run from `/` with `cache` as XDG_CACHE_HOME and no Python
    path leading back to the source tree."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(install.command), "demo", *args],
        cwd="/",
        env={**env, "XDG_CACHE_HOME": str(cache)},
        capture_output=True,
        text=True,
        timeout=240,
    )


def built(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "orchestrator").glob("*/*") if not p.name.startswith("."))


@pytest.mark.parametrize(
    ("args", "artifacts"),
    [
        ((), ["guest.elf"]),
        (("--tracker", "vcpu", "--devices", "none"), ["guest.elf", "libdirtylog.so"]),
        (("--workload", "fwcfg", "--devices", "none"), ["fwcfg.bin", "guest.elf"]),
    ],
    ids=["default", "vcpu-tracker", "fwcfg-workload"],
)
def test_the_installed_demo_builds_what_it_runs_and_verifies(
    installed: Install, tmp_path: Path, args: tuple[str, ...], artifacts: list[str]
) -> None:
    before = _files(installed.package)
    run = demo(installed, tmp_path / "cache", *args)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "verified:   yes" in run.stdout
    assert built(tmp_path / "cache") == artifacts
    for name in artifacts:
        assert f"building {name} in {tmp_path / 'cache' / 'orchestrator'}" in run.stderr
    assert _files(installed.package) == before


def test_the_installed_demo_reuses_its_cache(installed: Install, tmp_path: Path) -> None:
    assert demo(installed, tmp_path / "cache", "--devices", "none").returncode == 0
    again = demo(installed, tmp_path / "cache", "--devices", "none")
    assert again.returncode == 0 and "verified:   yes" in again.stdout
    assert "building" not in again.stderr
    # The same sources as this checkout: the same cache key.
    assert (tmp_path / "cache" / "orchestrator" / builds.GUEST.key() / "guest.elf").exists()


def test_the_installed_demo_says_where_the_linux_guest_comes_from(installed: Install, tmp_path: Path) -> None:
    run = demo(installed, tmp_path / "cache", "--workload", "linux")
    assert run.returncode == EXIT_BAD_INPUT
    assert "run `make linux-guest` in a source checkout" in run.stderr
    assert "an installed package runs the fixture guest's workloads only" in run.stderr
