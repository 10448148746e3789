"""Emulated VFIO devices attached to the demo's VMs: models, DMA engines and fault plans.

Each device has a model on the source host's emulated kernel and a twin on the destination's.
The source device DMAs into its slice of the guest's DMA window from the start; the twin
starts DMA-ing into the destination's RAM only once migration v2 has loaded its state and
set it RUNNING.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.emulated import EmulatedKernel, Fault, Mlx5Like, NoDmaLogging, PdsLike
from orchestrator.emulated.dma import PAGE, DmaEngine
from orchestrator.emulated.models.base import DeviceModel
from orchestrator.lab.errors import LabError
from orchestrator.migration.devices import DeviceMigration
from orchestrator.migration.engine import RoundRecord
from orchestrator.trackers import Tracker, VfioDmaLogTracker
from orchestrator.vfio import IovaRange, State, VfioDevice

MiB = 1 << 20
NOLOG_WINDOW = MiB  # a device without DMA logging reaches only a small window

KINDS: dict[str, Callable[[], DeviceModel]] = {
    "mlx5": Mlx5Like,
    "mlx5-1r2m": lambda: Mlx5Like(max_ranges=1, min_page_size=2 * MiB, max_page_size=2 * MiB),
    "pds": PdsLike,
    "nolog": NoDmaLogging,
}

START_FAULTS = {"start-e2big": errno.E2BIG, "start-eopnotsupp": errno.EOPNOTSUPP}
REPORT_FAULTS = {
    "report-eio-once": Fault.REPORT_EIO_ONCE,
    "report-eio-sticky": Fault.REPORT_EIO_STICKY,
    "detach": Fault.DETACH,
    "report-hang": Fault.REPORT_HANG,
}
FAULTS = sorted([*START_FAULTS, *REPORT_FAULTS, "state-transition-error"])


@dataclass(frozen=True)
class FaultPlan:
    """`FAULT[@DEVICE][:ROUND]`: hit DEVICE (default: the first) just before round ROUND's
    collect (default 1; 0 is before tracking starts)."""

    fault: str
    device: str | None
    round: int

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        rest, _, rnd = text.partition(":")
        fault, _, device = rest.partition("@")
        if fault not in FAULTS:
            raise LabError(f"unknown fault {fault!r}; choose from {', '.join(FAULTS)}")
        try:
            round_ = int(rnd) if rnd else 1
        except ValueError:
            raise LabError(f"fault {text!r}: round must be a whole number") from None
        if round_ < 0:
            raise LabError(f"fault {text!r}: round must be >= 0")
        return cls(fault, device or None, round_)


def device_names(kinds: list[str], faults: Sequence[FaultPlan] = ()) -> list[str]:
    """The names a fleet of `kinds` will have; raises ValueError for an unknown kind or a
    fault aimed at a device the fleet will not have (checked before anything is launched)."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise LabError(f"unknown device kinds {unknown}; choose from {', '.join(KINDS)}")
    names = [f"{kind}-{i}" for i, kind in enumerate(kinds)]
    for plan in faults:
        if plan.device is not None and plan.device not in names:
            raise LabError(f"fault {plan.fault} is aimed at {plan.device!r}; devices will be {', '.join(names)}")
    return names


@dataclass
class EmulatedDevice:
    name: str
    kind: str
    window: IovaRange
    src_model: DeviceModel
    dst_model: DeviceModel
    src: VfioDevice
    dst: VfioDevice
    engine: DmaEngine
    dst_engine: DmaEngine | None = None
    resumed_state: bytes | None = None  # what migration v2 delivered, before the twin ran


@dataclass
class Fleet:
    devices: list[EmulatedDevice]
    src_kernel: EmulatedKernel
    dst_kernel: EmulatedKernel
    dst_ram: str
    rate: int
    faults: list[FaultPlan] = field(default_factory=list)
    hang_timeout: float = 3.0

    @classmethod
    def create(cls, kinds: list[str], src_ram: Path, dst_ram: Path, dma: tuple[int, int], rate: int = 4000) -> Fleet:
        names = device_names(kinds)
        src_k, dst_k = EmulatedKernel(), EmulatedKernel()
        share = (dma[1] // len(kinds)) // (2 * MiB) * (2 * MiB)
        if share < 2 * MiB:
            raise LabError(f"DMA window of {dma[1] >> 20} MiB is too small for {len(kinds)} devices")
        fleet = cls([], src_k, dst_k, str(dst_ram), rate)
        for i, kind in enumerate(kinds):
            length = min(share, NOLOG_WINDOW) if kind == "nolog" else share
            window = IovaRange(dma[0] + i * share, length)
            sm, dm = KINDS[kind](), KINDS[kind]()
            name = names[i]
            engine = DmaEngine(sm, str(src_ram), window.iova, window.length // PAGE, rate)
            fleet.devices.append(
                EmulatedDevice(
                    name,
                    kind,
                    window,
                    sm,
                    dm,
                    VfioDevice(src_k.open_device(sm), src_k, name=name),
                    VfioDevice(dst_k.open_device(dm), dst_k, name=name),
                    engine,
                )
            )
        return fleet

    def start(self) -> None:
        self.apply_faults(0)
        for d in self.devices:
            d.engine.start()

    def trackers(self) -> list[Tracker]:
        """One DMA-log tracker per device; a device that cannot log is covered for what it
        can reach (its window), which the tracker then marks dirty every round."""
        return [
            VfioDmaLogTracker(d.src, reach=[d.window] if d.kind == "nolog" else None, name=d.name) for d in self.devices
        ]

    def migrations(self) -> list[DeviceMigration]:
        return [DeviceMigration(d.name, d.src, d.dst, self._runner(d)) for d in self.devices]

    def _runner(self, d: EmulatedDevice) -> Callable[[], None]:
        def run() -> None:
            d.resumed_state = d.dst_model.device_data
            d.dst_engine = DmaEngine(
                d.dst_model, self.dst_ram, d.window.iova, d.window.length // PAGE, self.rate
            ).start()

        return run

    def on_round(self, rec: RoundRecord) -> None:
        """Round hook: faults planned for the next round go in now."""
        self.apply_faults(rec.round + 1)

    def apply_faults(self, round_: int) -> None:
        for plan in (p for p in self.faults if p.round == round_):
            d = self.device(plan.device)
            m = d.src_model
            if plan.fault in REPORT_FAULTS:
                m.inject(REPORT_FAULTS[plan.fault], hang_timeout=self.hang_timeout)
            elif plan.fault in START_FAULTS:
                # START only runs at start-up and on a restart: after round 0 a failed report
                # forces the restart whose STARTs then fail.
                m.fail_start(START_FAULTS[plan.fault], count=2)
                if round_ > 0:
                    m.inject(Fault.REPORT_EIO_ONCE)
            else:
                m.fail_transition(State.VFIO_DEVICE_STATE_STOP_COPY)

    def device(self, name: str | None) -> EmulatedDevice:
        if name is None:
            return self.devices[0]
        for d in self.devices:
            if d.name == name:
                return d
        raise LabError(f"no device {name!r}; devices are {', '.join(d.name for d in self.devices)}")

    def check_destination(self) -> dict[str, list[int]]:
        """Quiesce the destination twins and check each window against its engine's state:
        device DMA went on from the migrated state, into the destination's RAM."""
        out: dict[str, list[int]] = {}
        for d in self.devices:
            if d.dst_engine is None:
                continue
            migration = d.dst_model.migration
            if migration is None:
                raise RuntimeError(f"{d.name}: the destination twin has no migration driver")
            migration.set_state(State.VFIO_DEVICE_STATE_STOP)
            out[d.name] = d.dst_engine.check()
        return out

    def close(self) -> None:
        for d in self.devices:
            d.src_model.release_hang()
            for engine in (d.engine, d.dst_engine):
                if engine is not None:
                    engine.stop()
