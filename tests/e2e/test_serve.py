"""``trichat serve`` as users run it: real processes, real sockets on 127.0.0.1."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Serve

pytestmark = pytest.mark.e2e


def test_ready_line_and_chat_between_two_clients(serve: Serve) -> None:
    server = serve("--name", "e2e1")
    assert re.fullmatch(
        r"ready name=e2e1 line=127\.0\.0\.1:\d+ web=off peer=127\.0\.0\.1:\d+",
        server.ready,
    ), server.ready
    alice, bob = server.connect(), server.connect()
    try:
        welcome = alice.login("alice")
        assert (welcome["user"], welcome["server"]) == ("alice", "e2e1")
        bob.login("bob")
        presence = alice.expect("presence", skip=())
        assert (presence["user"], presence["online"]) == ("bob", True)

        alice.send("send", to="bob", text="hello from a real socket", id=1)
        sent = alice.expect("sent", id=1)
        message = bob.expect("message")
        assert (message["msg"], message["from"], message["text"]) == (
            sent["msg"],
            "alice",
            "hello from a real socket",
        )
        bob.send("received", msg=message["msg"])
        receipt = alice.expect("receipt")
        assert (receipt["msg"], receipt["status"], receipt["by"]) == (
            sent["msg"],
            "delivered",
            "bob",
        )

        bob.send("broadcast", text="hi everyone", id=2)
        bob.expect("sent", id=2)
        assert alice.expect("message", skip=())["to"] == "*"
        bob.send("logout")
        assert json.loads(bob.rest()[-1])["type"] == "bye"
        offline = alice.expect("presence", skip=())
        assert (offline["user"], offline["online"]) == ("bob", False)
    finally:
        alice.close()
        bob.close()


def test_text_mode_session(serve: Serve) -> None:
    server = serve()
    person, script = server.connect(), server.connect()
    try:
        script.login("script")
        person.send_raw(b"/login person\r\n")
        welcome = person.line()
        assert welcome is not None and welcome.startswith(b"* welcome person")
        person.send_raw(b"/msg script hello, script\r\n")
        assert script.expect("message")["text"] == "hello, script"
        script.send("send", to="person", text="hello, person")
        lines = []
        while not lines or b"hello, person" not in lines[-1]:
            line = person.line()
            assert line is not None
            lines.append(line)
        assert all(not line.startswith(b"{") for line in lines)
        person.send_raw(b"/who\r\n/quit\r\n")
        rest = person.rest()
        assert any(b"script" in line and b"person" in line for line in rest), rest
        assert rest[-1].startswith(b"* bye")
    finally:
        person.close()
        script.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_says_bye_and_exits_zero(serve: Serve, signum: int) -> None:
    server = serve()
    json_client, text_client = server.connect(), server.connect()
    try:
        json_client.login("alice")
        text_client.send_raw(b"/login bob\r\n")
        assert text_client.line() is not None
        json_client.expect("presence", skip=())

        start = time.monotonic()
        server.signal(signum)
        bye = json.loads(json_client.rest()[-1])
        assert bye["type"] == "bye" and bye["reason"] == "shutdown"
        assert text_client.rest()[-1].startswith(b"* bye")
        assert server.wait(15) == 0
        assert time.monotonic() - start < 10
        assert "Traceback" not in server.stderr()
    finally:
        json_client.close()
        text_client.close()


def test_messages_survive_sigkill_and_restart(serve: Serve, tmp_path: Path) -> None:
    data = tmp_path / "kept"
    server = serve(data=data)
    bob = server.connect()
    bob.register("bob", "bobs-password")
    bob.close()
    alice = server.connect()
    alice.login("alice")
    alice.send("send", to="bob", text="written before the crash", id="m1")
    sent = alice.expect("sent", id="m1")
    alice.close()

    server.signal(signal.SIGKILL)
    assert server.wait(10) == -signal.SIGKILL

    again = serve(data=data)
    bob = again.connect()
    try:
        bob.login("bob", "bobs-password")
        message = bob.expect("message")
        assert (message["msg"], message["from"], message["text"]) == (
            sent["msg"],
            "alice",
            "written before the crash",
        )
        # The account survived too: a wrong password is still refused.
        other = again.connect()
        other.send("login", user="bob", password="wrong-password", id=1)
        assert other.expect("error", id=1)["code"] == "auth_failed"
        other.close()
        # And new messages never reuse an id from before the crash.
        alice = again.connect()
        alice.login("alice")
        alice.send("send", to="bob", text="after", id="m2")
        assert alice.expect("sent", id="m2")["msg"] != sent["msg"]
        alice.close()
    finally:
        bob.close()


def test_bad_input_does_not_disturb_anyone(serve: Serve) -> None:
    server = serve()
    victim, vandal = server.connect(), server.connect()
    try:
        victim.login("victim")
        vandal.login("vandal")
        vandal.send_raw(b"{\x00\xff{{\n" + b"y" * (3 * 65536) + b'\n{"type":"x"}\n')
        codes = [vandal.expect("error")["code"] for _ in range(3)]
        assert codes == ["bad_json", "line_too_long", "unknown_type"]
        vandal.send("ping", id=1)
        assert vandal.expect("pong")["id"] == 1
        victim.send("ping", id=2)
        assert victim.expect("pong")["id"] == 2
    finally:
        victim.close()
        vandal.close()
