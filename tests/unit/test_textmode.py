"""textmode: telnet commands onto the same requests JSON gives, events as readable lines."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trichat import errors, messages
from trichat.errors import ProtocolError
from trichat.textmode import HELP_TEXT, parse_command, render


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("/register bob s3cret-pw", messages.RegisterRequest("bob", "s3cret-pw")),
        ("/register bob pass with spaces", messages.RegisterRequest("bob", "pass with spaces")),
        ("/login bob", messages.LoginRequest("bob", None)),
        ("/login bob s3cret-pw", messages.LoginRequest("bob", "s3cret-pw")),
        ("/msg bob hello there", messages.SendRequest("bob", "hello there")),
        ("/msg   bob    spaced   out  ", messages.SendRequest("bob", "spaced   out")),
        ("/all hi everyone", messages.BroadcastRequest("hi everyone")),
        ("/who", messages.UsersRequest()),
        ("/status bob", messages.StatusRequest("bob")),
        ("/ping", messages.PingRequest()),
        ("/help", messages.HelpRequest()),
        ("/quit", messages.LogoutRequest()),
        ("/MSG bob Hi", messages.SendRequest("bob", "Hi")),
        ("/Quit", messages.LogoutRequest()),
    ],
)
def test_commands_parse_to_requests(line: str, expected: messages.Request) -> None:
    assert parse_command(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        "/register",
        "/register bob",
        "/login",
        "/login   ",
        "/msg",
        "/msg bob",
        "/msg bob   ",
        "/all",
        "/all    ",
        "/status",
        "/status bob alice",
    ],
)
def test_bad_usage_is_bad_request_with_the_usage(line: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_command(line)
    assert info.value.code == errors.BAD_REQUEST
    assert "usage: /" in info.value.message


@pytest.mark.parametrize("line", ["/nope", "/", "hello bob", "msg bob hi", "/msgbob hi", "//msg"])
def test_unknown_commands_are_unknown_type(line: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_command(line)
    assert info.value.code == errors.UNKNOWN_TYPE
    assert "/help" in info.value.message


@given(to=st.from_regex(r"[A-Za-z0-9_.\-]{1,32}", fullmatch=True), text=st.text())
def test_msg_keeps_the_text_as_typed(to: str, text: str) -> None:
    text = text.strip()
    if not text:
        return
    assert parse_command(f"/msg {to} {text}") == messages.SendRequest(to, text)


# --- rendering ------------------------------------------------------------------------

users = [messages.UserEntry("ann", True, "s1"), messages.UserEntry("bob", True, "s2")]
EVENTS: list[messages.Event] = [
    messages.Welcome("ann", "s1", users),
    messages.Welcome("ann", "s1", users, next="bob"),
    messages.Sent("s1:ab:1", 1_700_000_000_000),
    messages.Message("s1:ab:1", "bob", "ann", "hi", 1_700_000_000_000),
    messages.Message("s1:ab:2", "bob", "*", "hi all", 1_700_000_000_000),
    messages.Receipt("s1:ab:1", "read", "ann", 1_700_000_000_000),
    messages.Presence("bob", True, server="s2", servers=["s2"]),
    messages.Presence("bob", False, last_seen=1_700_000_000_000),
    messages.Users(users),
    messages.Users([], next=None),
    messages.Status("bob", True, server="s2"),
    messages.Status("bob", False, last_seen=1_700_000_000_000),
    messages.Status("bob", False),
    messages.Typing("bob"),
    messages.Pong(),
    messages.Error("offline", "bob is not online"),
    messages.Bye("logout", "goodbye"),
    messages.HelpText(HELP_TEXT),
]


def assert_crlf_lines(out: bytes) -> list[bytes]:
    assert out.endswith(b"\r\n")
    lines = out.split(b"\r\n")[:-1]
    for ln in lines:
        assert b"\r" not in ln and b"\n" not in ln  # no bare CR or LF anywhere
    return lines


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_every_event_renders_as_crlf_terminated_text(event: messages.Event) -> None:
    out = render(event)
    lines = assert_crlf_lines(out)
    assert lines and lines[0]
    assert not out.startswith(b"{")  # readable text, not JSON
    out.decode("utf-8")


def test_rendered_events_say_what_happened() -> None:
    assert b"bob" in render(messages.Message("m", "bob", "ann", "hi there", 0))
    assert b"hi there" in render(messages.Message("m", "bob", "ann", "hi there", 0))
    assert b"all" in render(messages.Message("m", "bob", "*", "x", 0))
    assert b"offline" in render(messages.Presence("bob", False, last_seen=0))
    assert b"online" in render(messages.Presence("bob", True, server="s2"))
    assert b"s2" in render(messages.Status("bob", True, server="s2"))
    assert b"no_such_user" in render(messages.Error("no_such_user", "nobody"))
    assert b"ann" in render(messages.Welcome("ann", "s1", []))
    welcome = render(messages.Welcome("zed", "s1", users))
    assert b"ann" in welcome and b"bob" in welcome
    assert render(messages.HelpText(HELP_TEXT)).count(b"\r\n") == HELP_TEXT.count("\n") + 1


def test_a_message_cannot_forge_a_server_line() -> None:
    text = "hi\n* alice is online (on s1)\r\n! auth_failed: fake\x1b[2J\x1b]0;pwned\x07\x00\x7f"
    out = render(messages.Message("m", "mallory", "bob", text, 0))
    lines = assert_crlf_lines(out)
    assert lines[0].startswith(b"[") and b"<mallory>" in lines[0]
    for continuation in lines[1:]:
        assert continuation.startswith(b"    ")
    assert b"\x1b" not in out and b"\x07" not in out and b"\x00" not in out
    assert b"\x7f" not in out


@given(st.text())
def test_no_text_can_forge_a_line_or_send_control_codes(text: str) -> None:
    for to in ("bob", "*"):
        out = render(messages.Message("m", "mallory", to, text, 0))
        lines = assert_crlf_lines(out)
        assert b"<mallory" in lines[0]
        assert all(ln.startswith(b"    ") for ln in lines[1:])
        assert not any(b < 32 and b != 9 for b in b"".join(lines))
        assert 127 not in out


C1 = "".join(chr(c) for c in range(0x80, 0xA0))


def is_control(ch: str) -> bool:
    """What a terminal may obey: C0 (but tab and newline), DEL and C1 controls."""
    return (ord(ch) < 32 and ch not in "\t\n") or 0x7F <= ord(ch) <= 0x9F


def test_c1_control_characters_are_replaced_too() -> None:
    out = render(messages.Message("m", "mallory", "bob", "a\u009b2Jb\u0085c", 0)).decode()
    assert not any(0x80 <= ord(c) <= 0x9F for c in out)
    assert "a?2Jb?c" in out
    every_c1 = render(messages.Message("m", "mallory", "*", C1, 0)).decode()
    assert every_c1.endswith("?" * len(C1) + "\r\n")


def test_text_beyond_the_controls_is_kept() -> None:
    # U+00A0 (no-break space) is the first character after C1: printable, kept as it is.
    text = "\u00a0caf\u00e9 \u2603 \U0001f600\t!"
    out = render(messages.Message("m", "ann", "bob", text, 0)).decode()
    assert out.endswith(f"> {text}\r\n")


@pytest.mark.parametrize(
    "event",
    [
        # Errors quote what a client typed ("unknown command /nope<ESC>[2J").
        messages.Error("unknown_type", "unknown command /nope\x1b[2J\u009b31m\r; try /help"),
        messages.Bye("logout", "bye\x07\x7f"),
        messages.Presence("x\x1b", True, server="s\u0085", servers=["s\u0085"]),
        messages.Status("x\x1b", False, last_seen=0),
        messages.Typing("\x1b]0;pwned\x07"),
        messages.Receipt("m\x1b", "read", "by\u009b", 0),
        messages.Sent("s1:\x1b:1", 0),
        messages.Welcome("ann\x1b", "s\u009b", [messages.UserEntry("b\x00b", True, "s1")]),
        messages.Users([messages.UserEntry("b\x1bb", True, "s\x9b")], next="x"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_controls_are_replaced_in_every_rendered_line(event: messages.Event) -> None:
    out = render(event)
    lines = assert_crlf_lines(out)
    assert not any(is_control(ch) for ln in lines for ch in ln.decode())


@given(st.text())
def test_no_error_message_can_send_control_codes(text: str) -> None:
    out = render(messages.Error("bad_request", text))
    lines = assert_crlf_lines(out)
    assert not any(is_control(ch) for ln in lines for ch in ln.decode())
