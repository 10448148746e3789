"""The lab's one error root: a demo or test set-up asked for something it cannot give."""


class LabError(ValueError):
    """A workload, device kind, fault plan, size or accelerator that cannot be had; the
    message names it and what can be chosen instead."""
