"""The Linux guest tests build the guest through its make target (a download of about
100 MB the first time, so not part of `make fixtures`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def linux_guest() -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (make fixtures installs it)")
    subprocess.run(["make", "-s", "linux-guest"], cwd=REPO, check=True)
