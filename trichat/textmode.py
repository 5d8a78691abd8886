"""Plain-text mode for a person at telnet or netcat (protocol.md "Plain-text mode").

Owns: turning ``/msg bob hi``-style commands into the same request objects JSON gives, and
rendering events as readable lines. Like Redis's inline commands, a line that does not start
with ``{`` is a command. Must never: route, store or know who is online.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from trichat import errors, messages
from trichat.errors import ProtocolError
from trichat.messages import Event, Request

HELP_TEXT: Final = """commands:
  /register NAME PASSWORD   create an account and log in
  /login NAME [PASSWORD]    log in (no password: as a guest)
  /msg NAME TEXT            private message
  /all TEXT                 message to everyone online
  /who                      who is online
  /status NAME              is NAME online, and where
  /ping                     check the server answers
  /help                     this list
  /quit                     log out and close"""


def _words(args: str, count: int) -> list[str]:
    return args.split(None, count - 1) if args else []


def _register(args: str) -> Request:
    parts = _words(args, 2)
    if len(parts) != 2:
        raise ProtocolError(errors.BAD_REQUEST, "usage: /register NAME PASSWORD")
    return messages.RegisterRequest(user=parts[0], password=parts[1])


def _login(args: str) -> Request:
    parts = _words(args, 2)
    if not parts:
        raise ProtocolError(errors.BAD_REQUEST, "usage: /login NAME [PASSWORD]")
    return messages.LoginRequest(user=parts[0], password=parts[1] if len(parts) > 1 else None)


def _msg(args: str) -> Request:
    parts = _words(args, 2)
    if len(parts) != 2:
        raise ProtocolError(errors.BAD_REQUEST, "usage: /msg NAME TEXT")
    return messages.SendRequest(to=parts[0], text=parts[1])


def _all(args: str) -> Request:
    if not args:
        raise ProtocolError(errors.BAD_REQUEST, "usage: /all TEXT")
    return messages.BroadcastRequest(text=args)


def _status(args: str) -> Request:
    parts = _words(args, 2)
    if len(parts) != 1:
        raise ProtocolError(errors.BAD_REQUEST, "usage: /status NAME")
    return messages.StatusRequest(user=parts[0])


def _no_args(request: Request) -> Callable[[str], Request]:
    return lambda _args: request


_COMMANDS: Final[dict[str, Callable[[str], Request]]] = {
    "register": _register,
    "login": _login,
    "msg": _msg,
    "all": _all,
    "who": _no_args(messages.UsersRequest()),
    "status": _status,
    "ping": _no_args(messages.PingRequest()),
    "help": _no_args(messages.HelpRequest()),
    "quit": _no_args(messages.LogoutRequest()),
}


def parse_command(line: str) -> Request:
    """Parse one text-mode line (already decoded, not empty).

    Raises:
        ProtocolError: ``unknown_type`` for an unknown command, ``bad_request`` for bad usage.
    """
    if not line.startswith("/"):
        raise ProtocolError(
            errors.UNKNOWN_TYPE, "commands start with '/': try /msg NAME TEXT, or /help"
        )
    name, _, args = line[1:].partition(" ")
    parser = _COMMANDS.get(name.lower())
    if parser is None:
        raise ProtocolError(errors.UNKNOWN_TYPE, f"unknown command /{name[:32]}; try /help")
    return parser(args.strip())


def _clock(ts: int) -> str:
    return time.strftime("%H:%M", time.localtime(ts / 1000))


def _where(servers: list[str] | None, server: str | None) -> str:
    listed = servers or ([server] if server else [])
    return ", ".join(listed)


def _render_welcome(e: messages.Welcome) -> str:
    names = ", ".join(u.user for u in e.users) or "nobody"
    more = " (and more: /who)" if e.next else ""
    return f"* welcome {e.user}, you are on server {e.server}. online: {names}{more}"


# C0 and C1 controls (C1: U+0080-U+009F, e.g. CSI U+009B, which xterm obeys) and DEL.
_CONTROL: Final = {c: "?" for c in (*range(32), *range(127, 160)) if c not in (9, 10)}


def _safe(text: str) -> str:
    """User text as it may appear on a terminal: no escape sequences, and continuation lines
    indented so a message can't pass itself off as a server line."""
    return text.translate(_CONTROL).replace("\n", "\n    ")


def _render_message(e: messages.Message) -> str:
    if e.to == "*":
        return f"[{_clock(e.ts)}] <{e.sender} to all> {_safe(e.text)}"
    return f"[{_clock(e.ts)}] <{e.sender}> {_safe(e.text)}"


def _render_presence(e: messages.Presence) -> str:
    if e.online:
        return f"* {e.user} is online (on {_where(e.servers, e.server)})"
    return f"* {e.user} went offline"


def _render_users(e: messages.Users) -> str:
    names = ", ".join(f"{u.user} ({u.server})" for u in e.users) or "nobody"
    return f"* online: {names}" + (" ..." if e.next else "")


def _render_status(e: messages.Status) -> str:
    if e.online:
        return f"* {e.user} is online on {_where(e.servers, e.server)}"
    seen = f", last seen {_clock(e.last_seen)}" if e.last_seen else ""
    return f"* {e.user} is offline{seen}"


_RENDERERS: Final[dict[type, Callable[[object], str]]] = {
    messages.Welcome: _render_welcome,  # type: ignore[dict-item]
    messages.Sent: lambda e: f"* sent ({e.msg})",  # type: ignore[attr-defined]
    messages.Message: _render_message,  # type: ignore[dict-item]
    messages.Receipt: lambda e: f"* {e.by} {e.status} {e.msg}",  # type: ignore[attr-defined]
    messages.Presence: _render_presence,  # type: ignore[dict-item]
    messages.Users: _render_users,  # type: ignore[dict-item]
    messages.Status: _render_status,  # type: ignore[dict-item]
    messages.Typing: lambda e: f"* {e.sender} is typing...",  # type: ignore[attr-defined]
    messages.Pong: lambda e: "* pong",
    messages.Error: lambda e: f"! {e.code}: {e.message}",  # type: ignore[attr-defined]
    messages.Bye: lambda e: f"* bye: {e.message}",  # type: ignore[attr-defined]
    messages.Renamed: lambda e: f"* renamed: {e.message}",  # type: ignore[attr-defined]
    messages.HelpText: lambda e: e.text,  # type: ignore[attr-defined]
}


def render(event: Event) -> bytes:
    """One or more readable lines (CR LF terminated, as telnet expects) for an event.

    Control characters are replaced everywhere, errors that quote a client's input included:
    nothing a client sends can drive another person's terminal.
    """
    text = _RENDERERS[type(event)](event).translate(_CONTROL)
    return text.replace("\n", "\r\n").encode() + b"\r\n"
