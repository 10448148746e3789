"""MIGRATION / MIG_DEVICE_STATE / MIG_DATA_SIZE features, the v2 FSM and the data streams."""

import errno
import itertools
import struct

import pytest

from orchestrator import uapi
from orchestrator.emulated import EmulatedKernel, Mlx5Like, MttyLike, NoDmaLogging, PdsLike
from orchestrator.emulated.mig_stream import HEADER_SIZE

from .util import (
    FEATURE,
    GET,
    MIG_DATA_SIZE,
    MIG_DEVICE_STATE,
    MIGRATION,
    PROBE,
    SET,
    errno_of,
    expect_errno,
    feature,
    mig_get,
    mig_set,
)

S = uapi.vfio_device_mig_state
ER, ST, RU, SC, RE, RP, PC, PP = (
    S.VFIO_DEVICE_STATE_ERROR,
    S.VFIO_DEVICE_STATE_STOP,
    S.VFIO_DEVICE_STATE_RUNNING,
    S.VFIO_DEVICE_STATE_STOP_COPY,
    S.VFIO_DEVICE_STATE_RESUMING,
    S.VFIO_DEVICE_STATE_RUNNING_P2P,
    S.VFIO_DEVICE_STATE_PRE_COPY,
    S.VFIO_DEVICE_STATE_PRE_COPY_P2P,
)
STOP_COPY, P2P, PRE_COPY = uapi.VFIO_MIGRATION_STOP_COPY, uapi.VFIO_MIGRATION_P2P, uapi.VFIO_MIGRATION_PRE_COPY

# vfio_from_fsm_table, transcribed from the reference (rows: current, columns: target).
_COLS = ["ST", "RU", "SC", "RE", "RP", "PC", "PP", "ER"]
_TABLE = """
ST: ST RP SC RE RP RP RP ER
RU: RP RU RP RP RP PC RP ER
SC: ST ST SC ST ST ER ER ER
RE: ST ST ST RE ST ST ST ER
RP: ST RU ST ST RP RU PP ER
PC: RU RU PP RU RU PC PP ER
PP: RP RP SC RP RP PC PP ER
ER: ER ER ER ER ER ER ER ER
"""
_NAMES = dict(ST=ST, RU=RU, SC=SC, RE=RE, RP=RP, PC=PC, PP=PP, ER=ER)
NEXT = {
    (_NAMES[row.split(":")[0]], _NAMES[col]): _NAMES[cell]
    for row in _TABLE.strip().splitlines()
    for col, cell in zip(_COLS, row.split(":")[1].split(), strict=False)
}
NEEDS = {
    ST: STOP_COPY,
    RU: STOP_COPY,
    SC: STOP_COPY,
    RE: STOP_COPY,
    RP: STOP_COPY | P2P,
    PC: STOP_COPY | PRE_COPY,
    PP: STOP_COPY | P2P | PRE_COPY,
}
FLAG_SETS = [STOP_COPY, STOP_COPY | P2P, STOP_COPY | PRE_COPY, STOP_COPY | P2P | PRE_COPY]


def ok(flags, state):
    return state in NEEDS and flags & NEEDS[state] == NEEDS[state]


def reference_path(flags, cur, new):
    """The arcs a driver walks from cur to new, or None where the core says EINVAL."""
    path = []
    while cur != new:
        if not ok(flags, cur) or not ok(flags, new):
            return None
        nxt = NEXT[cur, new]
        while not ok(flags, nxt) and nxt != ER:
            nxt = NEXT[nxt, new]
        if nxt == ER:
            return None
        path.append(nxt)
        cur = nxt
    return path


def device_in(kernel, flags, state):
    """A device whose state has been walked to `state` (through the ioctl)."""
    model = MttyLike(migration_flags=flags)
    fd = kernel.open_device(model)
    mig_set(kernel, fd, ST)  # a path into every reachable state exists from STOP
    if state == RE:
        # loaded with a valid stream, so that leaving RESUMING succeeds
        src = kernel.open_device(MttyLike(migration_flags=flags))
        kernel.write(mig_set(kernel, fd, RE), read_all(kernel, mig_set(kernel, src, SC)))
    elif state != ST:
        for nxt in reference_path(flags, ST, RU) + reference_path(flags, RU, state):
            mig_set(kernel, fd, nxt)
    assert model.mig_state == state
    return fd, model


# -- the feature tables ----------------------------------------------------------------------


@pytest.mark.parametrize("fid", [MIGRATION, MIG_DEVICE_STATE, MIG_DATA_SIZE])
def test_no_mig_ops_is_enotty(kernel, fid):
    fd = kernel.open_device(NoDmaLogging(migration_flags=0))
    expect_errno(errno.ENOTTY, lambda: kernel.ioctl(fd, FEATURE, feature(PROBE | fid, bytes(8))))


@pytest.mark.parametrize(
    "fid, flags, argsz, want",
    [
        (MIGRATION, GET, 16, 0),
        (MIGRATION, SET, 16, errno.EINVAL),
        (MIGRATION, PROBE | GET, 8, 0),
        (MIGRATION, PROBE | SET, 8, errno.EINVAL),
        (MIGRATION, GET, 15, errno.EINVAL),
        (MIGRATION, 0, 16, errno.EINVAL),
        (MIG_DEVICE_STATE, GET, 16, 0),
        (MIG_DEVICE_STATE, PROBE | GET | SET, 8, 0),
        (MIG_DEVICE_STATE, GET, 15, errno.EINVAL),
        (MIG_DEVICE_STATE, 0, 16, errno.EINVAL),
        (MIG_DATA_SIZE, GET, 16, 0),
        (MIG_DATA_SIZE, SET, 16, errno.EINVAL),
        (MIG_DATA_SIZE, PROBE | GET, 8, 0),
        (MIG_DATA_SIZE, GET, 15, errno.EINVAL),
    ],
)
def test_feature_table(kernel, fid, flags, argsz, want):
    fd = kernel.open_device(PdsLike())
    payload = struct.pack("<Ii", RU, 0) if fid == MIG_DEVICE_STATE else bytes(8)
    assert errno_of(lambda: kernel.ioctl(fd, FEATURE, feature(flags | fid, payload, argsz=argsz))) == want


@pytest.mark.parametrize(
    "model, flags",
    [
        (Mlx5Like(), STOP_COPY | P2P | PRE_COPY),
        (PdsLike(), STOP_COPY | P2P),
        (MttyLike(), STOP_COPY | P2P | PRE_COPY),
        (NoDmaLogging(), STOP_COPY | P2P),
    ],
)
def test_migration_flags(kernel, model, flags):
    fd = kernel.open_device(model)
    arg = feature(GET | MIGRATION, bytes(8))
    kernel.ioctl(fd, FEATURE, arg)
    assert struct.unpack_from("<Q", arg, 8)[0] == flags == model.migration_flags


def test_get_state_returns_data_fd_minus_one(kernel):
    fd = kernel.open_device(MttyLike())
    arg = feature(GET | MIG_DEVICE_STATE, struct.pack("<Ii", 77, 1234))
    kernel.ioctl(fd, FEATURE, arg)
    assert struct.unpack_from("<Ii", arg, 8) == (RU, -1)


def test_failed_set_echoes_requested_state_and_minus_one(kernel):
    fd, _model = device_in(kernel, STOP_COPY | P2P | PRE_COPY, SC)
    arg = feature(SET | MIG_DEVICE_STATE, struct.pack("<Ii", PC, 55))
    expect_errno(errno.EINVAL, lambda: kernel.ioctl(fd, FEATURE, arg))
    assert struct.unpack_from("<Ii", arg, 8) == (PC, -1)
    assert mig_get(kernel, fd) == SC


@pytest.mark.parametrize("target", [ER, 8, 100])
def test_error_and_out_of_range_targets_are_einval(kernel, target):
    fd = kernel.open_device(MttyLike())
    expect_errno(errno.EINVAL, lambda: mig_set(kernel, fd, target))


def test_set_to_current_state_is_a_no_op(kernel):
    fd = kernel.open_device(MttyLike())
    assert mig_set(kernel, fd, RU) == -1


def test_mig_data_size(kernel):
    model = PdsLike(device_data=b"x" * 100)
    fd = kernel.open_device(model)
    arg = feature(GET | MIG_DATA_SIZE, bytes(8))
    kernel.ioctl(fd, FEATURE, arg)
    assert struct.unpack_from("<Q", arg, 8)[0] >= 100


# -- the FSM ----------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", FLAG_SETS)
def test_every_transition_against_the_table(flags):
    kernel = EmulatedKernel()
    states = [s for s in (ST, RU, SC, RE, RP, PC, PP) if ok(flags, s)]
    for cur, new in itertools.product(states, [ST, RU, SC, RE, RP, PC, PP, ER]):
        fd, model = device_in(kernel, flags, cur)
        want = reference_path(flags, cur, new)
        if want is None:
            expect_errno(errno.EINVAL, lambda fd=fd, new=new: mig_set(kernel, fd, new))
            assert model.mig_state == cur
        else:
            data_fd = mig_set(kernel, fd, new)
            assert model.mig_state == new
            opens_stream = bool(want) and (
                want[-1] == RE
                or (want[-1] in (PC, PP) and cur not in (PC, PP))
                or (want[-1] == SC and cur not in (PC, PP))
            )
            assert (data_fd >= 0) == opens_stream, (cur, new, want)
        kernel.close(fd)


@pytest.mark.parametrize("flags", FLAG_SETS)
def test_unsupported_current_states_cannot_be_targets(kernel, flags):
    fd = kernel.open_device(MttyLike(migration_flags=flags))
    for state in (RP, PC, PP):
        if not ok(flags, state):
            expect_errno(errno.EINVAL, lambda state=state: mig_set(kernel, fd, state))


def test_fault_on_an_intermediate_arc_leaves_the_device_there(kernel):
    model = Mlx5Like()
    fd = kernel.open_device(model)
    model.fail_transition(ST, errno.EIO)
    expect_errno(errno.EIO, lambda: mig_set(kernel, fd, SC))  # RU -> RP -> ST(fails) -> SC
    assert mig_get(kernel, fd) == RP
    assert mig_set(kernel, fd, SC) >= 0  # one-shot


# -- streams ----------------------------------------------------------------------------------


def precopy_info(kernel, data_fd, argsz=24):
    arg = bytearray(struct.pack("<IIQQ", argsz, 0, 0, 0))
    kernel.ioctl(data_fd, uapi.VFIO_MIG_GET_PRECOPY_INFO, arg)
    return struct.unpack_from("<QQ", arg, 8)


def read_all(kernel, fd):
    out = b""
    while chunk := kernel.read(fd, 7):
        out += chunk
    return out


@pytest.mark.parametrize("model_cls", [Mlx5Like, MttyLike])
def test_precopy_round_trip(kernel, model_cls):
    src = model_cls(device_data=b"engine@0")
    dst = model_cls(device_data=b"")
    sfd, dfd = kernel.open_device(src), kernel.open_device(dst)
    data_fd = mig_set(kernel, sfd, PC)
    initial, dirty = precopy_info(kernel, data_fd)
    assert initial > HEADER_SIZE and dirty == 0
    chunk = kernel.read(data_fd, 10)
    assert precopy_info(kernel, data_fd)[0] == initial - 10
    stream = chunk + kernel.read(data_fd, 1 << 20)
    assert precopy_info(kernel, data_fd) == (0, 0)
    if model_cls is Mlx5Like:
        expect_errno(errno.ENOMSG, lambda: kernel.read(data_fd, 100))  # temporary end of stream
    else:
        assert kernel.read(data_fd, 100) == b""
    src.device_data = b"engine@42"  # the device kept running
    assert mig_set(kernel, sfd, PP) == -1
    assert mig_set(kernel, sfd, SC) == -1  # the final state goes to the fd PRE_COPY opened
    expect_errno(errno.EINVAL, lambda: precopy_info(kernel, data_fd))
    stream += read_all(kernel, data_fd)
    assert kernel.read(data_fd, 100) == b""
    mig_set(kernel, dfd, ST)
    in_fd = mig_set(kernel, dfd, RE)
    assert kernel.write(in_fd, stream) == len(stream)
    mig_set(kernel, dfd, ST)
    assert dst.device_data == b"engine@42"
    mig_set(kernel, sfd, ST)
    expect_errno(errno.ENODEV, lambda: kernel.read(data_fd, 1))  # the state machine closed it
    expect_errno(errno.ENODEV, lambda: kernel.write(in_fd, b"x"))


def test_stop_copy_without_precopy(kernel):
    src, dst = PdsLike(device_data=b"pds-state"), PdsLike()
    sfd, dfd = kernel.open_device(src), kernel.open_device(dst)
    data_fd = mig_set(kernel, sfd, SC)
    assert data_fd >= 0 and src.mig_state == SC
    stream = read_all(kernel, data_fd)
    expect_errno(errno.ENOTTY, lambda: precopy_info(kernel, data_fd))  # no PRE_COPY, no ioctl
    in_fd = mig_set(kernel, dfd, RE)
    kernel.write(in_fd, stream)
    mig_set(kernel, dfd, RU)
    assert dst.device_data == b"pds-state" and dst.mig_state == RU


def test_precopy_info_errors(kernel):
    model = MttyLike()
    fd = kernel.open_device(model)
    data_fd = mig_set(kernel, fd, PC)
    expect_errno(errno.EINVAL, lambda: precopy_info(kernel, data_fd, argsz=23))
    expect_errno(errno.EFAULT, lambda: kernel.ioctl(data_fd, uapi.VFIO_MIG_GET_PRECOPY_INFO, bytearray(8)))
    expect_errno(errno.ENOTTY, lambda: kernel.ioctl(data_fd, uapi.VFIO_DEVICE_FEATURE, bytearray(24)))
    assert precopy_info(kernel, data_fd)[0] > 0
    mig_set(kernel, fd, RU)  # leaving PRE_COPY disables the stream
    expect_errno(errno.EINVAL, lambda: precopy_info(kernel, data_fd))
    expect_errno(errno.ENODEV, lambda: kernel.read(data_fd, 1))
    expect_errno(errno.EBADF, lambda: kernel.write(data_fd, b"x"))
    kernel.close(data_fd)
    expect_errno(errno.EBADF, lambda: kernel.read(data_fd, 1))


def test_precopy_info_on_a_disabled_stream_in_precopy_is_enodev(kernel):
    fd = kernel.open_device(MttyLike())
    old = mig_set(kernel, fd, PC)
    mig_set(kernel, fd, RU)
    mig_set(kernel, fd, PC)
    expect_errno(errno.ENODEV, lambda: precopy_info(kernel, old))


def test_resume_errors(kernel):
    src = MttyLike(device_data=b"abc")
    stream = read_all(kernel, mig_set(kernel, kernel.open_device(src), SC))
    dst = MttyLike(max_data_size=64)
    fd = kernel.open_device(dst)
    mig_set(kernel, fd, ST)
    in_fd = mig_set(kernel, fd, RE)
    expect_errno(errno.EFAULT, lambda: kernel.write(in_fd, b"\0" * HEADER_SIZE))  # header mismatch
    expect_errno(errno.ENOMEM, lambda: kernel.write(in_fd, b"\0" * 4096))  # beyond the data size
    expect_errno(errno.EBADF, lambda: kernel.read(in_fd, 1))
    kernel.write(in_fd, stream[:-1])
    expect_errno(errno.EINVAL, lambda: mig_set(kernel, fd, ST))  # too little data
    assert dst.mig_state == RE
    kernel.write(in_fd, stream[-1:])
    mig_set(kernel, fd, ST)
    assert dst.device_data == b"abc"


def test_release_returns_to_running(kernel):
    model = Mlx5Like()
    fd = kernel.open_device(model)
    data_fd = mig_set(kernel, fd, PC)
    kernel.close(fd)
    assert model.mig_state == RU
    expect_errno(errno.ENODEV, lambda: kernel.read(data_fd, 1))
