"""The tracker set's fallback policy, driven by scripted trackers: counters, events, marks,
restarts with back-off, perma-dirty, watchdog, and stop on every exit path."""

import asyncio
import errno
import json
import threading
from dataclasses import replace

import numpy as np
import pytest

from orchestrator.dirty.bitmap import DirtyBitmap
from orchestrator.dirty.memory import MemoryLayout
from orchestrator.trackers import EventKind, RecoveryPolicy, StartOutcome, TrackerSet, TrackerState
from orchestrator.vfio.ranges import IovaRange

PAGE = 4096
LAYOUT = MemoryLayout.flat(64 * PAGE)


class Scripted:
    """A tracker whose start/collect follow a script: 'ok', an errno, or 'hang'."""

    kind = "scripted"

    def __init__(self, name, reach_pages=(0, 8), collect=(), start=(), dirty=()):
        self.name = name
        self.reach = [IovaRange(reach_pages[0] * PAGE, (reach_pages[1] - reach_pages[0]) * PAGE)]
        self.collect_script = list(collect)
        self.start_script = list(start)
        self.dirty = list(dirty)
        self.calls = []
        self.release = threading.Event()
        self.stopped = 0

    def _step(self, script):
        what = script.pop(0) if script else "ok"
        if what == "hang":
            self.release.wait(10)
            raise OSError(errno.EIO, "hung call finally failed")
        if what != "ok":
            raise OSError(what, "scripted failure")

    def covered(self, layout):
        return list(self.reach)

    def start(self, layout):
        self.calls.append("start")
        self._step(self.start_script)
        return StartOutcome(PAGE, list(self.reach))

    def collect(self, bitmap):
        self.calls.append("collect")
        self._step(self.collect_script)
        for p in self.dirty:
            bitmap.mark(p * PAGE, PAGE)

    def stop(self):
        self.calls.append("stop")
        self.stopped += 1


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def make_set(*trackers, clock=None, **policy):
    bm = DirtyBitmap(LAYOUT.npages, PAGE)
    pol = RecoveryPolicy(**{"timeout": 2.0, "max_restarts": 2, "backoff_initial": 1.0, "backoff_max": 4.0, **policy})
    return bm, TrackerSet(trackers, bm, LAYOUT, pol, clock=clock or Clock())


def kinds(ts, name=None):
    return [e.kind for e in ts.events if name is None or e.tracker == name]


async def test_clean_rounds_report_exactly():
    t = Scripted("a", dirty=[3, 5])
    bm, ts = make_set(t)
    async with ts:
        await ts.collect(1)
        assert bm.harvest().tolist() == [3, 5]
        st = ts.stats()[0]
        assert (st.reports, st.errors, st.fallbacks, st.restarts, st.state) == (1, 0, 0, 0, TrackerState.RUNNING)
    assert t.calls == ["start", "collect", "stop"]
    assert kinds(ts) == ["start", "stop"]
    assert ts.stats()[0].state == TrackerState.STOPPED


async def test_report_error_marks_then_restarts_with_backoff():
    clock = Clock()
    t = Scripted("dev", reach_pages=(8, 16), collect=[errno.EIO])
    bm, ts = make_set(t, clock=clock)
    async with ts:
        await ts.collect(1)
        assert bm.harvest().tolist() == list(range(8, 16)), "the whole covered range, first"
        ev = ts.events[-1]
        assert (ev.tracker, ev.round, ev.kind, ev.errno) == ("dev", 1, "report-error", errno.EIO)
        assert "marked dirty" in ev.action
        assert ts.stats()[0].state == TrackerState.DEGRADED
        await ts.collect(2)  # back-off not elapsed: still all-dirty, no restart
        assert bm.harvest().tolist() == list(range(8, 16))
        assert t.calls.count("start") == 1
        clock.t = 1.0
        await ts.collect(3)  # restart, then marked once more (writes before the new START)
        assert bm.harvest().tolist() == list(range(8, 16))
        assert t.calls[-2:] == ["stop", "start"]
        await ts.collect(4)  # trusted again: only what it reports
        assert bm.harvest().tolist() == []
    st = ts.stats()[0]
    assert (st.reports, st.errors, st.fallbacks, st.restarts) == (1, 1, 3, 1)
    assert kinds(ts, "dev") == ["start", "report-error", "restart", "start", "stop"]


async def test_repeated_restart_failure_goes_perma_dirty():
    clock = Clock()
    t = Scripted("sticky", collect=[errno.EIO], start=["ok", errno.EIO, errno.EIO, errno.EIO])
    bm, ts = make_set(t, clock=clock, max_restarts=2)
    async with ts:
        for rnd in range(1, 8):
            clock.t += 10
            await ts.collect(rnd)
            assert bm.harvest().tolist() == list(range(0, 8)), f"round {rnd} must be all-dirty"
        assert ts.stats()[0].state == TrackerState.PERMA_DIRTY
    assert kinds(ts, "sticky").count("restart-failed") == 2
    assert "perma-dirty" in kinds(ts)
    st = ts.stats()[0]
    assert st.errors == 4 and st.restarts == 0 and st.fallbacks == 7
    assert t.calls.count("start") == 4, "no more restarts once perma-dirty"


async def test_hang_is_a_timeout_and_no_restart_while_inflight():
    clock = Clock()
    t = Scripted("hung", collect=["hang"])
    bm, ts = make_set(t, clock=clock, timeout=0.2)
    async with ts:
        await ts.collect(1)
        ev = ts.events[-1]
        assert ev.kind == "timeout" and ev.errno == errno.ETIMEDOUT
        assert bm.harvest().tolist() == list(range(8))
        clock.t = 100
        await ts.collect(2)
        assert t.calls.count("start") == 1, "the hung call still holds the device"
        assert bm.harvest().tolist() == list(range(8))
        t.release.set()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if ts._slots[0].inflight == 0:
                break
        await ts.collect(3)
        assert t.calls.count("start") == 2 and ts.stats()[0].state == TrackerState.RUNNING


async def test_start_failure_is_degraded_not_fatal():
    clock = Clock()
    t = Scripted("late", start=[errno.ENOTCONN])
    other = Scripted("fine", reach_pages=(32, 40), dirty=[33])
    bm, ts = make_set(t, other, clock=clock)
    async with ts:
        assert [s.state for s in ts.stats()] == [TrackerState.DEGRADED, TrackerState.RUNNING]
        assert bm.harvest().tolist() == list(range(8)), "a tracker that failed to start is covered at once"
        await ts.collect(1)
        assert bm.harvest().tolist() == [*list(range(8)), 33]
    assert ts.events[0].kind == "start-error" and ts.events[0].errno == errno.ENOTCONN


async def test_one_failure_does_not_disturb_the_others():
    bad = Scripted("bad", reach_pages=(0, 4), collect=[errno.EIO])
    good = Scripted("good", reach_pages=(16, 24), dirty=[20])
    bm, ts = make_set(bad, good)
    async with ts:
        await ts.collect(1)
        assert bm.harvest().tolist() == [0, 1, 2, 3, 20]
    assert [s.reports for s in ts.stats()] == [0, 1]


async def test_stopped_after_exception_in_body():
    a, b = Scripted("a"), Scripted("b")
    _, ts = make_set(a, b)
    with pytest.raises(RuntimeError, match="boom"):
        async with ts:
            await ts.collect(1)
            raise RuntimeError("boom")
    assert a.stopped == b.stopped == 1


async def test_stopped_after_cancellation_mid_collect():
    hung, ok = Scripted("hung", collect=["hang"]), Scripted("ok")
    _, ts = make_set(hung, ok, timeout=30)

    async def run():
        async with ts:
            await ts.collect(1)

    task = asyncio.create_task(run())
    for _ in range(200):
        await asyncio.sleep(0.005)
        if "collect" in hung.calls:
            break
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert hung.stopped == 1 and ok.stopped == 1
    assert all(s.state == TrackerState.STOPPED for s in ts.stats())
    hung.release.set()


async def test_stopped_when_start_is_cancelled():
    slow = Scripted("slow", start=["hang"])
    _, ts = make_set(slow, timeout=30)
    task = asyncio.create_task(ts.__aenter__())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert slow.stopped == 1, "a start in flight may have succeeded: stop it anyway"
    slow.release.set()


def test_rejects_duplicate_names_and_page_mismatch():
    with pytest.raises(ValueError, match="unique"):
        make_set(Scripted("x"), Scripted("x"))
    with pytest.raises(ValueError, match="page"):
        TrackerSet([Scripted("x")], DirtyBitmap(16, 8192), LAYOUT)


async def test_final_round_uses_collect_final_and_never_restarts():
    clock = Clock()

    class Final(Scripted):
        def collect_final(self, bitmap):
            self.calls.append("collect_final")
            bitmap.mark(7 * PAGE, PAGE)

    t = Final("f")
    d = Scripted("d", reach_pages=(40, 44), collect=[errno.EIO])
    bm, ts = make_set(t, d, clock=clock)
    async with ts:
        await ts.collect(1)
        bm.harvest()
        clock.t = 100
        await ts.collect(2, final=True)
        assert bm.harvest().tolist() == [7, 40, 41, 42, 43]
    assert "collect_final" in t.calls and d.calls.count("start") == 1


async def test_the_report_holds_typed_records_and_serialises_them_plainly():
    """The report keeps the set's records as objects (copies of the counters, which go on
    counting); its JSON form has every field and enums as their values."""
    from orchestrator.migration.driver import MigrationReport

    _, ts = make_set(Scripted("a"))
    await ts.start()
    rep = MigrationReport(trackers=[replace(s) for s in ts.stats()], events=list(ts.events))
    await ts.stop()
    assert rep.trackers[0].state is TrackerState.RUNNING and ts.stats()[0].state is TrackerState.STOPPED
    assert rep.events[0].kind is EventKind.START
    data = json.loads(json.dumps(rep.as_dict()))
    assert set(data["trackers"][0]) == {
        "name",
        "kind",
        "page_size",
        "reports",
        "errors",
        "fallbacks",
        "restarts",
        "state",
    }
    assert data["trackers"][0]["state"] == "running" and data["events"][0]["kind"] == "start"
    assert data["status"] == "failed" and data["guest"] == "source"


class Hashing(Scripted):
    """A tracker that wants to see what the destination holds."""

    def __init__(self, name):
        super().__init__(name)
        self.seen = []

    def record_sent(self, pages, data):
        self.seen.append(pages.tolist())


def test_on_sent_only_when_a_tracker_needs_the_bytes_sent():
    """A sink given no `on_sent` sends pages without a snapshot, so it must stay None unless a
    content-aware tracker is in the set, and then reach it."""
    assert make_set(Scripted("a"), Scripted("b"))[1].on_sent is None
    hashing = Hashing("h")
    _, ts = make_set(Scripted("a"), hashing)
    ts.on_sent(np.array([3, 4]), np.zeros((2, PAGE), np.uint8))
    assert hashing.seen == [[3, 4]]


class BoundedScripted(Scripted):
    """A `Bounded` tracker: records the thread each collect ran on."""

    bounded_collect = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.threads = []

    def collect(self, bitmap):
        self.threads.append(threading.get_ident())
        super().collect(bitmap)


async def test_a_bounded_final_collect_runs_on_the_loop_thread_after_the_others_started():
    """Precopy collects of a bounded tracker run in a worker; the final one on the loop's own
    thread, once the threaded trackers' calls are under way: the bounded final collect waits
    for the slow tracker's call to begin, which it could not if that thread were started
    after it (the loop is blocked meanwhile)."""
    slow = Scripted("slow", (8, 16), collect=["ok", "hang"], dirty=[9])
    bounded = BoundedScripted("bounded", (0, 8), dirty=[1])
    slow_began = threading.Event()
    real_slow, real_bounded = slow.collect, bounded.collect

    def slow_collect(bitmap):
        slow_began.set()
        return real_slow(bitmap)

    def bounded_collect(bitmap):
        if len(bounded.threads) == 1:
            assert slow_began.wait(2), "the threaded tracker was not started first"
        return real_bounded(bitmap)

    slow.collect, bounded.collect = slow_collect, bounded_collect
    bm, ts = make_set(bounded, slow, timeout=0.3)
    loop_thread = threading.get_ident()
    await ts.start()
    await ts.collect(1)
    assert bounded.threads[-1] != loop_thread
    slow_began.clear()
    await ts.collect(2, final=True)
    slow.release.set()
    assert bounded.threads[-1] == loop_thread
    assert kinds(ts, "bounded")[-1] == "start" and kinds(ts, "slow")[-1] == "timeout"
    assert set(bm.harvest().tolist()) == {1, *range(8, 16)}
    await ts.stop()


async def test_a_bounded_final_collect_that_fails_falls_back_to_all_dirty():
    bounded = BoundedScripted("bounded", (0, 8), collect=["ok", errno.ESRCH])
    bm, ts = make_set(bounded)
    await ts.start()
    await ts.collect(1)
    bm.harvest()
    await ts.collect(2, final=True)
    assert kinds(ts, "bounded")[-1] == "report-error"
    assert bm.harvest().tolist() == list(range(8))
    await ts.stop()
