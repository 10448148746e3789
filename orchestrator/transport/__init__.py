"""Page sinks: where precopy rounds send guest pages."""

from .local import LocalSink, SinkError

__all__ = ["LocalSink", "SinkError"]
