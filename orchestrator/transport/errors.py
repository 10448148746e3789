"""The transport's one error root: everything the page stream, its sinks and its receiver
refuse or fail at is a `TransportError`."""


class TransportError(Exception):
    """Root of the transport's errors."""
