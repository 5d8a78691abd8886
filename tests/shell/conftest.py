"""Fixtures for the shell tests: clients wired to ``tcp.serve_connection`` over memory
streams, and whole servers (``run_server``) on 127.0.0.1 port 0."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from tests.conftest import SettingsFactory
from tests.shell.client import Client
from trichat import tcp
from trichat.server import run_server
from trichat.service import ChatService

Connect = Callable[..., Awaitable[Client]]


@pytest.fixture
def connect(nursery: trio.Nursery) -> Connect:
    """``await connect(service, lockstep=False)``: a client served by serve_connection.

    ``lockstep=True`` uses a stream with no buffering at all, so a client that stops
    reading blocks the server's writes at once (a slow consumer without megabytes).
    """

    async def open_client(service: ChatService, *, lockstep: bool = False) -> Client:
        pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
        client_end, server_end = pair()
        done = trio.Event()

        async def serve() -> None:
            try:
                await tcp.serve_connection(service, server_end)
            finally:
                done.set()

        nursery.start_soon(serve)
        return Client(client_end, done)

    return open_client


@attrs.define
class RunningServer:
    service: ChatService
    ready: str
    port: int
    stop: trio.Event
    finished: trio.Event

    async def connect(self) -> Client:
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        return Client(stream)

    async def shut_down(self, limit_s: float = 15) -> None:
        self.stop.set()
        with trio.fail_after(limit_s):
            await self.finished.wait()


StartServer = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
async def start_server(
    nursery: trio.Nursery, make_settings: SettingsFactory
) -> AsyncIterator[StartServer]:
    """``await start_server(**setting_overrides)``: run_server in-process on port 0."""
    running: list[RunningServer] = []

    async def start(**overrides: Any) -> RunningServer:
        settings = make_settings(**overrides)
        out = io.StringIO()
        stop = trio.Event()
        finished = trio.Event()

        async def run(*, task_status: trio.TaskStatus[ChatService]) -> None:
            try:
                await run_server(settings, ready_out=out, stop=stop, task_status=task_status)
            finally:
                finished.set()

        with trio.fail_after(10):
            service = await nursery.start(run)
        ready = out.getvalue().strip()
        fields = dict(part.split("=", 1) for part in ready.split()[1:])
        port = int(fields["line"].rpartition(":")[2])
        server = RunningServer(service, ready, port, stop, finished)
        running.append(server)
        return server

    yield start
    for server in running:
        if not server.finished.is_set():
            await server.shut_down()
