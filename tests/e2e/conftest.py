"""Fixtures for end-to-end tests: real ``trichat serve`` processes, always killed (by pid)
when the test ends, whether it passed or not."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.proc import ServerProcess, base_env, trichat_command

Serve = Callable[..., ServerProcess]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    """``serve(*flags, data=None, env=None, wait=True)``: start a server on port 0.

    Listeners default to port 0 on 127.0.0.1 and data to ``tmp_path/data``; flags given
    later on the command line win. With ``wait`` the ready line has been read.
    """
    started: list[ServerProcess] = []

    def start(
        *flags: str,
        data: Path | None = None,
        env: dict[str, str] | None = None,
        defaults: bool = True,
        wait: bool = True,
    ) -> ServerProcess:
        args = ["serve"]
        if defaults:
            args += ["--host", "127.0.0.1", "--port", "0", "--web-port", "0"]
            args += ["--peer-port", "0", "--data", str(data or tmp_path / "data")]
        stderr_path = tmp_path / f"server-{len(started)}.stderr"
        with open(stderr_path, "wb") as stderr:
            proc = subprocess.Popen(
                trichat_command(*args, *flags),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env if env is not None else base_env(),
            )
        server = ServerProcess(proc, stderr_path)
        started.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.kill()
