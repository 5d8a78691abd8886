"""Plain-text mode for a person at telnet or netcat, telnet negotiation bytes, CR LF
(contract "Plain-text mode")."""

from __future__ import annotations

import re

from tests.conftest import ServiceFactory
from tests.shell.client import Client
from tests.shell.conftest import Connect


async def text_login(connect: Connect, service: object, name: str) -> Client:
    client = await connect(service)
    await client.send_raw(f"/login {name}\r\n".encode())
    welcome = await client.text()
    assert welcome.startswith("* welcome") and name in welcome, welcome
    return client


async def read_until(client: Client, pattern: str) -> list[str]:
    """Lines up to and including the first one matching ``pattern``."""
    lines: list[str] = []
    while True:
        line = await client.text()
        lines.append(line)
        assert not line.startswith("{"), f"JSON on a text-mode connection: {line}"
        if re.search(pattern, line):
            return lines


async def test_text_session_login_msg_who_help_quit(
    make_service: ServiceFactory, connect: Connect
) -> None:
    service = await make_service(name="tx")
    bob = await connect(service)
    await bob.login("bob")
    alice = await connect(service)
    await alice.send_raw(b"/login alice\r\n")
    welcome = await alice.text()
    assert "alice" in welcome and "tx" in welcome and "bob" in welcome

    await alice.send_raw(b"/msg bob hi there, bob!\r\n")
    message = await bob.expect("message")
    assert (message["from"], message["to"], message["text"]) == ("alice", "bob", "hi there, bob!")
    await read_until(alice, r"sent")

    await bob.request("send", to="alice", text="hello alice")
    lines = await read_until(alice, r"hello alice")
    assert "bob" in lines[-1]
    # A person read it on the screen: that counts as received (the sender is told).
    receipt = await bob.expect("receipt")
    assert (receipt["status"], receipt["by"]) == ("delivered", "alice")

    await alice.send_raw(b"/who\r\n")
    who = (await read_until(alice, r"alice"))[-1]
    assert "bob" in who

    await alice.send_raw(b"/help\r\n")
    help_lines = await read_until(alice, r"/quit")
    help_text = "\n".join(help_lines)
    for command in ("/register", "/login", "/msg", "/all", "/who", "/status", "/help", "/quit"):
        assert command in help_text

    await alice.send_raw(b"/all good night\r\n")
    broadcast = await bob.expect("message")
    assert (broadcast["to"], broadcast["text"]) == ("*", "good night")

    await alice.send_raw(b"/quit\r\n")
    rest = [line.decode() for line in await alice.expect_closed()]
    assert rest and "bye" in rest[-1]
    assert not any(line.startswith("{") for line in rest)
    offline = await bob.expect("presence", skip=("message",), user="alice")
    assert offline["online"] is False


async def test_text_mode_events_and_errors_are_readable(
    make_service: ServiceFactory, connect: Connect
) -> None:
    service = await make_service()
    alice = await text_login(connect, service, "alice")
    bob = await connect(service)
    await bob.login("bob")
    (line,) = await read_until(alice, r"bob")
    assert "online" in line

    await alice.send_raw(b"/msg nobody hello\r\n")
    error = (await read_until(alice, r"no_such_user"))[-1]
    assert "nobody" in error
    await alice.send_raw(b"/frobnicate\r\n")
    await read_until(alice, r"unknown|/help")
    await alice.send_raw(b"/msg bob\r\n")
    await read_until(alice, r"usage|bad_request")
    await alice.send_raw(b"/status bob\r\n")
    status = (await read_until(alice, r"bob"))[-1]
    assert "online" in status

    # A message text can't forge server lines or move the cursor on the terminal.
    await bob.request("send", to="alice", text="line one\n* bob is admin\x1b[2J")
    first = (await read_until(alice, r"line one"))[-1]
    second = await alice.text()
    assert "\x1b" not in first + second
    assert not second.startswith("*")

    await bob.send("logout")
    (line,) = await read_until(alice, r"bob")
    assert "offline" in line


async def test_text_register_and_login_with_password(
    make_service: ServiceFactory, connect: Connect
) -> None:
    service = await make_service()
    first = await connect(service)
    await first.send_raw(b"/register carol pass-word-1\r\n")
    assert "welcome" in await first.text()
    await first.send_raw(b"/quit\r\n")
    await first.expect_closed()

    second = await connect(service)
    await second.send_raw(b"/login carol\r\n")
    await read_until(second, r"auth_failed")
    await second.send_raw(b"/login carol pass-word-1\r\n")
    await read_until(second, r"welcome carol")


async def test_plain_commands_before_login(make_service: ServiceFactory, connect: Connect) -> None:
    service = await make_service()
    client = await connect(service)
    await client.send_raw(b"/help\r\n")
    await read_until(client, r"/login")
    await client.send_raw(b"/who\r\n")
    await read_until(client, r"not_logged_in")
    await client.send_raw(b"hello?\r\n")
    await read_until(client, r"unknown_type")
    await client.send_raw(b"\r\n\r\n/ping\r\n")  # blank lines are ignored
    await read_until(client, r"pong")


async def test_telnet_negotiation_before_first_line(
    make_service: ServiceFactory, connect: Connect
) -> None:
    service = await make_service()
    # What a telnet client sends first: IAC DO/WILL options, then the typed line.
    iac = b"\xff\xfd\x03\xff\xfb\x18\xff\xfb\x1f\xff\xfa\x18\x01\xff\xf0"
    text_client = await connect(service)
    await text_client.send_raw(iac + b"/login telly\r\n")
    welcome = await text_client.text()
    assert welcome.startswith("* welcome telly")

    json_client = await connect(service)
    await json_client.send_raw(iac + b'{"type":"login","user":"jason","id":1}\r\n')
    welcome_event = await json_client.recv()
    assert (welcome_event["type"], welcome_event["id"]) == ("welcome", 1)
    # Mid-session option bytes are dropped too.
    await json_client.send_raw(b'\xff\xf1{"type":"ping","id":2}\r\n')
    assert await json_client.expect("pong", skip=()) == {"type": "pong", "id": 2}


async def test_crlf_and_split_lines(make_service: ServiceFactory, connect: Connect) -> None:
    service = await make_service()
    client = await connect(service)
    await client.send_raw(b'{"type":"login","user":"crlf","id":1}\r\n')
    assert (await client.recv())["type"] == "welcome"
    # One line in several pieces, and several lines in one piece.
    for piece in (b'{"type":"pi', b'ng","id"', b":2}\r", b"\n"):
        await client.send_raw(piece)
    assert await client.recv() == {"type": "pong", "id": 2}
    await client.send_raw(b'{"type":"ping","id":3}\r\n{"type":"ping","id":4}\n')
    assert await client.recv() == {"type": "pong", "id": 3}
    assert await client.recv() == {"type": "pong", "id": 4}
