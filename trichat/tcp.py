"""The line-protocol listener: one task per connection, a reader and a writer each.

Owns: moving bytes between a socket and a :class:`Connection` (protocol.md "Transport"):
keepalive options for half-open detection, the login timeout, flushing on close. Must
never: parse or route; the session and the chat server do that.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from trichat.connection import Connection
from trichat.messages import Bye

if TYPE_CHECKING:
    from trichat.service import ChatService

log = logging.getLogger(__name__)

RECEIVE_BYTES = 65536
FLUSH_TIMEOUT_S = 5.0
LINGER_S = 1.0  # at most this long waiting for a closed client to close its side too
LINGER_READS = 16


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
    conn.raw_socket = _raw_socket(stream)
    try:
        with conn.cancel_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_write_loop, stream, conn)
                await _read_loop(server, stream, conn)
    finally:
        server.close_connection(conn)
        if conn.raw_socket is not None:
            conn.raw_socket.close()
            conn.raw_socket = None
        with trio.move_on_after(LINGER_S, shield=True):
            if conn.drop_reason is None:
                await _linger(stream)
            await stream.aclose()


async def _linger(stream: trio.abc.Stream) -> None:
    """Half-close, then read and drop what the client still sends until it closes too.

    Closing a socket with unread input makes the kernel send a reset, and a reset can make
    the client's kernel discard our last bytes (the ``bye``) before the client reads them.
    """
    if not isinstance(stream, trio.SocketStream):
        return
    try:
        await stream.send_eof()
        for _ in range(LINGER_READS):
            if not await stream.receive_some(RECEIVE_BYTES):
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return


def _raw_socket(stream: trio.abc.Stream) -> socket.socket | None:
    """A second handle on the connection's socket for direct, non-blocking writes.

    It is a dup of the descriptor, so closing either handle never closes the other's.
    """
    if not isinstance(stream, trio.SocketStream):
        return None
    raw = socket.socket(fileno=os.dup(stream.socket.fileno()))
    raw.setblocking(False)
    return raw


async def _refuse_full(server: ChatService, stream: trio.abc.Stream) -> None:
    with trio.move_on_after(1):
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(server.full_message())
    await trio.aclose_forcefully(stream)


async def _read_loop(server: ChatService, stream: trio.abc.Stream, conn: Connection) -> None:
    receive = _receiver(stream, conn)
    try:
        # Until login, reads have a deadline (protocol.md "Login timeout"); after it, none:
        # a cancel scope per read would cost more than the read.
        timeout = server.settings.login_timeout_s or float("inf")
        with trio.move_on_after(timeout) as login_clock:
            while conn.session.user is None and not conn.closing:
                data = await receive()
                if not data:
                    return
                await server.receive(conn, data)
        if login_clock.cancelled_caught:
            conn.close(Bye("login_timeout", "no login in time; closing"))
            return
        while not conn.closing:
            data = await receive()
            if not data:
                return
            await server.receive(conn, data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        conn.drop(f"connection lost: {exc}")
    finally:
        # The client closed its side, or we are closing: let the writer flush, then stop.
        conn.close(None)


def _receiver(stream: trio.abc.Stream, conn: Connection) -> Callable[[], Awaitable[bytes]]:
    raw = conn.raw_socket
    if raw is None:

        async def receive_stream() -> bytes:
            return bytes(await stream.receive_some(RECEIVE_BYTES))

        return receive_stream

    async def receive_raw() -> bytes:
        # Straight from the non-blocking socket; wait only when it has nothing: cheaper than
        # SocketStream.receive_some, which checks and wraps more than we need per read.
        while True:
            try:
                data = raw.recv(RECEIVE_BYTES)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(raw)
                continue
            await trio.lowlevel.checkpoint_if_cancelled()
            return data

    return receive_raw


async def _write_loop(stream: trio.abc.Stream, conn: Connection) -> None:
    try:
        while True:
            data = await conn.outbox.take()
            if not data:
                break
            conn.outbox.writer_busy = True
            if conn.closing:
                with trio.fail_after(FLUSH_TIMEOUT_S):
                    await stream.send_all(data)
            else:
                await stream.send_all(data)
            conn.outbox.writer_busy = False
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
        conn.drop(f"write failed: {exc!r}")
    conn.cancel_scope.cancel()
