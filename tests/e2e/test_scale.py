"""Many connections against one real server process."""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.e2e.conftest import Serve

pytestmark = pytest.mark.e2e

CLIENTS = 1000


def read_until(sock: socket.socket, marker: bytes, buf: bytes = b"") -> bytes:
    """Receive until ``marker`` is in what was read (the socket has a timeout)."""
    while marker not in buf:
        chunk = sock.recv(1 << 16)
        assert chunk, f"closed before {marker!r}; got {buf[-300:]!r}"
        buf += chunk
    return buf


def line_with(sock: socket.socket, marker: bytes, buf: bytes = b"") -> dict[str, object]:
    """The first whole JSON line containing ``marker``."""
    buf = read_until(sock, marker, buf)
    while b"\n" not in buf[buf.index(marker) :]:
        buf = read_until(sock, b"\n", buf[buf.index(marker) - 4096 :])
    start = buf.rfind(b"\n", 0, buf.index(marker)) + 1
    end = buf.index(b"\n", buf.index(marker))
    event: dict[str, object] = json.loads(buf[start:end])
    return event


def test_thousand_concurrent_clients_get_welcome_and_broadcast(
    serve: Serve, rlimit_nofile: int
) -> None:
    if rlimit_nofile < 2 * CLIENTS + 200:
        pytest.skip(f"needs {2 * CLIENTS + 200} open files, the limit is {rlimit_nofile}")
    start = time.monotonic()
    server = serve()  # inherits the raised limit
    socks: list[socket.socket] = []
    try:
        for _ in range(CLIENTS):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            socks.append(sock)
        for i, sock in enumerate(socks):
            sock.sendall(b'{"type":"login","user":"u%d","id":%d}\n' % (i, i))

        # Nobody was logged in before its welcome: it is the first line each one gets.
        pending: list[bytes] = []
        for i, sock in enumerate(socks):
            buf = read_until(sock, b"\n")
            first, rest = buf.split(b"\n", 1)
            welcome = json.loads(first)
            assert (welcome["type"], welcome["id"], welcome["user"]) == ("welcome", i, f"u{i}")
            pending.append(rest)

        socks[0].sendall(b'{"type":"broadcast","text":"hello, thousand","id":"b"}\n')
        assert line_with(socks[0], b'"id":"b"', pending[0])["type"] == "sent"
        for i in range(1, CLIENTS):
            message = line_with(socks[i], b'"to":"*"', pending[i])
            assert (message["from"], message["text"]) == ("u0", "hello, thousand")

        # The server is still responsive for one more.
        socks[-1].sendall(b'{"type":"status","user":"u0","id":"s"}\n')
        assert line_with(socks[-1], b'"id":"s"')["online"] is True
    finally:
        for sock in socks:
            sock.close()
    assert time.monotonic() - start < 60
