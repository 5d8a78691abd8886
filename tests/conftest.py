"""Fixtures shared by the test suites: settings on a temporary data folder and an in-process
chat service wired the way ``server.run_server`` wires it (without listeners)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from trichat import server
from trichat.config import Settings
from trichat.service import ChatService
from trichat.store import Database

SettingsFactory = Callable[..., Settings]
ServiceFactory = Callable[..., Awaitable[ChatService]]


@pytest.fixture
def make_settings(tmp_path: Path) -> SettingsFactory:
    """Settings for a test: data in ``tmp_path``, every listener on port 0, 127.0.0.1."""

    def make(**overrides: Any) -> Settings:
        base = attrs.evolve(
            Settings(),
            host="127.0.0.1",
            data=str(tmp_path / "data"),
            port=0,
            web_port=0,
            peer_port=0,
        )
        return attrs.evolve(base, **overrides)

    return make


def build_service(settings: Settings) -> tuple[ChatService, Database]:
    """A chat service over a fresh (or existing) database, as run_server builds it."""
    db = Database(settings.data)
    return server.build_service(settings, db), db


@pytest.fixture
async def make_service(
    nursery: trio.Nursery, make_settings: SettingsFactory
) -> AsyncIterator[ServiceFactory]:
    """``await make_service(**setting_overrides)``: a service with its store task running."""
    opened: list[tuple[ChatService, Database, trio.Event]] = []

    async def run_store(
        service: ChatService, done: trio.Event, *, task_status: trio.TaskStatus[None]
    ) -> None:
        try:
            await service.store.run(task_status=task_status)
        finally:
            done.set()

    async def make(**overrides: Any) -> ChatService:
        service, db = build_service(make_settings(**overrides))
        done = trio.Event()
        opened.append((service, db, done))
        await nursery.start(run_store, service, done)
        return service

    yield make
    # The store writes what is queued, then stops; only then may the database close.
    for service, _, _ in opened:
        service.store.close()
    with trio.move_on_after(10):
        for _, _, done in opened:
            await done.wait()
    for _, db, _ in opened:
        db.close()


@pytest.fixture
def rlimit_nofile() -> Iterator[int]:
    """Raise this process's open-file limit as far as allowed; restored afterwards."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        yield want
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
