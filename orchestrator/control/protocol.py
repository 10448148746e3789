"""The server side of the QMP wire protocol as a sans-IO machine, in the h11 style.

Bytes go in with `receive_data`; `next_event()` gives what they meant: a `Command` for the
application to answer (`reply` / `error`), an `Answer` the connection made itself (a
malformed message, a command before negotiation, `qmp_capabilities`), or `NEED_DATA`. What to
send comes back as bytes, one message per line. A stack that already speaks QMP to QEMU reads
it with the same client: greeting first, capabilities negotiation (until `qmp_capabilities`
only that command is accepted, as QEMU does), the caller's `id` echoed on every answer,
events stamped with `timestamp {seconds, microseconds}`. Messages are cut from the stream by
bracket depth outside strings, so one may span lines or several share one; a message larger
than `MAX_MESSAGE` or nested deeper than `MAX_DEPTH` ends the connection (it cannot be
resynchronised), any other malformed input is answered and skipped.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.control.errors import ErrorClass
from orchestrator.encoding.plainjson import jsonable

MAX_MESSAGE = 1 << 20
MAX_DEPTH = 64
_WHITESPACE = b" \t\r\n"
_NO_ID = object()


class _Need(enum.Enum):
    NEED_DATA = "need data"


#: `next_event()` has nothing until more bytes arrive.
NEED_DATA = _Need.NEED_DATA


@dataclass(frozen=True)
class Command:
    """A command for the application; answer it with `reply` or `error`."""

    name: str
    arguments: dict[str, Any]
    id: Any = _NO_ID  # the caller's correlation value, any JSON; absent unless given

    @property
    def has_id(self) -> bool:
        return self.id is not _NO_ID


@dataclass(frozen=True)
class Answer:
    """What the connection answered by itself; send `data`. `negotiated`: this answered
    `qmp_capabilities` and events may flow from now on; `fatal`: close after sending."""

    data: bytes
    negotiated: bool = False
    fatal: bool = False


Event = Command | Answer | _Need


def _frame(message: Mapping[str, Any]) -> bytes:
    return json.dumps(jsonable(message), allow_nan=False, separators=(", ", ": ")).encode() + b"\r\n"


def _json_type(value: Any) -> str:
    match value:
        case bool():
            return "a boolean"
        case int() | float():
            return "a number"
        case str():
            return "a string"
        case list():
            return "an array"
        case None:
            return "null"
    return "an object"


class _Overflow:
    """A message beyond the size or nesting bound."""


class _Splitter:
    """Cuts complete top-level JSON texts out of a byte stream (bracket depth outside
    strings: quotes and brackets are ASCII, which no UTF-8 sequence contains)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0  # how far the message at the start of `buf` has been scanned
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def take(self) -> bytes | _Overflow | None:
        """The next complete text, None if it is still incomplete, `_Overflow` if too big."""
        buf = self.buf
        if self.depth == 0:  # between messages
            start = 0
            while start < len(buf) and buf[start] in _WHITESPACE:
                start += 1
            del buf[:start]
            if not buf:
                return None
            if buf[0] not in b"{[":
                end = buf.find(b"\n")  # a bare scalar or stray byte: up to the end of its line
                if end < 0:
                    return _Overflow() if len(buf) > MAX_MESSAGE else None
                text = bytes(buf[:end])
                del buf[: end + 1]
                return text
        while self.pos < len(buf):
            c = buf[self.pos]
            self.pos += 1
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == 0x5C:  # backslash
                    self.escaped = True
                elif c == 0x22:
                    self.in_string = False
            elif c == 0x22:
                self.in_string = True
            elif c in b"{[":
                self.depth += 1
                if self.depth > MAX_DEPTH:
                    return _Overflow()
            elif c in b"}]":
                self.depth -= 1
                if self.depth == 0:
                    text = bytes(buf[: self.pos])
                    del buf[: self.pos]
                    self.pos = 0
                    return text
        return _Overflow() if len(buf) > MAX_MESSAGE else None


class QmpConnection:
    """One client's connection. `version` goes into the greeting's `version` member; no
    capabilities are offered (no out-of-band execution)."""

    def __init__(self, version: Mapping[str, Any]) -> None:
        self.version = dict(version)
        self.negotiated = False
        self.closed = False  # a fatal error was answered: nothing more is read
        self._splitter = _Splitter()

    def greeting(self) -> bytes:
        return _frame({"QMP": {"version": self.version, "capabilities": []}})

    def receive_data(self, data: bytes) -> None:
        if not self.closed:
            self._splitter.buf += data

    def next_event(self) -> Event:
        if self.closed:
            return NEED_DATA
        text = self._splitter.take()
        if text is None:
            return NEED_DATA
        if isinstance(text, _Overflow):
            self.closed = True
            limit = f"larger than {MAX_MESSAGE} bytes or nested deeper than {MAX_DEPTH}"
            return Answer(self._error_frame(_NO_ID, ErrorClass.GENERIC, f"a message {limit}: closing"), fatal=True)
        try:
            message = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            return Answer(self._error_frame(_NO_ID, ErrorClass.GENERIC, f"JSON parse error: {exc}"))
        return self._dispatch(message)

    def _dispatch(self, message: Any) -> Event:
        if not isinstance(message, dict):
            return self._refuse(_NO_ID, f"a QMP message must be a JSON object, not {_json_type(message)}")
        ident = message.get("id", _NO_ID)
        unexpected = sorted(set(message) - {"execute", "exec-oob", "arguments", "id"})
        if unexpected:
            return self._refuse(ident, f"unexpected member '{unexpected[0]}' in a QMP command")
        if "exec-oob" in message:
            return self._refuse(ident, "out-of-band execution is not offered (the greeting lists no 'oob')")
        name = message.get("execute")
        if name is None:
            return self._refuse(ident, "a QMP command needs an 'execute' member")
        if not isinstance(name, str):
            return self._refuse(ident, f"'execute' must be a string, not {_json_type(name)}")
        arguments = message.get("arguments", {})
        if not isinstance(arguments, dict):
            return self._refuse(ident, f"'arguments' must be an object, not {_json_type(arguments)}")
        if name == "qmp_capabilities":
            return self._capabilities(ident, arguments)
        if not self.negotiated:
            return self._refuse(
                ident,
                f"'{name}' before capabilities negotiation: send 'qmp_capabilities' first",
                ErrorClass.COMMAND_NOT_FOUND,
            )
        return Command(name, arguments, ident)

    def _capabilities(self, ident: Any, arguments: dict[str, Any]) -> Answer:
        if self.negotiated:
            return self._refuse(ident, "capabilities negotiation is already complete", ErrorClass.COMMAND_NOT_FOUND)
        extra = sorted(set(arguments) - {"enable"})
        if extra:
            return self._refuse(ident, f"qmp_capabilities takes no parameter '{extra[0]}'")
        enable = arguments.get("enable", [])
        if not isinstance(enable, list) or not all(isinstance(c, str) for c in enable):
            return self._refuse(ident, "qmp_capabilities: 'enable' must be an array of capability names")
        if enable:
            return self._refuse(ident, f"capability '{enable[0]}' is not offered (the greeting lists none)")
        self.negotiated = True
        return Answer(self._reply_frame(ident, {}), negotiated=True)

    def _refuse(self, ident: Any, desc: str, error_class: ErrorClass = ErrorClass.GENERIC) -> Answer:
        return Answer(self._error_frame(ident, error_class, desc))

    def reply(self, command: Command, value: Any) -> bytes:
        """The success answer to `command`: `{"return": value}`, with its id."""
        return self._reply_frame(command.id, value)

    def error(self, command: Command, error_class: ErrorClass, desc: str) -> bytes:
        return self._error_frame(command.id, error_class, desc)

    def event(self, name: str, data: Mapping[str, Any], wall_s: float) -> bytes:
        """An asynchronous event; QMP sends events only once capabilities are negotiated."""
        if not self.negotiated:
            raise RuntimeError("QMP sends no events before capabilities negotiation")
        seconds = math.floor(wall_s)
        stamp = {"seconds": seconds, "microseconds": min(999_999, round((wall_s - seconds) * 1e6))}
        return _frame({"event": name, "data": data, "timestamp": stamp})

    @staticmethod
    def _reply_frame(ident: Any, value: Any) -> bytes:
        return _frame({"return": value} if ident is _NO_ID else {"return": value, "id": ident})

    @staticmethod
    def _error_frame(ident: Any, error_class: ErrorClass, desc: str) -> bytes:
        error = {"error": {"class": error_class.value, "desc": desc}}
        return _frame(error if ident is _NO_ID else {**error, "id": ident})
