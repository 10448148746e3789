"""Injectable device faults, modelled on how real trackers fail.

REPORT_EIO_ONCE is one failed report: the firmware read and cleared the queried part of its log
before the error, so those bits are gone ("If any error is returned userspace should assume that
the dirty log is corrupted"). REPORT_EIO_STICKY is mlx5's tracker `is_err` (set by QP/CQ error
events, cleared only by a new tracker, i.e. STOP then START). DETACH is mlx5's VF disable
(MLX5_PF_NOTIFY_DISABLE_VF): the tracker and the data fds are torn down and `mdev_detach` is set.
REPORT_HANG is firmware that never answers while the driver waits under its state mutex, which
the client must survive with a watchdog.
"""

from __future__ import annotations

import enum
import errno
import threading
from collections import deque
from dataclasses import dataclass, field

from orchestrator.emulated.errors import kernel_error


class Fault(enum.Enum):
    REPORT_EIO_ONCE = "report_eio_once"
    REPORT_EIO_STICKY = "report_eio_sticky"
    DETACH = "detach"
    REPORT_HANG = "report_hang"


@dataclass(frozen=True)
class _Hang:
    released: threading.Event
    timeout: float


@dataclass
class FaultState:
    """`default_hang_timeout` bounds a REPORT_HANG injected without its own timeout."""

    default_hang_timeout: float = 30.0
    detached: bool = False
    sticky_eio: bool = False
    eio_once: int = 0
    start_failures: deque[int] = field(default_factory=deque)
    transition_failures: dict[int, int] = field(default_factory=dict)
    _armed: _Hang | None = None
    _hanging: _Hang | None = None

    @property
    def report_hanging(self) -> bool:
        return self._hanging is not None

    def inject(self, fault: Fault, hang_timeout: float | None = None) -> None:
        """Arm a report fault; DETACH's teardown belongs to the device (DeviceModel.inject)."""
        if fault is Fault.REPORT_EIO_ONCE:
            self.eio_once += 1
        elif fault is Fault.REPORT_EIO_STICKY:
            self.sticky_eio = True
        elif fault is Fault.REPORT_HANG:
            timeout = self.default_hang_timeout if hang_timeout is None else hang_timeout
            self._armed = _Hang(threading.Event(), timeout)
        else:
            raise ValueError(f"{fault} is not a report fault")

    def release_hang(self) -> None:
        """Release the blocked REPORT, or disarm the next one if none is blocked yet."""
        for hang in (self._armed, self._hanging):
            if hang is not None:
                hang.released.set()

    def hang_if_armed(self) -> None:
        """Block an armed REPORT until released or timed out, then fail it with EIO.

        The caller holds the device's state mutex, as mlx5 does while it waits for the firmware
        (wait_for_completion, no timeout): START, STOP and state transitions queue behind it.
        """
        hang, self._armed = self._armed, None
        if hang is None:
            return
        self._hanging = hang
        try:
            hang.released.wait(hang.timeout)
        finally:
            self._hanging = None
        raise kernel_error(errno.EIO)

    def take_eio_once(self) -> bool:
        if not self.eio_once:
            return False
        self.eio_once -= 1
        return True

    def check_attached(self) -> None:
        if self.detached:
            raise kernel_error(errno.ENOTCONN)

    def check_sticky(self) -> None:
        if self.sticky_eio:
            raise kernel_error(errno.EIO)

    def check_start(self) -> None:
        if self.start_failures:
            raise kernel_error(self.start_failures.popleft())

    def check_transition(self, state: int) -> None:
        code = self.transition_failures.pop(state, None)
        if code is not None:
            raise kernel_error(code)
