"""A person (or a shell script) with netcat: ``printf ... | nc -q 1 127.0.0.1 PORT``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from tests.e2e.conftest import Serve

# CI (.ci/run) installs netcat and sets TRICHAT_REQUIRE_NC=1: there a missing nc fails.
NC_MISSING = shutil.which("nc") is None and os.environ.get("TRICHAT_REQUIRE_NC") != "1"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        NC_MISSING,
        reason="netcat is not installed (`nc` not on PATH; apt-get install netcat-openbsd)",
    ),
]


def nc(port: int, data: bytes, *flags: str) -> list[bytes]:
    """Pipe ``data`` into nc and return what the server wrote back, line by line."""
    result = subprocess.run(
        ["nc", *flags, "127.0.0.1", str(port)],
        input=data,
        capture_output=True,
        timeout=20,
    )
    return [line.removesuffix(b"\r") for line in result.stdout.split(b"\n") if line]


def test_nc_json_session(serve: Serve) -> None:
    server = serve()
    bob = server.connect()
    try:
        bob.login("bob")
        script = b"".join(
            json.dumps(request).encode() + b"\n"
            for request in [
                {"type": "login", "user": "netcat", "id": 1},
                {"type": "ping", "id": 2},
                {"type": "users", "id": 3},
                {"type": "send", "to": "bob", "text": "piped through nc", "id": 4},
                {"type": "status", "user": "nobody", "id": 5},
            ]
        )
        lines = nc(server.port, script, "-q", "1")
        events = {event.get("id"): event for event in map(json.loads, lines)}
        assert events[1]["type"] == "welcome" and events[1]["user"] == "netcat"
        assert events[2] == {"type": "pong", "id": 2}
        assert {"bob", "netcat"} <= {u["user"] for u in events[3]["users"]}
        assert events[5]["type"] == "error" and events[5]["code"] == "no_such_user"
        # (Whether `sent` (id 4) gets back to nc: test_nc_gets_sent_before_the_end.)
        message = bob.expect("message")
        assert (message["from"], message["text"]) == ("netcat", "piped through nc")
        offline = bob.expect("presence", skip=())
        assert (offline["user"], offline["online"]) == ("netcat", False)
    finally:
        bob.close()


def test_nc_text_session(serve: Serve) -> None:
    server = serve()
    bob = server.connect()
    try:
        bob.login("bob")
        script = b"/login person\n/msg bob hello from a terminal\n/who\n/help\n/status bob\n"
        lines = [line.decode() for line in nc(server.port, script, "-q", "1")]
        assert lines[0].startswith("* welcome person")
        assert not any(line.startswith("{") for line in lines), lines
        text = "\n".join(lines)
        assert "bob" in text and "/msg" in text and "/quit" in text
        assert bob.expect("message")["text"] == "hello from a terminal"
    finally:
        bob.close()


def skip_without_dash_n() -> None:
    if b"-N" not in subprocess.run(["nc", "-h"], capture_output=True, timeout=5).stderr:
        pytest.skip("this netcat has no -N (shutdown after EOF on stdin)")


def test_nc_shutdown_on_eof_ends_the_session(serve: Serve) -> None:
    skip_without_dash_n()
    server = serve()
    script = b'{"type":"login","user":"brief","id":1}\r\n{"type":"ping","id":2}\r\n'
    # No -q: nc ends only because the server closes once the client has finished.
    lines = nc(server.port, script, "-N")
    assert [json.loads(line)["type"] for line in lines] == ["welcome", "pong"]


def test_nc_script_ending_in_logout_gets_sent(serve: Serve) -> None:
    server = serve()
    script = (
        b'{"type":"login","user":"quick","id":1}\n'
        b'{"type":"send","to":"quick","text":"note to self","id":2}\n'
        b'{"type":"logout","id":3}\n'
    )
    events = [json.loads(line) for line in nc(server.port, script, "-q", "1")]
    assert events[-1]["type"] == "bye"
    assert [e["type"] for e in events if e.get("id") == 2] == ["sent"]
