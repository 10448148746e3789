"""The kernel ABI only: VFIO and IOMMUFD constants, request numbers and struct layouts.

`from orchestrator import uapi` gives every name under its kernel spelling.
"""

from .iommufd import *  # noqa: F401,F403
from .ioctl import _IO  # noqa: F401
from .vfio import *  # noqa: F401,F403
from .vfio import _Le  # noqa: F401
