"""Linux ioctl request encoding (asm-generic, as on x86_64)."""

from __future__ import annotations

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS


def _IO(type_: int | str, nr: int) -> int:  # noqa: N802 - the kernel's macro name
    """`_IO(type, nr)`: no direction or size bits, as every VFIO/IOMMUFD request uses."""
    t = ord(type_) if isinstance(type_, str) else type_
    return (t << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT)
