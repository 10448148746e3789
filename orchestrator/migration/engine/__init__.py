"""Sans-IO precopy engine, convergence policies and the migration's sequence."""

from orchestrator.migration.engine.errors import EngineError, PolicyError
from orchestrator.migration.engine.policies import DowntimeRamp, ProgressTimeouts, StallDetection
from orchestrator.migration.engine.policy import Decision, DowntimePolicy, Observation, OnLimit, Policy, Verdict
from orchestrator.migration.engine.precopy import PrecopyEngine
from orchestrator.migration.engine.records import RoundRecord
from orchestrator.migration.engine.sequence import (
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
    "DowntimeRamp",
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
    "PolicyError",
    "PrecopyEngine",
    "ProgressTimeouts",
    "RoundRecord",
    "StallDetection",
    "Verdict",
]
