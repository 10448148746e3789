"""Live-migration tests with real QEMU (TCG) and the fixture guest."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from orchestrator.lab.launcher import default_qemu

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session", autouse=True)
def built_fixtures():
    if shutil.which(default_qemu()) is None:
        pytest.skip(f"{default_qemu()} is not installed (make fixtures installs it)")
    subprocess.run(["make", "-s", "fixtures"], cwd=REPO, check=True)
