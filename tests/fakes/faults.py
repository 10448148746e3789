"""One way to say "this step goes wrong" for every double: a step name, what happens, and on
which occurrence."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Act(enum.Enum):
    FAIL = "fail"  # refused: a QMP error, a device error, a sink error
    DIE = "die"  # the QEMU process dies before the step: no reply, the connection closes
    DIE_AFTER = "die-after"  # the step happens (its reply or event arrives), then the process dies
    SHUTDOWN = "shutdown"  # the QEMU shuts down (SHUTDOWN event, then it exits) instead of the step


@dataclass
class Fault:
    #: A QMP command ("migrate"), an event ("STOP", "RESUME", "MIGRATION:pre-switchover"), a
    #: device transition ("dst:RESUMING") or a sink call ("send_pages").
    at: str
    act: Act = Act.FAIL
    nth: int = 1  # the nth time the step happens


@dataclass
class Faults:
    pending: list[Fault] = field(default_factory=list)
    _seen: dict[str, int] = field(default_factory=dict)

    def take(self, step: str) -> Fault | None:
        """The fault planned for this occurrence of `step`, if any; each fires once."""
        self._seen[step] = self._seen.get(step, 0) + 1
        for fault in self.pending:
            if fault.at == step and fault.nth == self._seen[step]:
                self.pending.remove(fault)
                return fault
        return None
