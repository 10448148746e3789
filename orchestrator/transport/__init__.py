"""Page sinks: where precopy rounds send guest pages."""

from .base import OnSent, PageSink
from .local import LocalSink, SinkError

__all__ = ["LocalSink", "OnSent", "PageSink", "SinkError"]
