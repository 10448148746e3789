"""Injectable device faults, modelled on how real trackers fail.

REPORT_EIO_STICKY is mlx5's tracker `is_err` (set by QP/CQ error events, cleared only by a new
tracker, i.e. STOP then START); DETACH is mlx5's `mdev_detach` (VF disabled under us);
REPORT_HANG is firmware that never answers, which the client must survive with a watchdog.
"""

from __future__ import annotations

import enum
import errno
import threading
from collections import deque
from dataclasses import dataclass, field

from .errors import kernel_error


class Fault(enum.Enum):
    REPORT_EIO_ONCE = "report_eio_once"
    REPORT_EIO_STICKY = "report_eio_sticky"
    DETACH = "detach"
    REPORT_HANG = "report_hang"


@dataclass
class FaultState:
    hang_timeout: float = 30.0
    detached: bool = False
    sticky_eio: bool = False
    eio_once: int = 0
    start_failures: deque[int] = field(default_factory=deque)
    transition_failures: dict[int, int] = field(default_factory=dict)
    _hang: threading.Event | None = None
    _hang_active: threading.Event | None = None
    _hang_timeout: float = 0.0
    report_hanging: bool = False

    def inject(self, fault: Fault, hang_timeout: float | None = None) -> None:
        if fault is Fault.REPORT_EIO_ONCE:
            self.eio_once += 1
        elif fault is Fault.REPORT_EIO_STICKY:
            self.sticky_eio = True
        elif fault is Fault.DETACH:
            self.detached = True
        else:
            self._hang = threading.Event()
            self._hang_timeout = self.hang_timeout if hang_timeout is None else hang_timeout

    def release_hang(self) -> None:
        """Release the blocked REPORT, or disarm the next one if none is blocked yet."""
        for event in (self._hang, self._hang_active):
            if event is not None:
                event.set()

    def hang_if_armed(self) -> None:
        """Block an armed REPORT until released or timed out, then fail it with EIO.

        Called without any device lock held, so the release (from any thread) and other
        ioctls are never blocked behind it.
        """
        event, self._hang = self._hang, None
        if event is None:
            return
        self._hang_active, self.report_hanging = event, True
        try:
            event.wait(self._hang_timeout)
        finally:
            self._hang_active, self.report_hanging = None, False
        raise kernel_error(errno.EIO)

    def check_attached(self) -> None:
        if self.detached:
            raise kernel_error(errno.ENOTCONN)

    def check_report(self) -> None:
        if self.sticky_eio:
            raise kernel_error(errno.EIO)
        if self.eio_once:
            self.eio_once -= 1
            raise kernel_error(errno.EIO)

    def check_start(self) -> None:
        if self.start_failures:
            raise kernel_error(self.start_failures.popleft())

    def check_transition(self, state: int) -> None:
        code = self.transition_failures.pop(state, None)
        if code is not None:
            raise kernel_error(code)
