"""The trackers' one error root. A tracker's own failures during a migration never escape the
tracker set (they become all-dirty fallbacks); these are the ones its users see."""


class TrackerError(Exception):
    """Root of the trackers' errors."""


class TrackerSetupError(TrackerError, ValueError):
    """A tracker cannot be set up as asked (no plugin attached, a log that does not fit the
    layout, a page size that differs): raised before anything is tracked."""
