import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def built() -> None:
    """The fixtures (`make fixtures`: the guest, its fw_cfg file, the plugin), built once."""
    from fixtures.guest.vm import GUEST_ELF
    from orchestrator.workload import FWCFG_FILE

    subprocess.run(["make", "-s", "fixtures"], cwd=ROOT, check=True)
    assert GUEST_ELF.exists() and FWCFG_FILE.exists()
