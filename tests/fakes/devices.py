"""A device's migration between two emulated devices, its state changes in the journal."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.emulated import EmulatedKernel, Mlx5Like
from orchestrator.migration.devices import DeviceMigration
from orchestrator.vfio import State, VfioDevice

from .qemu import FakeHost


class Journaled:
    """A `VfioDevice` whose state changes are journal steps ("dev.src: STOP_COPY")."""

    def __init__(self, device: VfioDevice, side: str, host: FakeHost) -> None:
        self._device, self._side, self._host = device, side, host

    def __getattr__(self, name: str):
        return getattr(self._device, name)

    def set_state(self, state: State | int) -> int | None:
        self._host.step(f"{self._device.name}.{self._side}: {State(state).name.removeprefix('VFIO_DEVICE_STATE_')}")
        return self._device.set_state(state)


@dataclass
class FakeDevice:
    migration: DeviceMigration
    src: Mlx5Like  # the models: their state, data and fault injection (`fail_transition`)
    dst: Mlx5Like

    @classmethod
    def pair(cls, host: FakeHost, name: str = "dev") -> FakeDevice:
        models = Mlx5Like(device_data=f"{name} state".encode().ljust(64, b"!")), Mlx5Like()
        ends = []
        for side, model in zip(("src", "dst"), models, strict=False):
            kernel = EmulatedKernel()
            ends.append(Journaled(VfioDevice(kernel.open_device(model), kernel, name=name), side, host))
        return cls(DeviceMigration(name, *ends), *models)

    def fail(self, step: str) -> None:
        """Fail the device's next transition named like its journal steps: "dst:RESUMING"."""
        side, state = step.split(":")
        getattr(self, side).fail_transition(State[f"VFIO_DEVICE_STATE_{state}"])
