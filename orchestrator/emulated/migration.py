"""Migration v2: the core's vfio_mig_get_next_state() and a driver's step-by-step set_state.

The FSM table is the core's; the arcs' side effects (which step opens a data fd, appends the
final state, loads the resumed state) follow the mtty sample, which every in-tree driver shares
in shape.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable

from orchestrator.emulated.errors import kernel_error
from orchestrator.emulated.faults import FaultState
from orchestrator.emulated.mig_stream import ResumeFile, SaveFile, StreamFormat
from orchestrator.uapi import (
    VFIO_MIGRATION_P2P,
    VFIO_MIGRATION_PRE_COPY,
    VFIO_MIGRATION_STOP_COPY,
    vfio_device_mig_state,
)

S = vfio_device_mig_state
_ER, _ST, _RU, _SC, _RE, _RP, _PC, _PP = (
    S.VFIO_DEVICE_STATE_ERROR,
    S.VFIO_DEVICE_STATE_STOP,
    S.VFIO_DEVICE_STATE_RUNNING,
    S.VFIO_DEVICE_STATE_STOP_COPY,
    S.VFIO_DEVICE_STATE_RESUMING,
    S.VFIO_DEVICE_STATE_RUNNING_P2P,
    S.VFIO_DEVICE_STATE_PRE_COPY,
    S.VFIO_DEVICE_STATE_PRE_COPY_P2P,
)

# vfio_from_fsm_table[cur][target]: the next state on the way from cur to target.
_TARGETS = (_ST, _RU, _SC, _RE, _RP, _PC, _PP, _ER)
_NEXT = {
    _ST: (_ST, _RP, _SC, _RE, _RP, _RP, _RP, _ER),
    _RU: (_RP, _RU, _RP, _RP, _RP, _PC, _RP, _ER),
    _SC: (_ST, _ST, _SC, _ST, _ST, _ER, _ER, _ER),
    _RE: (_ST, _ST, _ST, _RE, _ST, _ST, _ST, _ER),
    _RP: (_ST, _RU, _ST, _ST, _RP, _RU, _PP, _ER),
    _PC: (_RU, _RU, _PP, _RU, _RU, _PC, _PP, _ER),
    _PP: (_RP, _RP, _SC, _RP, _RP, _PC, _PP, _ER),
    _ER: (_ER,) * 8,
}
NEXT_STATE: dict[tuple[int, int], int] = {
    (cur, tgt): nxt for cur, row in _NEXT.items() for tgt, nxt in zip(_TARGETS, row, strict=False)
}

_ALL = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P | VFIO_MIGRATION_PRE_COPY
# state_flags_table: the migration_flags a state needs. ERROR needs ~0, so it is never a target.
STATE_FLAGS: dict[int, int] = {
    _ST: VFIO_MIGRATION_STOP_COPY,
    _RU: VFIO_MIGRATION_STOP_COPY,
    _SC: VFIO_MIGRATION_STOP_COPY,
    _RE: VFIO_MIGRATION_STOP_COPY,
    _RP: VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P,
    _PC: VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY,
    _PP: _ALL,
    _ER: 0xFFFF_FFFF_FFFF_FFFF,
}


def _supported(flags: int, state: int) -> bool:
    need = STATE_FLAGS.get(state)
    return need is not None and flags & need == need


def mig_get_next_state(flags: int, cur: int, new: int) -> int:
    """vfio_mig_get_next_state: one step from cur toward new, skipping unsupported states."""
    if not _supported(flags, cur) or not _supported(flags, new):
        raise kernel_error(errno.EINVAL)
    nxt = NEXT_STATE[cur, new]
    while nxt != _ER and not _supported(flags, nxt):  # ERROR is a dead end, not a detour
        nxt = NEXT_STATE[nxt, new]
    if nxt == _ER:
        raise kernel_error(errno.EINVAL)
    return nxt


DataFile = SaveFile | ResumeFile

# Arcs that change only whether the device runs or may do P2P: no data moves.
_QUIET_ARCS = {
    (_ST, _RU),
    (_RU, _ST),
    (_ST, _RP),
    (_RP, _ST),
    (_RU, _RP),
    (_RP, _RU),
    (_PC, _PP),
    (_PP, _PC),
}


class MigrationDriver:
    """A device's migration_set_state/get_state/get_data_size, plus its data streams.

    `state_mutex` is the device driver's, shared with its log ops: every mig_ops entry takes it
    first, as mlx5 and pds do. `lock` is taken inside it by transitions, and alone by DMA."""

    def __init__(
        self,
        flags: int,
        get_data: Callable[[], bytes],
        put_data: Callable[[bytes], None],
        faults: FaultState,
        state_mutex: threading.RLock,
        precopy_eos_errno: int | None,
        max_data_size: int,
        stream: StreamFormat,
    ) -> None:
        self.flags = flags
        self.state: int = _RU
        self._get_data, self._put_data = get_data, put_data
        self._faults = faults
        self.state_mutex = state_mutex
        self._eos_errno = precopy_eos_errno
        self._max_data_size = max_data_size
        self._stream = stream
        self._lock = threading.RLock()
        self.saving: SaveFile | None = None
        self.resuming: ResumeFile | None = None

    def in_precopy(self) -> bool:
        return self.state in (_PC, _PP)

    @property
    def lock(self) -> threading.RLock:
        """Held by every state transition: DMA bursts take it too, so a transition (and the
        state it captures) never interleaves with a burst."""
        return self._lock

    def get_state(self) -> int:
        with self.state_mutex:
            return self.state

    def set_state(self, new: int) -> DataFile | None:
        """Walk toward `new` one arc at a time; a failed arc leaves the state where it was."""
        with self.state_mutex, self._lock:
            res: DataFile | None = None
            while self.state != new:
                nxt = mig_get_next_state(self.flags, self.state, new)
                self._faults.check_transition(nxt)
                res = self._step(self.state, nxt)
                self.state = nxt
            return res

    def data_size(self) -> int:
        """stop_copy_length: what STOP_COPY would produce from here."""
        with self.state_mutex:
            return self._stream.stop_copy_length(self._get_data())

    def reset(self) -> None:
        """Device release/reset: streams die, the device is RUNNING again."""
        with self.state_mutex, self._lock:
            self.disable_files()
            self.state = _RU

    def disable_files(self) -> None:
        """The driver drops its data fds: userspace's copies fail with ENODEV from now on."""
        with self._lock:
            for f in (self.saving, self.resuming):
                if f is not None:
                    f.disabled = True
            self.saving = self.resuming = None

    def _new_save_file(self, body: bytes) -> SaveFile:
        self.saving = SaveFile(self, self._stream.header(self._get_data()) + body, self._eos_errno)
        return self.saving

    def _step(self, cur: int, nxt: int) -> DataFile | None:
        if (cur, nxt) in _QUIET_ARCS:
            return None
        if (cur, nxt) in ((_RU, _PC), (_RP, _PP)):
            saving = self._new_save_file(self._stream.precopy_body(self._get_data()))
            saving.precopy_size = len(saving.buf)
            return saving
        if (cur, nxt) in ((_PC, _SC), (_PP, _SC)) and self.saving is not None:
            self.saving.append_final(self._stream.final(self._get_data()))
            return None
        if cur == _ST and nxt == _SC:
            return self._new_save_file(self._stream.final(self._get_data()))
        if (cur, nxt) in ((_SC, _ST), (_PC, _RU), (_PP, _RP)):
            self.disable_files()
            return None
        if (cur, nxt) == (_ST, _RE):
            state = self._get_data()
            self.resuming = ResumeFile(
                self._stream.resume_capacity(state, self._max_data_size),
                lambda header: self._stream.header_ok(header, state),
            )
            return self.resuming
        if (cur, nxt) == (_RE, _ST) and self.resuming is not None:
            self._put_data(self._stream.load(self.resuming.body(), self._get_data()))
            self.disable_files()
            return None
        raise kernel_error(errno.EINVAL)
