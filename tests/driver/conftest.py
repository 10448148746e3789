from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from tests.fakes.rig import Rig


@pytest.fixture
async def make_rig() -> AsyncIterator[Callable[..., Rig]]:
    """`Rig.build`, with QEMU's own work still pending ended after the test."""
    rigs: list[Rig] = []

    def make(**kwargs) -> Rig:
        rigs.append(Rig.build(**kwargs))
        return rigs[-1]

    yield make
    for rig in rigs:
        await rig.close()
