"""Emulated device models, one per driver behaviour worth telling apart."""

from .base import DeviceModel
from .mlx5 import Mlx5Like
from .mtty import MttyLike, MttySample
from .nolog import NoDmaLogging
from .pds import PdsLike

__all__ = ["DeviceModel", "Mlx5Like", "MttyLike", "MttySample", "NoDmaLogging", "PdsLike"]
