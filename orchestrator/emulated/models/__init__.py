"""Emulated device models, one per driver behaviour worth telling apart."""

from orchestrator.emulated.models.base import DeviceModel
from orchestrator.emulated.models.mlx5 import Mlx5Like
from orchestrator.emulated.models.mtty import MttyLike, MttySample
from orchestrator.emulated.models.nolog import NoDmaLogging
from orchestrator.emulated.models.pds import PdsLike

__all__ = ["DeviceModel", "Mlx5Like", "MttyLike", "MttySample", "NoDmaLogging", "PdsLike"]
