"""What a running migration tells whoever watches it: one event stream for every consumer.

The CLI's progress lines, traces, metrics and the control socket all read the same events,
named like QEMU's where they mean the same (`MIGRATION` on a status change, `MIGRATION_PASS`
per round) so a management stack reads them as it reads QEMU's. Listeners are called on the
event loop's thread, in order, and must not block (one that raises is logged and the
migration goes on); `subscribe()` gives an async iterator
whose queue is bounded, so a consumer that stops reading loses its oldest events (counted),
never stalls the migration.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from orchestrator.migration.engine.policy import Observation, Verdict


class EventName(enum.StrEnum):
    MIGRATION = "MIGRATION"  # the job status changed: {"status": JobStatus value}
    MIGRATION_PASS = "MIGRATION_PASS"  # a round was sent: {"pass": n, and the round's record}
    DECISION = "ORCH_DECISION"  # the policy decided after a collect: what it saw and said
    TRACKER = "ORCH_TRACKER"  # a tracker started, failed, fell back, restarted, went perma-dirty
    STEP = "ORCH_STEP"  # the driver began an action of the sequence (switchover steps, throttle)
    CONTROL = "ORCH_CONTROL"  # a caller steered: {command: set-parameters|force-switchover|cancel, ...}
    HARVEST = "ORCH_HARVEST"  # a round's dirty pages were harvested: {round, pages, final}; record: the page numbers


@dataclass(frozen=True)
class MigrationEvent:
    name: EventName
    data: dict[str, Any]
    elapsed_s: float  # since the migration started, on its monotonic clock
    wall_s: float = field(default_factory=time.time)  # for QMP's timestamp
    record: object | None = None  # the typed object behind `data` (RoundRecord, TrackerEvent, ...)


def decision_data(obs: Observation, verdict: Verdict) -> dict[str, Any]:
    """ORCH_DECISION's data: what the policy saw after a collect and what it said."""
    return {
        "round": obs.round,
        "decision": verdict.decision.value,
        "reason": verdict.reason,
        "pending-pages": obs.pending_pages,
        "device-bytes": obs.device_bytes,
        "expected-downtime-ms": obs.expected_downtime_s * 1e3,
        "collect-ms": obs.collect_s * 1e3,
        "bandwidth-bps": obs.bandwidth_bps,
        "throttle": verdict.throttle,
    }


Listener = Callable[[MigrationEvent], None]
log = logging.getLogger(__name__)


class EventStream:
    """One subscriber's events; iterate with `async for`, ends after the migration's last."""

    def __init__(self, hub: EventHub, maxsize: int) -> None:
        self._hub = hub
        self._queue: asyncio.Queue[MigrationEvent | None] = asyncio.Queue(maxsize)
        self.dropped = 0  # events lost because the subscriber fell behind

    def put(self, event: MigrationEvent | None) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(event)

    def close(self) -> None:
        self._hub.unsubscribe(self)

    def __aiter__(self) -> AsyncIterator[MigrationEvent]:
        return self

    async def __anext__(self) -> MigrationEvent:
        event = await self._queue.get()
        if event is None:
            raise StopAsyncIteration
        return event


class EventHub:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._listeners: list[Listener] = []
        self._streams: list[EventStream] = []
        self.closed = False
        #: Every event, for a subscriber that comes late; a harvest's page numbers only reach
        #: those listening when it happens (kept, they would grow with every round's dirty set).
        self.history: list[MigrationEvent] = []

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def subscribe(self, maxsize: int = 1024, replay: bool = False) -> EventStream:
        """A stream of events from now on (`replay`: from the first). After the end it is
        empty and finishes at once."""
        stream = EventStream(self, maxsize)
        for ev in self.history if replay else ():
            stream.put(ev)
        if self.closed:
            stream.put(None)
        else:
            self._streams.append(stream)
        return stream

    def unsubscribe(self, stream: EventStream) -> None:
        if stream in self._streams:
            self._streams.remove(stream)

    def emit(self, name: EventName, data: dict[str, Any], record: object | None = None) -> MigrationEvent:
        event = MigrationEvent(name, data, self._clock(), record=record)
        self.history.append(event if name is not EventName.HARVEST else replace(event, record=None))
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a watcher's bug must not break the migration it watches
                log.exception("an event listener failed on %s", name.value)
        for stream in self._streams:
            stream.put(event)
        return event

    def close(self) -> None:
        """The migration has ended: every stream finishes after what it holds."""
        self.closed = True
        for stream in self._streams:
            stream.put(None)
        self._streams.clear()
