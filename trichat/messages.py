"""One frozen attrs class per wire ``type`` (protocol.md "Client to server", "Server to client").

Owns: the shapes of requests and events. Must never: serialize (that is codec.py), validate
names or lengths (session.py and hub.py), or touch I/O. ``from`` is a Python keyword, so the
field is ``sender`` here and renamed on the wire by codec.py.
"""

from __future__ import annotations

import typing
from typing import ClassVar

import attrs

# --- client to server -----------------------------------------------------------------


@attrs.frozen
class RegisterRequest:
    TYPE: ClassVar[str] = "register"
    user: str
    password: str


@attrs.frozen
class LoginRequest:
    TYPE: ClassVar[str] = "login"
    user: str
    password: str | None = None


@attrs.frozen
class SendRequest:
    TYPE: ClassVar[str] = "send"
    to: str
    text: str


@attrs.frozen
class BroadcastRequest:
    TYPE: ClassVar[str] = "broadcast"
    text: str


@attrs.frozen
class ReceivedRequest:
    TYPE: ClassVar[str] = "received"
    msg: str


@attrs.frozen
class ReadRequest:
    TYPE: ClassVar[str] = "read"
    msg: str


@attrs.frozen
class TypingRequest:
    TYPE: ClassVar[str] = "typing"
    to: str


@attrs.frozen
class UsersRequest:
    TYPE: ClassVar[str] = "users"
    after: str | None = None  # paging: protocol.md "users"


@attrs.frozen
class StatusRequest:
    TYPE: ClassVar[str] = "status"
    user: str


@attrs.frozen
class PingRequest:
    TYPE: ClassVar[str] = "ping"


@attrs.frozen
class LogoutRequest:
    TYPE: ClassVar[str] = "logout"


@attrs.frozen
class HelpRequest:
    """Text mode's ``/help``; never decoded from JSON."""

    TYPE: ClassVar[str] = "help"


Request = (
    RegisterRequest
    | LoginRequest
    | SendRequest
    | BroadcastRequest
    | ReceivedRequest
    | ReadRequest
    | TypingRequest
    | UsersRequest
    | StatusRequest
    | PingRequest
    | LogoutRequest
    | HelpRequest
)

# HelpRequest is text mode's alone: JSON can't ask for it.
REQUEST_TYPES: dict[str, type[Request]] = {
    cls.TYPE: cls for cls in typing.get_args(Request) if cls is not HelpRequest
}

# Requests a connection may make before it has logged in (contract "Before login").
ANONYMOUS_TYPES = frozenset({"register", "login", "ping", "help", "logout"})

# --- server to client -----------------------------------------------------------------


@attrs.frozen
class UserEntry:
    user: str
    online: bool
    server: str


@attrs.frozen
class Welcome:
    TYPE: ClassVar[str] = "welcome"
    user: str
    server: str
    users: list[UserEntry]
    next: str | None = None


@attrs.frozen
class Sent:
    TYPE: ClassVar[str] = "sent"
    msg: str
    ts: int


@attrs.frozen
class Message:
    TYPE: ClassVar[str] = "message"
    msg: str
    sender: str
    to: str
    text: str
    ts: int


@attrs.frozen
class Receipt:
    TYPE: ClassVar[str] = "receipt"
    msg: str
    status: str
    by: str
    ts: int


@attrs.frozen
class Presence:
    TYPE: ClassVar[str] = "presence"
    user: str
    online: bool
    server: str | None = None
    servers: list[str] | None = None
    last_seen: int | None = None


@attrs.frozen
class Users:
    TYPE: ClassVar[str] = "users"
    users: list[UserEntry]
    next: str | None = None


@attrs.frozen
class Status:
    TYPE: ClassVar[str] = "status"
    user: str
    online: bool
    server: str | None = None
    servers: list[str] | None = None
    last_seen: int | None = None


@attrs.frozen
class Typing:
    TYPE: ClassVar[str] = "typing"
    sender: str


@attrs.frozen
class Pong:
    TYPE: ClassVar[str] = "pong"


@attrs.frozen
class Error:
    TYPE: ClassVar[str] = "error"
    code: str
    message: str


@attrs.frozen
class Bye:
    """The server is closing this connection (protocol.md "bye"); ``reason`` says why."""

    TYPE: ClassVar[str] = "bye"
    reason: str
    message: str


@attrs.frozen
class Renamed:
    """This account lost its name to an earlier registration of it (protocol.md "Name
    conflicts") and goes on as ``user``; ``old`` is the name it was registered with."""

    TYPE: ClassVar[str] = "renamed"
    old: str
    user: str
    message: str


@attrs.frozen
class HelpText:
    """Text mode's answer to ``/help``."""

    TYPE: ClassVar[str] = "help"
    text: str


Event = (
    Welcome
    | Sent
    | Message
    | Receipt
    | Presence
    | Users
    | Status
    | Typing
    | Pong
    | Error
    | Bye
    | Renamed
    | HelpText
)

EVENT_CLASSES: tuple[type[Event], ...] = typing.get_args(Event)
