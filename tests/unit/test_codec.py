"""codec: strict JSON lines in, request objects out; events out as wire dicts."""

from __future__ import annotations

import json
from typing import Any

import attrs
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trichat import codec, errors, messages
from trichat.codec import decode, encode
from trichat.errors import ProtocolError
from trichat.messages import REQUEST_TYPES

DECODE_CODES = {errors.BAD_JSON, errors.BAD_REQUEST, errors.UNKNOWN_TYPE}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()  # beyond 64 bits too
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
valid_ids = st.integers(-(2**63), 2**64 - 1) | st.text(max_size=codec.MAX_ID_CHARS)


def line(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode()


def decode_error(raw: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(raw)
    return info.value


def is_required(field: attrs.Attribute[Any]) -> bool:
    return field.default is attrs.NOTHING


def test_every_request_field_is_a_string() -> None:
    # The strategies below build requests from this assumption; a new kind of field
    # (an int, a list) needs its own strategy and strictness tests.
    for cls in REQUEST_TYPES.values():
        for field in attrs.fields(cls):
            required = field.type in (str, "str")
            assert required or field.type in (str | None, "str | None"), (cls, field.name)
            assert is_required(field) == required


@st.composite
def wire_requests(draw: st.DrawFn) -> tuple[dict[str, Any], Any, codec.RequestId]:
    """A valid request as a client would write it, and what decode must give for it."""
    cls = draw(st.sampled_from(sorted(REQUEST_TYPES.values(), key=lambda c: c.TYPE)))
    body: dict[str, Any] = {"type": cls.TYPE}
    kwargs: dict[str, Any] = {}
    for field in attrs.fields(cls):
        if is_required(field):
            kwargs[field.name] = body[field.name] = draw(st.text())
        else:
            how = draw(st.sampled_from(["omit", "null", "value"]))
            if how == "null":
                body[field.name] = None
            elif how == "value":
                kwargs[field.name] = body[field.name] = draw(st.text())
    req_id = draw(st.none() | valid_ids)
    if req_id is not None or draw(st.booleans()):
        body["id"] = req_id
    # Unknown extra fields are ignored (contract "The line protocol").
    extras = draw(st.dictionaries(st.text(), json_values, max_size=3))
    for key, value in extras.items():
        body.setdefault(key, value)
    order = draw(st.permutations(list(body)))
    return {k: body[k] for k in order}, cls(**kwargs), req_id


@given(wire_requests())
def test_decode_round_trips_every_request_type(
    case: tuple[dict[str, Any], Any, codec.RequestId],
) -> None:
    body, expected, req_id = case
    assert decode(line(body)) == (expected, req_id)


@given(st.binary())
def test_arbitrary_bytes_never_raise_anything_but_protocol_error(raw: bytes) -> None:
    try:
        decode(raw)
    except ProtocolError as exc:
        assert exc.code in DECODE_CODES


@given(json_values)
def test_arbitrary_json_values_never_raise_anything_but_protocol_error(value: Any) -> None:
    try:
        request, _ = decode(line(value))
    except ProtocolError as exc:
        assert exc.code in DECODE_CODES
        if not isinstance(value, dict):
            assert exc.code == errors.BAD_JSON
    else:
        assert isinstance(value, dict)
        assert isinstance(request, REQUEST_TYPES[value["type"]])


def expected_outcome(body: dict[str, Any]) -> str:
    """The error code a request object must get, or "ok": an independent statement of the
    rules (contract "The line protocol": string fields, string or integer ids)."""
    req_id = body.get("id")
    if req_id is not None and not (
        type(req_id) is int or (type(req_id) is str and len(req_id) <= codec.MAX_ID_CHARS)
    ):
        return errors.BAD_REQUEST
    kind = body.get("type")
    if kind is None:
        return errors.BAD_REQUEST
    if type(kind) is not str or kind not in REQUEST_TYPES:
        return errors.UNKNOWN_TYPE
    for field in attrs.fields(REQUEST_TYPES[kind]):
        value = body.get(field.name)
        if value is None and is_required(field):
            return errors.BAD_REQUEST
        if value is not None and type(value) is not str:
            return errors.BAD_REQUEST
    return "ok"


field_names = sorted({f.name for cls in REQUEST_TYPES.values() for f in attrs.fields(cls)})
typed_bodies = st.fixed_dictionaries(
    {"type": st.sampled_from(sorted(REQUEST_TYPES)) | json_values},
    optional={
        "id": st.none() | valid_ids | json_values,
        **{name: st.text() | json_values for name in field_names},
    },
)


@given(typed_bodies)
def test_decode_is_exactly_as_strict_as_the_contract(body: dict[str, Any]) -> None:
    outcome = expected_outcome(body)
    try:
        request, req_id = decode(line(body))
    except ProtocolError as exc:
        assert exc.code == outcome
    else:
        assert outcome == "ok"
        assert req_id == body.get("id")
        for field in attrs.fields(type(request)):
            assert getattr(request, field.name) == body.get(field.name)


# --- strictness, one case at a time -----------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"type": "send", "to": "bob", "text": 5}, "text"),
        ({"type": "send", "to": "bob", "text": True}, "text"),
        ({"type": "send", "to": "bob", "text": ["hi"]}, "text"),
        ({"type": "send", "to": 7, "text": "hi"}, "to"),
        ({"type": "send", "to": "bob"}, "text"),
        ({"type": "send", "to": "bob", "text": None}, "text"),
        ({"type": "login"}, "user"),
        ({"type": "login", "user": "bob", "password": 1234}, "password"),
        ({"type": "register", "user": "bob"}, "password"),
        ({"type": "received", "msg": 12}, "msg"),
        ({"type": "users", "after": 3}, "after"),
        ({"type": "status"}, "user"),
    ],
)
def test_missing_or_mistyped_fields_are_bad_request_naming_the_field(
    body: dict[str, Any], field: str
) -> None:
    exc = decode_error(line(body))
    assert exc.code == errors.BAD_REQUEST
    assert f"'{field}'" in exc.message


def test_missing_type_is_bad_request() -> None:
    assert decode_error(b'{"to": "bob", "text": "hi"}').code == errors.BAD_REQUEST


@pytest.mark.parametrize("kind", ["shout", "SEND", "help", "", 5, ["send"]])
def test_unknown_type_is_unknown_type(kind: Any) -> None:
    # "help" is a text-mode command only; JSON clients never send it.
    assert decode_error(line({"type": kind})).code == errors.UNKNOWN_TYPE


@pytest.mark.parametrize("raw", [b"[]", b'"ping"', b"1", b"null", b"true", b'[{"type":"ping"}]'])
def test_a_line_that_is_not_an_object_is_bad_json(raw: bytes) -> None:
    assert decode_error(raw).code == errors.BAD_JSON


@pytest.mark.parametrize(
    "raw",
    [b"", b"   ", b"{", b"{'type': 'ping'}", b'{"type": "ping"} x', b'{"type":"ping","id":NaN}'],
)
def test_malformed_json_is_bad_json(raw: bytes) -> None:
    assert decode_error(raw).code == errors.BAD_JSON


def test_invalid_utf8_is_bad_json_saying_so() -> None:
    exc = decode_error(b'{"type": "send", "to": "bob", "text": "caf\xe9"}')
    assert exc.code == errors.BAD_JSON
    assert "UTF-8" in exc.message


def test_lone_surrogate_escape_is_bad_json() -> None:
    assert decode_error(b'{"type": "send", "to": "bob", "text": "\\ud800"}').code == "bad_json"


def test_huge_numbers_are_refused_not_crashing() -> None:
    for raw in [
        b'{"type": "ping", "id": 100000000000000000000000000000}',
        b'{"type": "ping", "id": 1e400}',
        b'{"type": "send", "to": "bob", "text": 123456789012345678901234567890}',
    ]:
        assert decode_error(raw).code in (errors.BAD_JSON, errors.BAD_REQUEST)
    # The largest 64-bit ids are still echoed exactly.
    for big in (2**64 - 1, -(2**63)):
        assert decode(line({"type": "ping", "id": big})) == (messages.PingRequest(), big)


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 10000,
        b"{" * 10000,
        b'{"type": "send", "to": "bob", "text": ' + b"[" * 10000 + b"]" * 10000 + b"}",
        b'{"type": "ping", "x": ' + b'{"a":' * 10000 + b"1" + b"}" * 10001,
    ],
)
def test_deep_nesting_is_bad_json_without_crashing(raw: bytes) -> None:
    assert decode_error(raw).code == errors.BAD_JSON


def test_unknown_extra_fields_are_ignored() -> None:
    raw = line({"type": "send", "to": "bob", "text": "hi", "priority": [1, {"x": None}]})
    assert decode(raw) == (messages.SendRequest("bob", "hi"), None)


def test_text_keeps_every_character() -> None:
    text = "line1\nline2\t\u00e9\U0001f600\x00"
    assert decode(line({"type": "broadcast", "text": text}))[0].text == text


# --- id echo ------------------------------------------------------------------------


@pytest.mark.parametrize("req_id", ["abc", "", 0, 7, -1, "x" * codec.MAX_ID_CHARS])
def test_valid_ids_are_returned_for_the_reply(req_id: Any) -> None:
    assert decode(line({"type": "ping", "id": req_id})) == (messages.PingRequest(), req_id)


def test_absent_or_null_id_is_none() -> None:
    assert decode(b'{"type": "ping"}')[1] is None
    assert decode(b'{"type": "ping", "id": null}')[1] is None


@pytest.mark.parametrize("req_id", [True, False, 1.5, 2.0, [], {}, ["a"], "x" * 129])
def test_ids_of_the_wrong_kind_are_bad_request(req_id: Any) -> None:
    exc = decode_error(line({"type": "ping", "id": req_id}))
    assert exc.code == errors.BAD_REQUEST
    assert "'id'" in exc.message
    assert getattr(exc, "req_id", None) is None  # nothing sane to echo


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"type": "nope", "id": "q1"}, errors.UNKNOWN_TYPE),
        ({"type": "send", "to": "bob", "id": "q1"}, errors.BAD_REQUEST),
        ({"id": "q1"}, errors.BAD_REQUEST),
    ],
)
def test_errors_after_the_id_was_read_carry_it(body: dict[str, Any], code: str) -> None:
    exc = decode_error(line(body))
    assert exc.code == code
    assert exc.req_id == "q1"  # type: ignore[attr-defined]


def test_bad_json_carries_no_id() -> None:
    exc = decode_error(b'{"type": "ping", "id": "q1"')
    assert getattr(exc, "req_id", None) is None


@pytest.mark.parametrize(
    ("raw", "req_id"),
    [
        (b'{"type": "ping", "id": "p1"}', "p1"),
        (b'{"id": 7}', 7),  # still the id, though the request itself is no good
        (b'{"type": "ping"}', None),
        (b'{"type": "ping", "id": true}', None),
        (b'{"type": "ping", "id": "p1"', None),
        (b'[{"id": 1}]', None),
        (b"/ping", None),
        (b"\xff{", None),
    ],
)
def test_maybe_request_id_for_lines_refused_unread(raw: bytes, req_id: codec.RequestId) -> None:
    assert codec.maybe_request_id(raw) == req_id


@given(st.binary())
def test_maybe_request_id_never_raises(raw: bytes) -> None:
    codec.maybe_request_id(raw)


# --- encoding events ----------------------------------------------------------------

entry = messages.UserEntry("ann", True, "s1")


@pytest.mark.parametrize(
    ("event", "wire"),
    [
        (
            messages.Welcome("ann", "s1", [entry]),
            {
                "type": "welcome",
                "user": "ann",
                "server": "s1",
                "users": [{"user": "ann", "online": True, "server": "s1"}],
            },
        ),
        (
            messages.Welcome("ann", "s1", [], next="zed"),
            {"type": "welcome", "user": "ann", "server": "s1", "users": [], "next": "zed"},
        ),
        (messages.Sent("s1:a:1", 5), {"type": "sent", "msg": "s1:a:1", "ts": 5}),
        (
            messages.Message("m1", "ann", "bob", "hi", 9),
            {"type": "message", "msg": "m1", "from": "ann", "to": "bob", "text": "hi", "ts": 9},
        ),
        (
            messages.Receipt("m1", "read", "bob", 10),
            {"type": "receipt", "msg": "m1", "status": "read", "by": "bob", "ts": 10},
        ),
        (
            messages.Presence("bob", True, server="s1", servers=["s1"]),
            {"type": "presence", "user": "bob", "online": True, "server": "s1", "servers": ["s1"]},
        ),
        (
            messages.Presence("bob", False, last_seen=0),
            {"type": "presence", "user": "bob", "online": False, "last_seen": 0},
        ),
        (messages.Users([]), {"type": "users", "users": []}),
        (
            messages.Status("bob", False),
            {"type": "status", "user": "bob", "online": False},
        ),
        (messages.Typing("ann"), {"type": "typing", "from": "ann"}),
        (messages.Pong(), {"type": "pong"}),
        (
            messages.Error("offline", "bob is away"),
            {"type": "error", "code": "offline", "message": "bob is away"},
        ),
        (
            messages.Bye("logout", "goodbye"),
            {"type": "bye", "reason": "logout", "message": "goodbye"},
        ),
    ],
)
def test_encode_gives_the_wire_object(event: messages.Event, wire: dict[str, Any]) -> None:
    raw = encode(event)
    assert raw.endswith(b"\n")
    assert raw.count(b"\n") == 1
    assert orjson.loads(raw) == wire
    assert raw.startswith(b'{"type":')


@pytest.mark.parametrize("req_id", ["q1", 0, 2**64 - 1, ""])
def test_encode_echoes_the_id(req_id: codec.RequestId) -> None:
    assert orjson.loads(encode(messages.Pong(), req_id)) == {"type": "pong", "id": req_id}


def test_encode_without_id_has_no_id() -> None:
    assert "id" not in orjson.loads(encode(messages.Pong()))


@given(
    msg=st.text(),
    sender=st.text(),
    to=st.text(),
    text=st.text(),
    ts=st.integers(0, 2**63 - 1),
    req_id=st.none() | valid_ids,
)
def test_a_message_survives_encoding_with_any_text(
    msg: str, sender: str, to: str, text: str, ts: int, req_id: codec.RequestId
) -> None:
    raw = encode(messages.Message(msg, sender, to, text, ts), req_id)
    assert raw.count(b"\n") == 1  # a newline in the text can't split the line
    body = orjson.loads(raw)
    assert body.pop("id", None) == req_id
    assert body == {"type": "message", "msg": msg, "from": sender, "to": to, "text": text, "ts": ts}
