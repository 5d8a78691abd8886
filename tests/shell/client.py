"""A test client for the line protocol over any trio stream (memory or TCP).

Every wait is bounded: a reply that never comes fails the test instead of hanging it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from typing import Any

import trio

TIMEOUT_S = 10.0
EVENT_TYPES = frozenset({"presence", "message", "receipt", "typing"})
_ids = itertools.count(1)


class Closed(Exception):
    """The server closed the connection."""


class Client:
    """One connection as a client program sees it.

    Args:
        stream: the client's end of the connection.
        done: set when the server's handler for this connection has returned (memory
            streams only; None for TCP).
    """

    def __init__(self, stream: trio.abc.Stream, done: trio.Event | None = None) -> None:
        self.stream = stream
        self.done = done
        self.user: str | None = None
        self._buf = bytearray()
        self._eof = False

    # --- sending ------------------------------------------------------------------

    async def send_raw(self, data: bytes) -> None:
        with trio.fail_after(TIMEOUT_S):
            await self.stream.send_all(data)

    async def send(self, type: str, **fields: Any) -> None:
        """Send one JSON request (``from_`` style names are not needed on requests)."""
        body = {"type": type, **fields}
        await self.send_raw(json.dumps(body).encode() + b"\n")

    async def request(
        self, type: str, *, skip: Iterable[str] = EVENT_TYPES, **fields: Any
    ) -> dict[str, Any]:
        """Send a request with a fresh id and return the direct reply with that id.

        Events of a type in ``skip`` (by default those that are not replies: presence,
        message, receipt, typing) that arrive first are passed over; anything else (an
        error without the id, say) fails the test.
        """
        req_id = f"r{next(_ids)}"
        skip = frozenset(skip)
        await self.send(type, id=req_id, **fields)
        while True:
            event = await self.recv()
            if event.get("id") == req_id:
                return event
            assert event["type"] in skip and "id" not in event, (
                f"waiting for the reply to {type} {fields}, got {event}"
            )

    # --- receiving ----------------------------------------------------------------

    async def line(self, limit_s: float = TIMEOUT_S) -> bytes:
        """The next line without its terminator.

        Raises:
            Closed: the server closed the connection first.
        """
        with trio.fail_after(limit_s):
            while True:
                nl = self._buf.find(b"\n")
                if nl >= 0:
                    line = bytes(self._buf[:nl]).removesuffix(b"\r")
                    del self._buf[: nl + 1]
                    return line
                if self._eof:
                    raise Closed(bytes(self._buf))
                try:
                    data = await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    self._eof = True
                self._buf += data

    async def text(self, limit_s: float = TIMEOUT_S) -> str:
        return (await self.line(limit_s)).decode()

    async def recv(self, limit_s: float = TIMEOUT_S) -> dict[str, Any]:
        line = await self.line(limit_s)
        event = json.loads(line)
        assert isinstance(event, dict) and "type" in event, line
        return event

    async def expect(
        self,
        type: str,
        *,
        skip: Iterable[str] = ("presence",),
        limit_s: float = TIMEOUT_S,
        **match: Any,
    ) -> dict[str, Any]:
        """Read until an event of ``type`` whose fields equal ``match``.

        Events whose type is in ``skip`` are passed over; anything else fails the test, so
        an unexpected error or message is never silently ignored.
        """
        skip = set(skip)
        with trio.fail_after(limit_s):
            while True:
                event = await self.recv()
                if event["type"] == type and all(event.get(k) == v for k, v in match.items()):
                    return event
                assert event["type"] in skip, f"expected {type} {match}, got {event}"

    async def expect_error(self, code: str, **match: Any) -> dict[str, Any]:
        event = await self.expect("error", **match)
        assert event["code"] == code, event
        assert isinstance(event["message"], str) and event["message"], event
        return event

    async def expect_closed(self, limit_s: float = TIMEOUT_S) -> list[bytes]:
        """Read until the server closes the connection; returns the lines it sent before."""
        lines: list[bytes] = []
        with trio.fail_after(limit_s):
            while True:
                try:
                    lines.append(await self.line())
                except Closed:
                    return lines

    async def drain_until_closed(self, limit_s: float = TIMEOUT_S) -> int:
        """Read and discard until EOF (for huge amounts); returns the byte count."""
        total = len(self._buf)
        self._buf.clear()
        with trio.fail_after(limit_s):
            while True:
                try:
                    data = await self.stream.receive_some(1 << 20)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    self._eof = True
                    return total
                total += len(data)

    # --- conveniences -------------------------------------------------------------

    async def login(self, user: str, password: str | None = None) -> dict[str, Any]:
        fields: dict[str, Any] = {"user": user}
        if password is not None:
            fields["password"] = password
        welcome = await self.request("login", **fields)
        assert welcome["type"] == "welcome", welcome
        self.user = welcome["user"]
        return welcome

    async def register(self, user: str, password: str) -> dict[str, Any]:
        welcome = await self.request("register", user=user, password=password)
        assert welcome["type"] == "welcome", welcome
        self.user = welcome["user"]
        return welcome

    async def ping(self) -> None:
        """Round trip: proves the connection is still served."""
        reply = await self.request("ping")
        assert reply["type"] == "pong", reply

    async def ping_next(self) -> None:
        """A round trip whose pong must be the very next thing received: nothing else was
        on its way to this connection."""
        reply = await self.request("ping", skip=())
        assert reply["type"] == "pong", reply

    async def aclose(self) -> None:
        with trio.move_on_after(1, shield=True):
            await self.stream.aclose()
