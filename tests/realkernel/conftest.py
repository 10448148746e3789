"""The lab's two sides. `realkernel` tests run only inside the lab's VM (the runner sets
ORCHESTRATOR_REALKERNEL=1 there); anywhere else they are deselected, not skipped, so a plain
`pytest` stays green and the VM's count of passed tests means what it says."""

from __future__ import annotations

import os

import pytest

from .lab import EmulatedLab, real_lab

IN_LAB = os.environ.get("ORCHESTRATOR_REALKERNEL") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IN_LAB:
        return
    outside = [item for item in items if item.get_closest_marker("realkernel")]
    if outside:
        config.hook.pytest_deselected(items=outside)
        items[:] = [item for item in items if not item.get_closest_marker("realkernel")]


@pytest.fixture
def emulated() -> EmulatedLab:
    return EmulatedLab()


@pytest.fixture
def real():
    with real_lab() as lab:
        yield lab
