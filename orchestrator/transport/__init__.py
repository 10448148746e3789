"""Page sinks: where precopy rounds send guest pages."""

from orchestrator.transport.base import OnSent, PageSink, SinkError
from orchestrator.transport.local import LocalSink

__all__ = ["LocalSink", "OnSent", "PageSink", "SinkError"]
