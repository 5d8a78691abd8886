"""Wiring one server process: storage, the chat service, listeners, shutdown.

Owns: the startup order (database, listeners, then ``ready``) and the shutdown sequence of
protocol.md "Starting and stopping": on SIGINT/SIGTERM stop accepting, tell every client
``bye``, give connections ``shutdown_grace_s`` to flush, write what storage has queued, close
the database last. Must never: hold chat logic.
"""

from __future__ import annotations

import errno
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TextIO

import attrs
import trio

from trichat import tcp, web
from trichat.config import Settings
from trichat.hub import Hub
from trichat.peers import PeerManager
from trichat.service import ChatService
from trichat.store import Database, Store

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The server can't start (a port in use, a data folder it can't write); one line."""


async def _listen(host: str, port: int, what: str) -> list[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(port, host=host, backlog=1024)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"{what} port {port} on {host} is already in use") from None
        raise StartupError(f"can't listen on {host}:{port} for {what}: {exc.strerror}") from None


def _address(listeners: list[trio.SocketListener]) -> str:
    host, port = listeners[0].socket.getsockname()[:2]
    return f"{host}:{port}"


async def _open_database(settings: Settings) -> Database:
    try:
        return await trio.to_thread.run_sync(Database, settings.data, settings.name)
    except Exception as exc:
        raise StartupError(f"can't open the database in {settings.data}: {exc}") from None


async def run_server(
    settings: Settings,
    *,
    ready_out: TextIO | None = None,
    stop: trio.Event | None = None,
    task_status: trio.TaskStatus[ChatService] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one server until SIGINT/SIGTERM (or ``stop`` is set), then shut down cleanly.

    Args:
        settings: all settings.
        ready_out: where the ``ready`` line goes (stdout by default).
        stop: set it to shut down as a signal would (for tests; signals need the main thread).

    Raises:
        StartupError: a listener or the database could not be opened.
    """
    # Listeners and the database open before any nursery, so a port in use or an unwritable
    # folder surfaces as one StartupError, not inside an exception group.
    listeners = await _open_listeners(settings)
    try:
        db = await _open_database(settings)
    except StartupError:
        for listener in [*listeners.line, *listeners.peer, *listeners.web]:
            await listener.aclose()
        raise
    try:
        service = build_service(settings, db)
        store = service.store
        async with trio.open_nursery() as storage:
            storage.start_soon(store.run)
            try:
                await _serve(settings, listeners, service, ready_out, stop, task_status)
            finally:
                store.close()  # the writer finishes what is queued, then returns
    finally:
        db.close()


def build_service(settings: Settings, db: Database) -> ChatService:
    """The chat service over an open database: its routing core and storage queue."""
    hub = Hub(
        settings.name,
        accounts=db.accounts(),
        last_seen=db.last_seen(),
        next_seq=db.next_seq(),
        incarnation=db.incarnation,
        max_text_chars=settings.max_text_chars,
        users_page_size=settings.users_page_size,
        remembered_guests=settings.remembered_guests,
    )
    store = Store(db, batch_max=settings.store_batch_max, queue_max=settings.store_queue_max)
    return ChatService(settings, hub, store)


@attrs.frozen
class Listeners:
    line: list[trio.SocketListener]
    peer: list[trio.SocketListener]
    web: list[trio.SocketListener]


async def _open_listeners(settings: Settings) -> Listeners:
    opened: list[trio.SocketListener] = []
    try:
        line = await _listen(settings.host, settings.port, "line-protocol")
        opened += line
        peer = await _listen(settings.host, settings.peer_port, "peer")
        opened += peer
        web = await _listen(settings.host, settings.web_port, "web") if settings.web_port else []
    except StartupError:
        for listener in opened:
            await listener.aclose()
        raise
    return Listeners(line, peer, web)


async def _serve(
    settings: Settings,
    opened: Listeners,
    service: ChatService,
    ready_out: TextIO | None,
    stop: trio.Event | None,
    task_status: trio.TaskStatus[ChatService],
) -> None:
    line, peer, web_listeners = opened.line, opened.peer, opened.web
    peers = PeerManager(
        service,
        settings.name,
        settings.advertise or _address(peer),
        settings.cluster_secret,
        settings.peer,
        ready_out,
    )
    service.peers = peers
    async with trio.open_nursery() as background:
        await background.start(service.run_flusher)
        await background.start(peers.run)
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as listeners:
                listeners.start_soon(_accept, line, handlers, service, tcp.serve_connection)
                listeners.start_soon(_accept, peer, background, service, _serve_peer)
                if web_listeners:
                    listeners.start_soon(_accept, web_listeners, handlers, service, web.serve_http)
                _print_ready(settings, opened, ready_out)
                task_status.started(service)
                await (stop.wait() if stop is not None else _wait_for_signal())
                log.info("shutting down")
                listeners.cancel_scope.cancel()
            service.closing = True
            service.shutdown_connections()
            handlers.cancel_scope.deadline = trio.current_time() + settings.shutdown_grace_s
        background.cancel_scope.cancel()


def _print_ready(settings: Settings, opened: Listeners, out: TextIO | None) -> None:
    web_at = _address(opened.web) if opened.web else "off"
    print(
        f"ready name={settings.name} line={_address(opened.line)} web={web_at} "
        f"peer={_address(opened.peer)}",
        file=out or sys.stdout,
        flush=True,
    )


Handler = Callable[[ChatService, trio.SocketStream], Awaitable[None]]


async def _accept(
    listeners: list[trio.SocketListener],
    handlers: trio.Nursery,
    service: ChatService,
    handler: Handler,
) -> None:
    # trio.serve_listeners would start handlers in the listener's nursery; ours live in the
    # handler nursery so that stopping the listeners leaves connections to say goodbye.
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_one, listener, handlers, service, handler)


async def _accept_one(
    listener: trio.SocketListener, handlers: trio.Nursery, service: ChatService, handler: Handler
) -> None:
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                # Out of file descriptors and the like: wait a little instead of spinning.
                log.error("accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            handlers.start_soon(_guarded, handler, service, stream)


async def _guarded(handler: Handler, service: ChatService, stream: trio.SocketStream) -> None:
    # One connection's bug must never take the server down.
    try:
        await handler(service, stream)
    except Exception:
        log.exception("connection handler failed")


async def _serve_peer(service: ChatService, stream: trio.SocketStream) -> None:
    assert service.peers is not None
    await service.peers.serve_incoming(stream)


async def _wait_for_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            return
