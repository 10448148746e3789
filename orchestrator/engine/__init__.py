"""Sans-IO precopy engine, convergence policies and the migration's sequence."""

from .policy import Decision, DowntimePolicy, Observation, OnLimit, Policy, Verdict
from .precopy import PrecopyEngine, RoundRecord
from .sequence import (
    EngineError,
    GuestHome,
    MigrationSequence,
    MigrationStatus,
    Outcome,
    OutOfOrder,
    Phase,
)

__all__ = [
    "Decision",
    "DowntimePolicy",
    "EngineError",
    "GuestHome",
    "MigrationSequence",
    "MigrationStatus",
    "Observation",
    "OnLimit",
    "OutOfOrder",
    "Outcome",
    "Phase",
    "Policy",
    "PrecopyEngine",
    "RoundRecord",
    "Verdict",
]
