"""Helpers for end-to-end tests: ``trichat serve`` as a real process, and a blocking
socket client. Every wait has a timeout."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

READY_TIMEOUT_S = 20.0
SOCKET_TIMEOUT_S = 10.0


class ServerProcess:
    """One ``python -m trichat serve`` process and the addresses from its ready line."""

    def __init__(self, proc: subprocess.Popen[bytes], stderr_path: Path) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.stderr_path = stderr_path
        self.ready = ""
        self.fields: dict[str, str] = {}

    @property
    def port(self) -> int:
        return int(self.fields["line"].rpartition(":")[2])

    @property
    def peer_port(self) -> int:
        return int(self.fields["peer"].rpartition(":")[2])

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> str:
        """Read stdout until the ``ready`` line; fails if the process exits or is slow."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no ready line in {timeout} s; stderr:\n{self.stderr()}")
            readable, _, _ = select.select([self.proc.stdout], [], [], left)
            if readable:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    code = self.proc.wait(5)
                    raise AssertionError(f"server exited ({code}) before ready:\n{self.stderr()}")
                buf += chunk
        line = buf.split(b"\n", 1)[0].decode()
        assert line.startswith("ready "), line
        self.ready = line
        self.fields = dict(part.split("=", 1) for part in line.split()[1:])
        return line

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL by pid if it still runs, and reap it."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def connect(self) -> LineClient:
        return LineClient(self.port)


def trichat_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "trichat", *args]


def base_env(**extra: str) -> dict[str, str]:
    """The environment without any TRICHAT_ variables from outside, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRICHAT_")}
    env.update(extra)
    return env


def run_trichat(*args: str, env: dict[str, str] | None = None, timeout: float = 20.0) -> Any:
    """Run a trichat command to completion (it must end by itself within ``timeout``)."""
    return subprocess.run(
        trichat_command(*args),
        env=env if env is not None else base_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


class LineClient:
    """A blocking line-protocol client on 127.0.0.1 with a timeout on every read."""

    def __init__(self, port: int, *, timeout: float = SOCKET_TIMEOUT_S) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.settimeout(timeout)
        self._buf = b""

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, type: str, **fields: Any) -> None:
        self.send_raw(json.dumps({"type": type, **fields}).encode() + b"\n")

    def line(self) -> bytes | None:
        """The next line without its terminator, or None at end of stream."""
        while b"\n" not in self._buf:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.removesuffix(b"\r")

    def recv(self) -> dict[str, Any]:
        line = self.line()
        assert line is not None, "the server closed the connection"
        event: dict[str, Any] = json.loads(line)
        return event

    def expect(self, type: str, *, skip: tuple[str, ...] = ("presence",), **match: Any) -> Any:
        while True:
            event = self.recv()
            if event["type"] == type and all(event.get(k) == v for k, v in match.items()):
                return event
            assert event["type"] in skip, f"expected {type} {match}, got {event}"

    def rest(self) -> list[bytes]:
        """Every line until the server closes the connection."""
        lines = []
        while (line := self.line()) is not None:
            lines.append(line)
        return lines

    def login(self, user: str, password: str | None = None) -> dict[str, Any]:
        fields: dict[str, Any] = {"user": user, "id": "login"}
        if password is not None:
            fields["password"] = password
        self.send("login", **fields)
        return self.expect("welcome", id="login")  # type: ignore[no-any-return]

    def register(self, user: str, password: str) -> dict[str, Any]:
        self.send("register", user=user, password=password, id="register")
        return self.expect("welcome", id="register")  # type: ignore[no-any-return]
