import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def built() -> None:
    """The fixtures (`make fixtures`: the guest, its fw_cfg file, the plugin), built once."""
    from fixtures.guest.vm import GUEST_ELF
    from orchestrator.lab.workload import FWCFG_FILE

    subprocess.run(["make", "-s", "fixtures"], cwd=ROOT, check=True)
    assert GUEST_ELF.exists() and FWCFG_FILE.exists()


@pytest.fixture(scope="session")
def linux_guest() -> None:
    """The Linux guest, built through its make target (a download of about 100 MB the first
    time, so not part of `make fixtures`)."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (make fixtures installs it)")
    subprocess.run(["make", "-s", "linux-guest"], cwd=ROOT, check=True)
