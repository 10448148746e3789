import pytest

from orchestrator.emulated import EmulatedKernel, Mlx5Like, MttyLike


@pytest.fixture
def kernel() -> EmulatedKernel:
    return EmulatedKernel(page_size=4096)


@pytest.fixture
def mtty(kernel):
    """(fd, model) for a device whose log_ops accept everything: the core's checks alone."""
    model = MttyLike()
    return kernel.open_device(model), model


@pytest.fixture
def mlx5(kernel):
    model = Mlx5Like(max_ranges=4)
    return kernel.open_device(model), model
