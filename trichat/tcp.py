"""The line-protocol listener: one task per connection, a reader and a writer each.

Owns: moving bytes between a socket and a :class:`Connection` (protocol.md "Transport"):
keepalive options for half-open detection, the login timeout, flushing on close. Must
never: parse or route; the session and the chat server do that.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from typing import TYPE_CHECKING

import trio

from trichat.connection import Connection
from trichat.messages import Bye

if TYPE_CHECKING:
    from trichat.service import ChatService

log = logging.getLogger(__name__)

RECEIVE_BYTES = 65536
FLUSH_TIMEOUT_S = 5.0


def set_keepalive(stream: trio.abc.Stream, interval_s: int) -> None:
    """Make the kernel notice a vanished peer: idle ``interval_s``, then 3 probes that far
    apart, and give up on unacknowledged writes after about as long (TCP_USER_TIMEOUT)."""
    if not isinstance(stream, trio.SocketStream) or interval_s <= 0:
        return
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", interval_s),
        ("TCP_KEEPINTVL", interval_s),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", interval_s * 4 * 1000),
    ):
        option = getattr(socket, name, None)
        if option is not None:
            stream.setsockopt(socket.IPPROTO_TCP, option, value)


def peer_name(stream: trio.abc.Stream) -> str:
    if isinstance(stream, trio.SocketStream):
        try:
            host, port = stream.socket.getpeername()[:2]
            return f"{host}:{port}"
        except OSError:
            pass
    return "memory"


async def serve_connection(server: ChatService, stream: trio.abc.Stream) -> None:
    """Serve one client until it leaves, is dropped or the server shuts down."""
    conn = server.open_connection(peer_name(stream))
    if conn is None:
        await _refuse_full(server, stream)
        return
    set_keepalive(stream, server.settings.keepalive_s)
    try:
        with conn.cancel_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_write_loop, stream, conn)
                await _read_loop(server, stream, conn)
    finally:
        server.close_connection(conn)
        with trio.move_on_after(1, shield=True):
            await stream.aclose()


async def _refuse_full(server: ChatService, stream: trio.abc.Stream) -> None:
    with trio.move_on_after(1):
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(server.full_message())
    await trio.aclose_forcefully(stream)


async def _read_loop(server: ChatService, stream: trio.abc.Stream, conn: Connection) -> None:
    deadline = trio.current_time() + server.settings.login_timeout_s
    while not conn.closing:
        with trio.move_on_at(deadline if conn.session.user is None else float("inf")):
            try:
                data = await stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                conn.drop(f"connection lost: {exc}")
                return
            if not data:
                break
            await server.receive(conn, bytes(data))
            continue
        conn.close(Bye("login_timeout", "no login in time; closing"))
    # The client closed its side, or we are closing: let the writer flush, then stop.
    conn.closing = True
    conn.outbox.close()


async def _write_loop(stream: trio.abc.Stream, conn: Connection) -> None:
    try:
        while True:
            data = await conn.outbox.take()
            if not data:
                break
            with trio.fail_after(FLUSH_TIMEOUT_S) if conn.closing else _no_limit():
                await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
        conn.drop(f"write failed: {exc!r}")
    conn.cancel_scope.cancel()


def _no_limit() -> trio.CancelScope:
    return trio.CancelScope()
