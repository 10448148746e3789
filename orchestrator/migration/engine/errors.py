"""The engine's one error root."""


class EngineError(Exception):
    """Root of the engine's errors."""


class PolicyError(EngineError, ValueError):
    """A policy asked for with settings it cannot work with."""
