"""Sans-IO precopy engine and convergence policies."""

from .policy import Decision, DowntimePolicy, Observation, Policy, Verdict
from .precopy import PrecopyEngine, RoundRecord

__all__ = ["Decision", "DowntimePolicy", "Observation", "Policy", "PrecopyEngine", "RoundRecord", "Verdict"]
