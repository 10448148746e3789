"""Typed failures of the VFIO/IOMMUFD client.

The kernel answers with a bare errno; what it means depends on the operation. These classes
carry both, so callers branch on meaning (not supported, too many ranges, tracker lost) and
logs still show the raw errno.
"""

from __future__ import annotations

import errno as _errno
import os


class VfioClientError(Exception):
    """Root of the VFIO client's errors: bad input it refused, or a kernel call that failed."""


class VfioUsageError(VfioClientError, ValueError):
    """Bad input caught by the client before any ioctl was issued."""


class VfioError(VfioClientError):
    """An ioctl/read/write on a VFIO or IOMMUFD fd failed."""

    def __init__(self, op: str, err: int, detail: str = "") -> None:
        self.op = op
        self.errno = err
        self.detail = detail
        name = _errno.errorcode.get(err, str(err))
        msg = f"{op} failed: {name} ({os.strerror(err)})"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class NotSupported(VfioError):
    """ENOTTY / EOPNOTSUPP: the device or driver does not offer this."""


class TooManyRanges(VfioError):
    """E2BIG: more DMA-logging ranges than the kernel accepts."""


class InvalidArgument(VfioError):
    """EINVAL: a field was wrong, or the call is not valid in the device's current state."""


class RangeOverflow(VfioError):
    """EOVERFLOW: iova + length wrapped."""


class AlreadyExists(VfioError):
    """EEXIST: the device already tracks regions someone else set up."""


class TrackerLost(VfioError):
    """EIO / ENOTCONN: the device's dirty log is corrupted or the device is gone."""


class EndOfStream(VfioError):
    """ENOMSG from a migration data read: the temporary end of precopy data."""


_BY_ERRNO: dict[int, type[VfioError]] = {
    _errno.ENOTTY: NotSupported,
    _errno.EOPNOTSUPP: NotSupported,
    _errno.E2BIG: TooManyRanges,
    _errno.EINVAL: InvalidArgument,
    _errno.EOVERFLOW: RangeOverflow,
    _errno.EEXIST: AlreadyExists,
    _errno.EIO: TrackerLost,
    _errno.ENOTCONN: TrackerLost,
    _errno.ENOMSG: EndOfStream,
}


def from_oserror(op: str, exc: OSError, detail: str = "") -> VfioError:
    err = exc.errno if exc.errno is not None else _errno.EIO
    return _BY_ERRNO.get(err, VfioError)(op, err, detail)
