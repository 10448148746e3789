"""The kernel ABI only: VFIO and IOMMUFD constants, request numbers and struct layouts.

`from orchestrator import uapi` gives every name under its kernel spelling.
"""

from orchestrator.uapi.ioctl import _IO as _IO
from orchestrator.uapi.iommufd import *  # noqa: F403
from orchestrator.uapi.vfio import *  # noqa: F403
from orchestrator.uapi.vfio import _Le as _Le
