"""The one place where wire bytes become message objects and back.

Owns: JSON decoding and encoding (orjson), the cattrs converter with strict primitive hooks,
dispatch on ``type``, and the request ``id`` envelope (protocol.md "Requests and replies").
Must never: check names, lengths or login state; that is session.py's and hub.py's job.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any, Final

import attrs
import cattrs
import orjson
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from trichat import errors
from trichat.errors import ProtocolError
from trichat.messages import (
    EVENT_CLASSES,
    REQUEST_TYPES,
    Event,
    Message,
    Receipt,
    Request,
    Sent,
    Typing,
)

MAX_ID_CHARS: Final = 128

RequestId = str | int | None


def _strict(kind: type, name: str) -> Any:
    def hook(value: Any, _: Any) -> Any:
        # type() not isinstance(): True is an int in Python but not on our wire.
        if type(value) is not kind:
            raise TypeError(f"must be {name}")
        return value

    return hook


def strict_converter() -> cattrs.Converter:
    """A converter that takes no coercion: ``{"text": 5}`` or ``true`` as an integer fail
    (cattrs coerces primitives by default). The peer protocol uses one too."""
    conv = cattrs.Converter(detailed_validation=False)
    conv.register_structure_hook(str, _strict(str, "a string"))
    conv.register_structure_hook(int, _strict(int, "an integer"))
    conv.register_structure_hook(bool, _strict(bool, "true or false"))

    def is_list(kind: Any) -> bool:
        return typing.get_origin(kind) is list

    def strict_list(value: Any, kind: Any) -> list[Any]:
        # cattrs' own list hook takes any iterable: "abc" would become ["a", "b", "c"].
        if type(value) is not list:
            raise TypeError("must be a list")
        (item,) = typing.get_args(kind)
        return [conv.structure(v, item) for v in value]

    conv.register_structure_hook_func(is_list, strict_list)
    return conv


def _make_converter() -> cattrs.Converter:
    conv = strict_converter()
    for cls in REQUEST_TYPES.values():
        conv.register_structure_hook(cls, make_dict_structure_fn(cls, conv))
    return conv


def _make_unstructurer() -> cattrs.Converter:
    conv = cattrs.Converter()
    renames = {
        Message: {"sender": override(rename="from")},
        Typing: {"sender": override(rename="from")},
    }
    for cls in EVENT_CLASSES:
        hook = make_dict_unstructure_fn(
            cls,
            conv,
            _cattrs_omit_if_default=True,
            **renames.get(cls, {}),  # type: ignore[arg-type]
        )
        conv.register_unstructure_hook(cls, hook)
    return conv


_converter = _make_converter()
_unstructurer = _make_unstructurer()


def _field_problem(cls: type, data: dict[str, Any]) -> str:
    """A sentence naming the first missing or mistyped field, for ``bad_request``."""
    for field in attrs.fields(cls):
        value = data.get(field.name)
        if value is None:
            if field.default is attrs.NOTHING:
                return f"field '{field.name}' is missing"
            continue
        try:
            _converter.structure(value, field.type)
        except Exception as exc:
            return f"field '{field.name}' {exc}"
    return "the request's fields are not valid"


def decode(line: bytes) -> tuple[Request, RequestId]:
    """Parse one JSON line into a request and the client's ``id``.

    Args:
        line: one line without its terminator.

    Returns:
        The request object and the ``id`` to echo (None when absent).

    Raises:
        ProtocolError: ``bad_json``, ``bad_request`` or ``unknown_type``; its ``req_id``
            attribute holds the id when one could be read.
    """
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(errors.BAD_JSON, _json_problem(line, exc)) from None
    if type(data) is not dict:
        raise ProtocolError(errors.BAD_JSON, "each line must be one JSON object, {...}")
    req_id = _request_id(data)
    try:
        kind = data.get("type")
        cls = REQUEST_TYPES.get(kind) if type(kind) is str else None
        if cls is None:
            if kind is None:
                raise ProtocolError(errors.BAD_REQUEST, "field 'type' is missing")
            raise ProtocolError(errors.UNKNOWN_TYPE, f"unknown request type {_show(kind)}")
        try:
            return _converter.structure(data, cls), req_id
        except Exception:
            raise ProtocolError(errors.BAD_REQUEST, _field_problem(cls, data)) from None
    except ProtocolError as exc:
        exc.req_id = req_id  # type: ignore[attr-defined]
        raise


def maybe_request_id(line: bytes) -> RequestId:
    """The ``id`` of a JSON request line, or None if it has none or isn't JSON (for replies
    to lines that are refused without being served, such as ``rate_limited``)."""
    if not line.startswith(b"{"):
        return None
    try:
        data = orjson.loads(line)
        return _request_id(data) if type(data) is dict else None
    except (orjson.JSONDecodeError, ProtocolError):
        return None


def _request_id(data: dict[str, Any]) -> RequestId:
    req_id = data.get("id")
    if req_id is None:
        return None
    kind = type(req_id)
    if kind is int or (kind is str and len(req_id) <= MAX_ID_CHARS):
        return req_id  # type: ignore[no-any-return]
    raise ProtocolError(
        errors.BAD_REQUEST,
        f"'id' must be an integer or a string of at most {MAX_ID_CHARS} characters",
    )


def _json_problem(line: bytes, exc: Exception) -> str:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return "the line is not valid UTF-8"
    return f"the line is not valid JSON ({exc})"


def _show(value: object) -> str:
    text = orjson.dumps(value).decode() if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _message(e: Any) -> dict[str, Any]:
    return {"type": "message", "msg": e.msg, "from": e.sender, "to": e.to, "text": e.text,
            "ts": e.ts}  # fmt: skip


def _sent(e: Any) -> dict[str, Any]:
    return {"type": "sent", "msg": e.msg, "ts": e.ts}


def _receipt(e: Any) -> dict[str, Any]:
    return {"type": "receipt", "msg": e.msg, "status": e.status, "by": e.by, "ts": e.ts}


# The per-message events, written out by hand: 3x faster than the generic path, and
# tests/unit/test_codec.py checks they agree with it.
_HOT: Final[dict[type, Callable[[Any], dict[str, Any]]]] = {
    Message: _message,
    Sent: _sent,
    Receipt: _receipt,
}


def unstructure_generic(event: Event) -> dict[str, Any]:
    """The wire dict of an event by way of cattrs: ``type`` first, unset options left out."""
    body: dict[str, Any] = {"type": event.TYPE}
    body.update(_unstructurer.unstructure(event))
    return body


def unstructure(event: Event) -> dict[str, Any]:
    """The wire dict of an event, ``type`` first, optional fields left out when unset."""
    hot = _HOT.get(type(event))
    return hot(event) if hot is not None else unstructure_generic(event)


def encode(event: Event, req_id: RequestId = None) -> bytes:
    """One wire line (with its newline) for an event; ``req_id`` is echoed as ``id``."""
    body = unstructure(event)
    if req_id is not None:
        body["id"] = req_id
    return orjson.dumps(body, option=orjson.OPT_APPEND_NEWLINE)
