"""Page sinks: where precopy rounds send guest pages."""

from .base import OnSent, PageSink, SinkError
from .local import LocalSink

__all__ = ["LocalSink", "OnSent", "PageSink", "SinkError"]
