"""mtty-like device (samples/vfio-mdev/mtty.c): full migration, no-op DMA logging.

Its log_ops accept everything and report nothing, because the device does no DMA: START echoes
the page size, a second START is fine, REPORT sets no bits. Read at the end of the saving
stream returns 0 bytes (no ENOMSG).

`MttyLike` carries any device state in the generic record stream, with a snapshot in PRE_COPY
so the precopy path has data to move: a choice of the model, not mtty's. `MttySample` is the
sample itself, stream included: nr_ports serial port records of 36 bytes, a header-only
PRE_COPY, stop-copy length 24 + 36 * nr_ports (the real-kernel lab checks it against mtty-2).
"""

from __future__ import annotations

from typing import Any

from orchestrator.emulated.iova_bitmap import IovaBitmap
from orchestrator.emulated.mig_stream import SERIAL_PORT_SIZE, MttyStream
from orchestrator.emulated.models.base import DeviceModel
from orchestrator.emulated.ranges import Node
from orchestrator.uapi import VFIO_MIGRATION_P2P, VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY


class MttyLike(DeviceModel):
    strict_log_state = False
    vfio_pci = False

    def __init__(
        self,
        *,
        migration_flags: int = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P | VFIO_MIGRATION_PRE_COPY,
        **kwargs: Any,
    ) -> None:
        super().__init__(migration_flags=migration_flags, **kwargs)

    def _start(self, nodes: list[Node], page_size: int) -> tuple[int, list[Node]]:
        return page_size, nodes

    def _read_and_clear(self, iova: int, length: int, bitmap: IovaBitmap) -> None:
        return None


class MttySample(MttyLike):
    """mtty as the kernel ships it (`mtty-<nr_ports>`), its migration stream included."""

    stream = MttyStream()

    def __init__(self, *, nr_ports: int = 2, **kwargs: Any) -> None:
        kwargs.setdefault("device_data", bytes(SERIAL_PORT_SIZE * nr_ports))
        super().__init__(**kwargs)
