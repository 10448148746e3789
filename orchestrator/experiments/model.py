"""What a simulated migration runs against: a guest that dirties pages, a link that moves
them, and the cost of collecting the dirty set.

Workloads are written against guest time (it runs slower when throttled), so one model serves
every throttle level. `GuestWorkload` is the fixture guest's patterns in closed form (the
expected number of distinct pages a window of writes touches); `TraceWorkload` replays the
dirty sets a trace recorded. `LinkModel` and `CollectModel` are the costs that scale with
pages and RAM, `StepCosts` what every step costs besides (QMP round trips, tracker arming,
QEMU's own part of the switchover); each has a `fit` from a trace, so a prediction uses what
the real run measured.
"""

from __future__ import annotations

import enum
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from orchestrator.experiments.errors import ExperimentError
from orchestrator.experiments.trace import Collect, Decision, Step, Throttle, Trace, TraceKind, bits_of
from orchestrator.migration.engine import PrecopyEngine
from orchestrator.migration.engine import sequence as seq
from orchestrator.native.presets import GUEST_PRESETS

PAGE = 4096
MIB, GIB = 1 << 20, 1 << 30
#: Pages a second of guest time the fixture guest writes with `rate=0` (as fast as it can):
#: what its `heavy` workload's progress lines showed under TCG on the machine this was built
#: on (README: Throttling). Another host differs: fit a trace of the guest there instead.
UNPACED_PAGES_PER_S = 1_240_000.0
#: The fixture guest's fw_cfg workload: 1 MiB copies into one buffer.
FWCFG_COPY = MIB
#: Rounds smaller than this time their fixed overhead more than the link (`PrecopyEngine`'s
#: `min_sample_bytes`).
MIN_SAMPLE_BYTES = PrecopyEngine.min_sample_bytes
#: The RAM the fixture guest leaves to devices at the top of low memory (its `dma` default).
DMA_WINDOW = 16 * MIB


class Workload(Protocol):
    """Pages dirtied during a stretch of guest time."""

    @property
    def npages(self) -> int:
        """The guest's RAM in pages."""
        ...

    def pages(self, start_s: float, end_s: float) -> np.ndarray:
        """The page numbers written in guest time (start_s, end_s], sorted."""
        ...

    def dirtied(self, start_s: float, end_s: float) -> int:
        """How many pages `pages` gives."""
        ...

    def resident_pages(self) -> int:
        """Pages holding data when the migration starts: what round 0 copies."""
        ...


class Pattern(enum.StrEnum):
    """The fixture guest's write patterns (orchestrator/native/csrc/guest/guest.c)."""

    IDLE = "idle"
    SWEEP = "sweep"  # pages in order, wrapping at the end of the working set
    RANDOM = "random"  # uniform over the working set
    HOTCOLD = "hotcold"  # `hotw`% of writes to the first `hot`% of pages


#: The fixture guest's presets (the demo's `--workload` names), as its command lines.
PRESETS = GUEST_PRESETS


def parse_size(text: str) -> int:
    """`64M`, `4096`, `0x1000`, `2G`: binary suffixes, as the guest and the CLI read them."""
    t = text.strip()
    shift = {"k": 10, "m": 20, "g": 30, "t": 40}.get(t[-1:].lower(), 0)
    digits = t[:-1] if shift else t
    try:
        value = int(digits, 0)
    except ValueError:
        raise ExperimentError(f"not a size: {text!r} (e.g. 256M, 4G, 65536)") from None
    if value < 0:
        raise ExperimentError(f"a size cannot be negative: {text!r}")
    return value << shift


def _distinct(slots: int, writes: float) -> float:
    """Expected distinct slots hit by `writes` uniform draws: slots * (1 - (1 - 1/slots)^writes)."""
    if slots <= 0 or writes <= 0:
        return 0.0
    if slots == 1:
        return 1.0
    return -slots * math.expm1(writes * math.log1p(-1.0 / slots))


@dataclass(frozen=True)
class GuestWorkload:
    """The fixture guest in closed form. `rate_pps` is its page writes per second of guest
    time; `hot_share`/`hot_write_share` its hotcold split (as the guest rounds them); the
    fw_cfg buffer is rewritten whole by every copy."""

    pattern: Pattern
    wss_pages: int
    rate_pps: float
    npages: int
    hot_share: float = 0.10
    hot_write_share: float = 0.90
    fwcfg_copies_per_s: float = 0.0
    base_page: int = (2 * MIB) // PAGE  # where the working set starts (the guest's `base`)

    def __post_init__(self) -> None:
        if self.base_page + self.wss_pages + self._fwcfg_pages > self.npages:
            raise ExperimentError(f"a working set of {self.wss_pages} pages does not fit in {self.npages} pages of RAM")
        if self.rate_pps < 0 or not math.isfinite(self.rate_pps):
            raise ExperimentError(f"a write rate is finite and not negative, got {self.rate_pps}")

    @classmethod
    def from_command_line(cls, append: str, ram_bytes: int) -> GuestWorkload:
        """The guest's own keys (`pattern= wss= rate= hot= hotw= fwcfg=`; others do not
        change what it dirties), or a preset name."""
        keys = dict(word.split("=", 1) for word in PRESETS.get(append, append).split() if "=" in word)
        try:
            pattern = Pattern(keys.get("pattern", "sweep"))
        except ValueError:
            known = [p.value for p in Pattern]
            raise ExperimentError(
                f"pattern={keys['pattern']} is not one of {known} (or a preset: {', '.join(PRESETS)})"
            ) from None
        wss = parse_size(keys.get("wss", "64M"))
        rate = parse_size(keys.get("rate", "0")) / PAGE
        hot = int(keys.get("hot", "10"))
        hotw = int(keys.get("hotw", "90"))
        if not (0 <= hot <= 100 and 0 <= hotw <= 100):
            raise ExperimentError(f"hot and hotw are percentages, got hot={hot} hotw={hotw}")
        fwcfg = parse_size(keys.get("fwcfg", "0"))
        base = parse_size(keys.get("base", "2M"))
        return cls(
            pattern=pattern,
            wss_pages=0 if pattern is Pattern.IDLE else wss // PAGE,
            rate_pps=0.0 if pattern is Pattern.IDLE else (rate or UNPACED_PAGES_PER_S),
            npages=ram_bytes // PAGE,
            hot_share=hot / 100,
            # The guest compares 16 hash bits with hotw * 65536 / 100, rounded down.
            hot_write_share=(hotw << 16) // 100 / 65536,
            fwcfg_copies_per_s=fwcfg / FWCFG_COPY,
            base_page=base // PAGE,
        )

    @property
    def hot_pages(self) -> int:
        hot = int(self.wss_pages * self.hot_share)
        return self.wss_pages if hot == 0 or hot > self.wss_pages else hot

    def vcpu_dirtied(self, seconds: float) -> float:
        writes = self.rate_pps * seconds
        n = self.wss_pages
        match self.pattern:
            case Pattern.IDLE:
                return 0.0
            case Pattern.SWEEP:
                return min(float(n), writes)
            case Pattern.RANDOM:
                return _distinct(n, writes)
        hot = self.hot_pages
        if hot == n:
            return _distinct(n, writes)
        w = self.hot_write_share
        return _distinct(hot, writes * w) + _distinct(n - hot, writes * (1 - w))

    def device_dirtied(self, seconds: float) -> float:
        """The fw_cfg buffer: whole once a copy lands in the window, pro rata before."""
        return FWCFG_COPY / PAGE * min(1.0, seconds * self.fwcfg_copies_per_s)

    @property
    def _fwcfg_pages(self) -> int:
        return FWCFG_COPY // PAGE if self.fwcfg_copies_per_s else 0

    @property
    def fwcfg_page(self) -> int:
        """The fw_cfg buffer's first page: the MiB below the guest's 16 MiB DMA window."""
        return (self.npages * PAGE - DMA_WINDOW - FWCFG_COPY) // PAGE

    def pages(self, start_s: float, end_s: float) -> np.ndarray:
        """Pages in the pattern's places, as many as `vcpu_dirtied`/`device_dirtied` expect:
        a sweep's run from where its cursor stands, uniform picks otherwise (seeded by the
        window, so a replay is deterministic)."""
        span = max(0.0, end_s - start_s)
        writes, n = self.rate_pps * span, self.wss_pages
        rng = np.random.default_rng([round(start_s * 1e9), round(end_s * 1e9)])
        parts = [np.zeros(0, np.int64)]
        match self.pattern:
            case Pattern.SWEEP if n:
                first = int(self.rate_pps * start_s) % n
                parts.append((first + np.arange(round(min(n, writes)))) % n)
            case Pattern.RANDOM:
                parts.append(rng.choice(n, round(_distinct(n, writes)), replace=False))
            case Pattern.HOTCOLD:
                hot, w = self.hot_pages, self.hot_write_share
                if hot == n:
                    w = 1.0
                parts.append(rng.choice(hot, round(_distinct(hot, writes * w)), replace=False))
                if n > hot:
                    cold = round(_distinct(n - hot, writes * (1 - w)))
                    parts.append(hot + rng.choice(n - hot, cold, replace=False))
        out = [self.base_page + np.asarray(p, np.int64) for p in parts]
        if self._fwcfg_pages:
            out.append(self.fwcfg_page + np.arange(round(self.device_dirtied(span)), dtype=np.int64))
        return np.sort(np.concatenate(out))

    def dirtied(self, start_s: float, end_s: float) -> int:
        return int(self.pages(start_s, end_s).size)

    def resident_pages(self) -> int:
        return self.wss_pages + self._fwcfg_pages


@dataclass(frozen=True)
class DirtyInterval:
    """Pages a trace saw written in (start_s, end_s] of guest time."""

    start_s: float
    end_s: float
    bits: np.ndarray = field(repr=False)


@dataclass
class TraceWorkload:
    """The dirty sets of a trace, replayed: a window is the union of the sets it covers, and of
    a set it covers in part, the pages written in that part. Each page of a set is taken as
    written once, at a moment spread evenly over the set's interval (a fixed random order of
    the pages, so replays are deterministic): consecutive windows split a set between them
    and together hold all of it, as consecutive collects did. Past the end the trace repeats."""

    intervals: list[DirtyInterval]
    npages: int
    round0_pages: int | None = None  # what the recorded round 0 copied, when the trace says
    _rank: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.intervals:
            raise ExperimentError("a trace with no dirty sets cannot be replayed (no harvests or collects)")
        if any(b.end_s <= a.end_s for a, b in zip(self.intervals, self.intervals[1:], strict=False)):
            raise ExperimentError("a trace's dirty sets must be in time order")
        # Each page's place in a fixed random order: the pages of a set written in the part of its
        # interval from share f to share g are those ranked in [f, g).
        self._rank = np.random.default_rng(0).random(self.npages)

    @property
    def start_s(self) -> float:
        return self.intervals[0].start_s

    @property
    def span_s(self) -> float:
        return self.intervals[-1].end_s - self.start_s

    def pages(self, start_s: float, end_s: float) -> np.ndarray:
        return np.flatnonzero(self.bits(start_s, end_s))

    def bits(self, start_s: float, end_s: float) -> np.ndarray:
        """The pages written in guest time (start_s, end_s], as one bool per page."""
        out = np.zeros(self.npages, dtype=bool)
        if end_s <= start_s:
            return out
        span = self.span_s
        if end_s - start_s >= span:
            for iv in self.intervals:
                out |= iv.bits
            return out
        # Map onto the trace's own timeline, which repeats with period `span`.
        lap = math.floor((start_s - self.start_s) / span)
        a, b = start_s - lap * span, end_s - lap * span
        for shift in (0.0, span):
            for iv in self.intervals:
                lo, hi = iv.start_s + shift, iv.end_s + shift
                first, last = max(a, lo), min(b, hi)
                if last <= first:
                    continue
                if first <= lo and last >= hi:
                    out |= iv.bits
                    continue
                f, g = (first - lo) / (hi - lo), (last - lo) / (hi - lo)
                out |= iv.bits & (self._rank >= f) & (self._rank < g)
        return out

    def dirtied(self, start_s: float, end_s: float) -> int:
        return int(self.bits(start_s, end_s).sum())

    def resident_pages(self) -> int:
        if self.round0_pages is not None:
            return self.round0_pages
        return int(np.logical_or.reduce([iv.bits for iv in self.intervals]).sum())

    @classmethod
    def from_trace(cls, trace: Trace) -> TraceWorkload:
        """A probe's harvests, or a migration's collects (each the pages written since the
        collect before it; the first since tracking started), on guest time since the run
        started: a throttled stretch counts (1 - level) of its length, and none counts
        once QEMU stopped the guest. A migration's sets are bounded where their collects
        began, as the simulator takes a collect's pages."""
        h = trace.header
        if h.kind is TraceKind.PROBE:
            spans = [(x.t - x.interval_s, x.t, bits_of(x.pages, h.npages)) for x in trace.harvests]
            return cls(_on_guest_time(spans, []), h.npages)
        rounds = trace.rounds
        if not rounds:
            raise ExperimentError("a migration trace without rounds cannot be replayed")
        steps: list[Step] = trace.of(Step)
        began = {(int(s.data["round"]), bool(s.data.get("final"))): s.t for s in steps if s.action == "Collect"}
        start = next((s.t for s in steps if s.action == "StartTrackers"), None)
        if start is None:  # no steps recorded: from round 0's start
            start = (rounds[0].ended_ms - rounds[0].duration_ms) / 1e3
        spans = []
        for c in trace.collects:
            end = began.get((c.round, c.final), c.t)
            spans.append((start, end, bits_of(c.pages, h.npages)))
            start = end
        if (last := _unharvested(trace)) is not None:
            end = began.get((int(last.data["round"]), False), last.t)
            spans.append((start, end, _stand_in(h.npages, int(last.data["pending-pages"]))))
        throttles = [(r.t, r.level) for r in trace.of(Throttle)]
        throttles += [(s.t, 1.0) for s in steps if s.action == "DevicesStopCopy"]  # QEMU stopped the guest
        return cls(_on_guest_time(spans, throttles), h.npages, rounds[0].sent_pages)


def _unharvested(trace: Trace) -> Decision | None:
    """The last decision, when nothing harvested its collect: a run cancelled or ended right
    after it. Its count is all the trace knows of those pages."""
    if not trace.decisions:
        return None
    last = max(trace.decisions, key=lambda d: int(d.data["round"]))
    harvested = any(c.final or c.round >= int(last.data["round"]) for c in trace.collects)
    return None if harvested else last


def _stand_in(npages: int, count: int) -> np.ndarray:
    """`count` pages where only the count is known: a fixed random choice (deterministic)."""
    bits = np.zeros(npages, dtype=bool)
    bits[np.random.default_rng(1).permutation(npages)[: min(count, npages)]] = True
    return bits


def _on_guest_time(
    spans: Sequence[tuple[float, float, np.ndarray]], throttles: Sequence[tuple[float, float]]
) -> list[DirtyInterval]:
    """Wall-clock spans to guest time: the guest ran (1 - level) as fast under a throttle."""

    def guest(t: float) -> float:
        g, last, level = 0.0, 0.0, 0.0
        for when, new in throttles:
            if when >= t:
                break
            g += (when - last) * (1 - level)
            last, level = when, new
        return g + (t - last) * (1 - level)

    # Guest time counts from the run's start, as the simulator's does: its tracking starts when
    # the trace's did, after the steps before it.
    return [DirtyInterval(guest(a), guest(b), bits) for a, b, bits in spans if guest(b) > guest(a)]


def working_set(workload: Workload, windows: Sequence[float], starts: int = 8) -> list[float]:
    """W(t): the mean number of distinct pages written in a window of each length, over
    `starts` evenly spread window starts (one suffices for a stationary model)."""
    if isinstance(workload, TraceWorkload):
        offsets = [workload.start_s + workload.span_s * i / starts for i in range(starts)]
    else:
        offsets = [0.0]
    return [sum(workload.dirtied(o, o + w) for o in offsets) / len(offsets) for w in windows]


# -- costs ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinkModel:
    """A round of `n` bytes takes overhead_s + n / bandwidth_bps; round 0 reads all of RAM for
    zero pages at scan_bps too. `cap_bps` is a bandwidth cap on the page stream."""

    bandwidth_bps: float = 1e9
    overhead_s: float = 0.0
    scan_bps: float = 8e9
    cap_bps: float | None = None

    def __post_init__(self) -> None:
        for name in ("bandwidth_bps", "scan_bps"):
            value = getattr(self, name)
            if not 0 < value < math.inf:
                raise ExperimentError(f"{name} must be finite and positive, got {value}")
        if self.cap_bps is not None and not 0 < self.cap_bps < math.inf:
            raise ExperimentError(f"a bandwidth cap must be finite and positive, got {self.cap_bps}")
        if self.overhead_s < 0:
            raise ExperimentError(f"overhead_s cannot be negative, got {self.overhead_s}")

    @property
    def effective_bps(self) -> float:
        return self.bandwidth_bps if self.cap_bps is None else min(self.bandwidth_bps, self.cap_bps)

    def send_s(self, nbytes: int) -> float:
        return 0.0 if nbytes == 0 else self.overhead_s + nbytes / self.effective_bps

    def round0_s(self, nbytes: int, ram_bytes: int) -> float:
        return ram_bytes / self.scan_bps + self.send_s(nbytes)

    def capped(self, cap_bps: float | None) -> LinkModel:
        return replace(self, cap_bps=cap_bps)

    @classmethod
    def fit(cls, trace: Trace) -> LinkModel:
        """Least squares of duration on bytes over the trace's rounds after round 0 (which
        scans all RAM), the final copy included: it moves pages the same way, and in a run
        that converged at once it is the only sample. Rounds under `MIN_SAMPLE_BYTES` time
        fixed overhead, not the link, and count only when no round is larger (the engine's
        rule for its estimate). Round 0 then gives the scan rate. With fewer than two
        distinct rounds, a plain rate with no overhead."""
        rounds = trace.rounds
        if not rounds:
            raise ExperimentError("a trace without rounds has no bandwidth to fit")
        timed = [(r.sent_bytes, r.duration_ms / 1e3) for r in rounds[1:] if r.sent_bytes and r.duration_ms > 0]
        samples = [s for s in timed if s[0] >= MIN_SAMPLE_BYTES] or timed
        if not samples:
            samples = [(r.sent_bytes, r.duration_ms / 1e3) for r in rounds if r.sent_bytes and r.duration_ms > 0]
        x = np.array([s[0] for s in samples], dtype=float)
        y = np.array([s[1] for s in samples], dtype=float)
        slope, overhead = _line(x, y)
        if slope <= 0:
            slope, overhead = float(y.sum() / x.sum()), 0.0
        bps = 1 / slope
        r0 = rounds[0]
        scan_time = r0.duration_ms / 1e3 - (overhead + r0.sent_bytes * slope)
        ram = trace.header.ram_bytes
        scan = ram / scan_time if scan_time > 0 else cls.scan_bps
        return cls(bps, overhead, scan, trace.header.bandwidth_cap)


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Slope and intercept of y on x by least squares, the intercept kept at or above zero."""
    if len(x) >= 2 and np.ptp(x) > 0:
        slope, icpt = np.polyfit(x, y, 1)
        if icpt >= 0:
            return float(slope), float(icpt)
    return float((x @ y) / (x @ x)) if x.any() else 0.0, 0.0


@dataclass(frozen=True)
class CollectModel:
    """A collect takes per_gib_s for each GiB of RAM (the page-table walk) plus per_page_s for
    each dirty page it reports."""

    per_gib_s: float = 0.002
    per_page_s: float = 0.0

    def __post_init__(self) -> None:
        if self.per_gib_s < 0 or self.per_page_s < 0:
            raise ExperimentError("collect costs cannot be negative")

    def seconds(self, dirty_pages: int, ram_bytes: int) -> float:
        return self.per_gib_s * ram_bytes / GIB + self.per_page_s * dirty_pages

    @classmethod
    def fit(cls, trace: Trace) -> CollectModel:
        """Least squares of collect time on dirty pages over the trace's precopy collects, as
        the decision after each measured it: what the policy is shown. The final collect runs
        with the guest stopped and is timed by its step (`StepCosts`); its time here is the
        gap to the final harvest, so it counts only in a trace that has no other."""
        ram_gib = trace.header.ram_bytes / GIB
        got = [(int(d.data["pending-pages"]), float(d.data["collect-ms"]) / 1e3) for d in trace.decisions]
        if not got:
            got = [(c.dirty_pages, c.collect_ms / 1e3) for c in trace.of(Collect) if c.collect_ms is not None]
        if not got:
            return cls()
        x = np.array([g[0] for g in got], dtype=float)
        y = np.array([g[1] for g in got], dtype=float)
        if len(x) >= 2 and np.ptp(x) > 0:
            per_page, base = _line(x, y)
            if per_page >= 0:
                return cls(base / ram_gib, per_page)
        return cls(float(y.mean()) / ram_gib, 0.0)


# -- the steps ----------------------------------------------------------------------------------
#: Every action the sequence emits, by the name a trace's `step` records give it.
ACTIONS = frozenset(t.__name__ for t in typing.get_args(seq.Action))
FINAL = ":final"  # the suffix of the final collect's and final copy's keys


def step_key(action: str, final: bool = False) -> str:
    """The name a step's cost goes by: the action's, the final collect and copy apart (the
    guest is stopped for them, so they cost what they cost, not what a precopy one does)."""
    return action + FINAL if final else action


@dataclass(frozen=True)
class StepSpan:
    """One step of a recorded run: from its `step` record to the next one (the last to the end)."""

    key: str
    start_s: float
    end_s: float
    data: dict[str, Any] = field(repr=False)

    @property
    def seconds(self) -> float:
        return self.end_s - self.start_s


def step_spans(trace: Trace) -> list[StepSpan]:
    """The run's steps in order (a `throttle` record is the Throttle step's). The first counts
    from the migration's start, so the spans add up to the recorded total; a trace without
    an end stops at its last step."""
    marks = [r for r in trace.records if isinstance(r, (Step, Throttle))]
    end = trace.end
    out = []
    for i, rec in enumerate(marks):
        stop = marks[i + 1].t if i + 1 < len(marks) else end.t if end is not None else None
        if stop is None:
            break
        start = 0.0 if i == 0 else rec.t
        data = rec.data if isinstance(rec, Step) else {"level": rec.level}
        key = step_key(rec.action, bool(data.get("final"))) if isinstance(rec, Step) else "Throttle"
        out.append(StepSpan(key, start, stop, data))
    return out


@dataclass(frozen=True)
class StepCosts:
    """What each step takes besides what the link and collect models charge for it: a step of
    `key` takes max(0, its modelled part + seconds[key]) (a key not given: its modelled part,
    or nothing). `resume_s` is the part of AwaitCompletion before the destination's RESUME
    (downtime ends there); the rest of it, until both QEMUs say completed, is
    seconds["AwaitCompletion"]. The defaults are placeholders for a scenario nobody measured:
    10 ms from the decision to QEMU's STOP, 20 ms from the final copy to RESUME."""

    seconds: Mapping[str, float] = field(default_factory=lambda: {"Migrate": 0.01})
    resume_s: float = 0.02

    def __post_init__(self) -> None:
        unknown = sorted(k for k in self.seconds if k.removesuffix(FINAL) not in ACTIONS)
        if unknown:
            raise ExperimentError(f"no step is called {', '.join(unknown)} (steps: {', '.join(sorted(ACTIONS))})")
        if self.resume_s < 0 or not all(math.isfinite(v) for v in self.seconds.values()):
            raise ExperimentError("step costs are finite and the time to RESUME is not negative")

    def spend(self, key: str, modelled_s: float = 0.0) -> float:
        """How long a step of `key` takes whose modelled part is `modelled_s`."""
        return max(0.0, modelled_s + self.seconds.get(key, 0.0))

    @classmethod
    def fit(cls, trace: Trace, link: LinkModel, collect: CollectModel) -> StepCosts:
        """Each key's mean of (step time - what `link` and `collect` charge for it with the
        recorded sizes), so a replay that sends and collects what the recording did takes
        its total time; AwaitCompletion's time to RESUME from the downtime, the guest
        stopping when `Migrate` ends (QEMU's STOP comes just before pre-switchover)."""
        spans = step_spans(trace)
        if not spans:
            return cls()
        ram, rounds = trace.header.ram_bytes, trace.rounds
        pending = {int(d.data["round"]): int(d.data["pending-pages"]) for d in trace.decisions}
        residuals: dict[str, list[float]] = {}
        sent = 0  # rounds the steps so far have sent
        stop = resume = None
        for span in spans:
            modelled = 0.0
            match span.key.removesuffix(FINAL), span.key.endswith(FINAL):
                case "SendRound0" | "SendPages", _ if sent < len(rounds):
                    r = rounds[sent]
                    modelled = link.round0_s(r.sent_bytes, ram) if sent == 0 else link.send_s(r.sent_bytes)
                    sent += 1
                case "Collect", False:
                    modelled = collect.seconds(pending.get(int(span.data["round"]), 0), ram)
                case "Collect", True if sent < len(rounds):
                    modelled = collect.seconds(rounds[sent].dirty_pages, ram)
                case "DevicesStopCopy", _:
                    stop = span.start_s
                case "AwaitCompletion", _:
                    resume = span
            residuals.setdefault(span.key, []).append(span.seconds - modelled)
        seconds = {k: float(np.mean(v)) for k, v in residuals.items()}
        downtime = trace.end.report.get("downtime_ms") if trace.end is not None else None
        resume_s = 0.0
        if resume is not None and stop is not None and downtime is not None:
            resume_s = min(max(0.0, stop + downtime / 1e3 - resume.start_s), resume.seconds)
            seconds["AwaitCompletion"] = float(np.mean(residuals["AwaitCompletion"])) - resume_s
        return cls(seconds, resume_s)
