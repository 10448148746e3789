"""The QMP server side without I/O: greeting, negotiation, framing, ids, errors, events."""

from __future__ import annotations

import enum
import json
from typing import Any

import pytest

from orchestrator.control.errors import ErrorClass
from orchestrator.control.protocol import MAX_DEPTH, MAX_MESSAGE, NEED_DATA, Answer, Command, QmpConnection, jsonable

VERSION = {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "test"}


def connection(negotiated: bool = True) -> QmpConnection:
    conn = QmpConnection(VERSION)
    if negotiated:
        conn.receive_data(b'{"execute": "qmp_capabilities"}\n')
        answer = conn.next_event()
        assert isinstance(answer, Answer) and answer.negotiated
    return conn


def decoded(data: bytes) -> dict[str, Any]:
    assert data.endswith(b"\r\n") and data.count(b"\n") == 1, data  # one message per line
    return json.loads(data)


def events(conn: QmpConnection, data: bytes) -> list[Any]:
    conn.receive_data(data)
    out = []
    while (ev := conn.next_event()) is not NEED_DATA:
        out.append(ev)
    return out


def answer_of(conn: QmpConnection, data: bytes) -> dict[str, Any]:
    (ev,) = events(conn, data)
    assert isinstance(ev, Answer), ev
    return decoded(ev.data)


def test_greeting_offers_no_capabilities() -> None:
    greeting = decoded(QmpConnection(VERSION).greeting())
    assert greeting == {"QMP": {"version": VERSION, "capabilities": []}}


def test_before_negotiation_only_qmp_capabilities_is_accepted() -> None:
    conn = connection(negotiated=False)
    err = answer_of(conn, b'{"execute": "query-migrate", "id": 7}')
    assert err["error"]["class"] == ErrorClass.COMMAND_NOT_FOUND and err["id"] == 7
    assert "qmp_capabilities" in err["error"]["desc"] and not conn.negotiated
    with pytest.raises(RuntimeError):
        conn.event("MIGRATION", {}, 0.0)  # and no events yet
    ok = answer_of(conn, b'{"execute": "qmp_capabilities", "arguments": {}, "id": "n"}')
    assert ok == {"return": {}, "id": "n"} and conn.negotiated
    again = answer_of(conn, b'{"execute": "qmp_capabilities"}')
    assert again["error"]["class"] == ErrorClass.COMMAND_NOT_FOUND and "already" in again["error"]["desc"]
    (cmd,) = events(conn, b'{"execute": "query-migrate", "id": 8}')
    assert cmd == Command("query-migrate", {}, 8)


@pytest.mark.parametrize(
    "arguments,needle",
    [({"enable": ["oob"]}, "'oob' is not offered"), ({"enable": "oob"}, "array"), ({"x": 1}, "parameter 'x'")],
)
def test_negotiation_refuses_what_is_not_offered(arguments: dict[str, Any], needle: str) -> None:
    conn = connection(negotiated=False)
    err = answer_of(conn, json.dumps({"execute": "qmp_capabilities", "arguments": arguments}).encode())
    assert needle in err["error"]["desc"] and not conn.negotiated


def test_ids_of_any_json_type_are_echoed_and_absent_ones_stay_absent() -> None:
    conn = connection()
    for ident in ("a", 3, None, [1, {"x": 2}], {"k": "v"}):
        (cmd,) = events(conn, json.dumps({"execute": "query-commands", "id": ident}).encode())
        assert isinstance(cmd, Command) and cmd.has_id
        assert decoded(conn.reply(cmd, [1]))["id"] == ident
        assert decoded(conn.error(cmd, ErrorClass.GENERIC, "no"))["id"] == ident
    (cmd,) = events(conn, b'{"execute": "query-commands"}')
    assert not cmd.has_id and "id" not in decoded(conn.reply(cmd, {}))


def test_messages_split_anywhere_and_several_on_one_line() -> None:
    conn = connection()
    text = b'{"execute": "a", "arguments": {"s": "}{\\" ]["}}{"execute":\n"b"}  {"execute": "c", "id": 1}'
    got: list[Any] = []
    for i in range(len(text)):  # one byte at a time: every split point
        got += events(conn, text[i : i + 1])
    assert [c.name for c in got] == ["a", "b", "c"]
    assert got[0].arguments == {"s": '}{" ]['}


def test_utf8_inside_strings_is_kept() -> None:
    conn = connection()
    (cmd,) = events(conn, json.dumps({"execute": "x", "arguments": {"p": "/tmp/ü{"}}, ensure_ascii=False).encode())
    assert cmd.arguments == {"p": "/tmp/ü{"}


@pytest.mark.parametrize(
    "data,needle",
    [
        (b"[1, 2]", "must be a JSON object, not an array"),
        (b"42\n", "must be a JSON object, not a number"),
        (b'{"execute": }', "JSON parse error"),
        (b'{"arguments": {}}', "needs an 'execute'"),
        (b'{"execute": 1}', "'execute' must be a string"),
        (b'{"execute": "x", "arguments": []}', "'arguments' must be an object"),
        (b'{"execute": "x", "extra": 1}', "unexpected member 'extra'"),
        (b'{"exec-oob": "x"}', "out-of-band"),
        (b'{"execute": "x", "id": "\xff"}', "JSON parse error"),
    ],
)
def test_malformed_input_is_answered_and_the_next_message_still_works(data: bytes, needle: str) -> None:
    conn = connection()
    err = answer_of(conn, data)
    assert err["error"]["class"] == ErrorClass.GENERIC and needle in err["error"]["desc"], err
    (cmd,) = events(conn, b'{"execute": "after"}')
    assert cmd.name == "after"


def test_an_id_is_echoed_on_a_protocol_error_too() -> None:
    err = answer_of(connection(), b'{"execute": "x", "arguments": 1, "id": "z"}')
    assert err["id"] == "z" and "error" in err


@pytest.mark.parametrize("data", [b"[" * (MAX_DEPTH + 1), b'{"execute": "' + b"x" * (MAX_MESSAGE + 1)])
def test_an_oversized_message_ends_the_connection(data: bytes) -> None:
    conn = connection()
    (ev,) = events(conn, data)
    assert isinstance(ev, Answer) and ev.fatal and "closing" in decoded(ev.data)["error"]["desc"]
    assert events(conn, b'{"execute": "x"}') == []  # nothing more is read


def test_a_message_at_the_bounds_is_accepted() -> None:
    """Negative control for the bounds: the deepest and the largest allowed still parse."""
    deep = b'{"execute": "d", "arguments": {"a": ' + b"[" * (MAX_DEPTH - 2) + b"]" * (MAX_DEPTH - 2) + b"}}"
    (cmd,) = events(connection(), deep)
    assert cmd.name == "d"
    pad = MAX_MESSAGE - len(b'{"execute": "big", "arguments": {"p": ""}}')
    big = b'{"execute": "big", "arguments": {"p": "' + b"x" * pad + b'"}}'
    (cmd,) = events(connection(), big)
    assert cmd.name == "big" and len(cmd.arguments["p"]) == pad


def test_events_carry_qmp_timestamps() -> None:
    ev = decoded(connection().event("MIGRATION", {"status": "active"}, 1700000000.25))
    assert ev == {
        "event": "MIGRATION",
        "data": {"status": "active"},
        "timestamp": {"seconds": 1700000000, "microseconds": 250000},
    }


class Colour(enum.StrEnum):
    RED = "red"


def test_jsonable_makes_plain_json() -> None:
    value = {"e": Colour.RED, "t": (1, 2.5), "inf": float("inf"), "nan": float("nan"), 3: object}
    out = jsonable(value)
    assert out["e"] == "red" and out["t"] == [1, 2.5] and out["inf"] is None and out["nan"] is None
    assert out["3"].startswith("<class") and json.dumps(out, allow_nan=False)
