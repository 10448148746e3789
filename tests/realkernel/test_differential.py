"""Every case of cases.py against the emulated kernel (here) and the real one (in the lab's
VM), with one assertion: the outcome Linux 6.12 gives."""

from __future__ import annotations

import pytest

from .cases import CASES, Case
from .lab import EmulatedLab, RealLab

by_name = pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])


@by_name
def test_emulated(case: Case, emulated: EmulatedLab) -> None:
    assert case.run(emulated) == case.expect


@pytest.mark.realkernel
@by_name
def test_real(case: Case, real: RealLab) -> None:
    assert case.run(real) == case.expect
