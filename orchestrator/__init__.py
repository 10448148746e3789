"""orchestrator: plays QEMU's side of VFIO device dirty tracking during live migration."""

__version__ = "0.1.0"
