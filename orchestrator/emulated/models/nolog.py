"""A migratable device whose driver registers no vfio_log_ops (hisi_acc, virtio, ...).

Every DMA-logging feature, PROBE included, is ENOTTY from the core; its DMA is visible only
to IOMMU dirty tracking.
"""

from __future__ import annotations

from orchestrator.emulated.models.base import DeviceModel


class NoDmaLogging(DeviceModel):
    has_log_ops = False
