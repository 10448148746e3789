"""The runner's verdict on a VM run: it passes only a complete, green, skip-free run."""

from __future__ import annotations

from pathlib import Path

import pytest

from .runner import LabError, check

GOOD = "RK up\n...\n80 passed in 40.0s\nRK exit 0\n"


def junit(tmp_path: Path, tests: int = 80, failures: int = 0, skipped: int = 0) -> Path:
    path = tmp_path / "junit.xml"
    path.write_text(
        f'<testsuites><testsuite name="pytest" tests="{tests}" failures="{failures}" errors="0" '
        f'skipped="{skipped}"/></testsuites>'
    )
    return path


def test_a_complete_green_run_passes(tmp_path):
    assert check(GOOD, 80, junit(tmp_path)).passed == 80


@pytest.mark.parametrize(
    "console, results, expected, why",
    [
        ("", {}, 80, "did not come up"),
        ("RK up\nRK E 9p mount of the host root\n", {}, 80, "setup failed: 9p mount"),
        ("RK up\nKernel panic - not syncing\n", {}, 80, "did not finish"),
        ("RK up\nRK exit 0\n", None, 80, "wrote no"),
        ("RK up\nRK exit 1\n", {"failures": 2}, 80, "tests failed"),
        (GOOD, {"skipped": 1}, 80, "skipped"),
        (GOOD, {"tests": 79}, 80, "passed 79"),
        (GOOD + "RK K WARNING: CPU: 0 PID: 1 at drivers/vfio/vfio_main.c:100\n", {}, 80, "kernel reported"),
    ],
)
def test_every_failure_is_loud(tmp_path, console, results, expected, why):
    path = tmp_path / "absent.xml" if results is None else junit(tmp_path, **results)
    with pytest.raises(LabError, match=why):
        check(console, expected, path)
