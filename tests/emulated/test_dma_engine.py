"""The emulated DMA engine writes guest RAM through its device, logs like hardware, stops
when the device is quiesced, and its position migrates as device state."""

import time

import numpy as np
import pytest

from orchestrator import uapi as U
from orchestrator.dirty.bits import report_words
from orchestrator.emulated import EmulatedKernel, Mlx5Like
from orchestrator.emulated.dma import PAGE, DmaEngine, EngineState, check_window, expected_writes
from orchestrator.vfio import VfioDevice


@pytest.fixture
def ram(tmp_path):
    path = tmp_path / "ram"
    path.write_bytes(bytes(64 * PAGE))
    return str(path)


def wait_writes(engine, n, timeout=10):
    deadline = time.monotonic() + timeout
    while engine.state.writes < n:
        assert time.monotonic() < deadline, "engine made no progress"
        time.sleep(0.005)


def test_pattern_is_checkable_and_corruption_shows(ram):
    m = Mlx5Like()
    eng = DmaEngine(m, ram, 16 * PAGE, 8, rate=20000).start()
    wait_writes(eng, 30)
    m.migration.set_state(U.VFIO_DEVICE_STATE_STOP)  # quiesce, then look
    st = eng.state
    eng.stop()
    mem = np.fromfile(ram, np.uint8)
    assert check_window(mem, st) == []
    assert st.writes >= 30 and expected_writes(st).min() > 0, "wrapped around the window"
    mem[16 * PAGE + 3 * PAGE] ^= 1  # a stale record
    assert check_window(mem, st) == [16 + 3]
    assert check_window(mem, EngineState(st.writes + 1, st.window_gpa, 8)) != [], "a wrong position shows too"


def test_writes_are_logged_like_hardware(ram):
    """Only what the engine wrote, and only inside the tracked range, shows in a report."""
    k = EmulatedKernel()
    m = Mlx5Like()
    dev = VfioDevice(k.open_device(m), k)
    dev.start_dma_logging([(0, 12 * PAGE)], PAGE)  # the window is pages 8..19: 12..19 untracked
    eng = DmaEngine(m, ram, 8 * PAGE, 12, rate=20000).start()
    wait_writes(eng, 12)
    m.migration.set_state(U.VFIO_DEVICE_STATE_STOP)
    eng.stop()
    out = report_words(64)
    dev.report_dma_log(0, 64 * PAGE, PAGE, out)
    logged = np.flatnonzero(np.unpackbits(out[:1].view(np.uint8), bitorder="little")).tolist()
    assert logged == [8, 9, 10, 11]


def test_no_dma_once_quiesced_and_resume_continues(ram, tmp_path):
    src = Mlx5Like()
    eng = DmaEngine(src, ram, 0, 16, rate=20000).start()
    wait_writes(eng, 5)
    src.migration.set_state(U.VFIO_DEVICE_STATE_STOP_COPY)
    frozen = eng.state.writes
    before = np.fromfile(ram, np.uint8)
    time.sleep(0.05)
    assert eng.state.writes == frozen and np.array_equal(before, np.fromfile(ram, np.uint8))
    eng.stop()
    dst_ram = tmp_path / "dst"
    dst_ram.write_bytes(before.tobytes())
    dst = Mlx5Like()
    dst.device_data = src.device_data  # what migration v2 carries
    eng2 = DmaEngine(dst, str(dst_ram), 0, 16, rate=20000).start()
    wait_writes(eng2, frozen + 5)
    dst.migration.set_state(U.VFIO_DEVICE_STATE_STOP)
    st = eng2.state
    eng2.stop()
    assert check_window(np.fromfile(dst_ram, np.uint8), st) == []
