"""The experiments room's error root: bad workloads, sweep specs, plot inputs."""


class ExperimentError(ValueError):
    """A simulation, sweep or plot asked for with input it cannot use; the message names it."""
