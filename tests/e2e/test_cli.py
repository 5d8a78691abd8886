"""The ``trichat`` command line: help, bad flags, ports in use, environment variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import Serve
from tests.e2e.proc import base_env, run_trichat
from trichat.config import flag_fields

pytestmark = pytest.mark.e2e

CONTRACT_SERVE_FLAGS = [
    "--port",
    "--web-port",
    "--peer-port",
    "--name",
    "--host",
    "--peer",
    "--data",
    "--cluster-secret",
    "--rate-limit",
]


def test_top_level_help_lists_commands() -> None:
    result = run_trichat("--help")
    assert result.returncode == 0
    for command in ("serve", "cluster", "client"):
        assert command in result.stdout


def test_serve_help_mentions_every_flag_and_env_var() -> None:
    result = run_trichat("serve", "--help")
    assert result.returncode == 0
    text = result.stdout
    flags = CONTRACT_SERVE_FLAGS + ["--" + f.name.replace("_", "-") for f in flag_fields()]
    missing = [flag for flag in flags if flag not in text]
    assert not missing, f"not in `trichat serve --help`: {missing}"
    for flag in CONTRACT_SERVE_FLAGS:
        env = "TRICHAT_" + flag[2:].upper().replace("-", "_")
        assert env in text, f"{env} not in `trichat serve --help`"


@pytest.mark.parametrize(
    ("command", "flags"),
    [("cluster", ["--size"]), ("client", ["--server", "--user"])],
)
def test_other_commands_help(command: str, flags: list[str]) -> None:
    result = run_trichat(command, "--help")
    assert result.returncode == 0
    for flag in flags:
        assert flag in result.stdout


@pytest.mark.parametrize(
    "flags",
    [
        ["--bogus"],
        ["--port", "notanumber"],
        ["--port", "70000"],
        ["--port", "-1"],
        ["--rate-limit", "fast"],
        ["--rate-limit", "-1"],
        ["--name", "has space"],
        ["--peer", "no-port-here"],
        ["--max-line-bytes", "0"],
    ],
    ids=lambda flags: " ".join(flags),
)
def test_bad_flag_exits_non_zero_with_a_reason(flags: list[str], tmp_path: Path) -> None:
    result = run_trichat("serve", "--data", str(tmp_path / "d"), *flags)
    assert result.returncode != 0
    assert "ready" not in result.stdout
    assert "Traceback" not in result.stderr
    # One line that names the culprit (contract: "a one-line reason on a bad flag").
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("trichat")
    assert flags[0] in lines[0] or flags[0].lstrip("-") in lines[0], lines[0]


@pytest.mark.parametrize("which", ["line", "peer"])
def test_port_in_use_exits_with_one_line(serve: Serve, tmp_path: Path, which: str) -> None:
    first = serve()
    port = first.port if which == "line" else first.peer_port
    flag = "--port" if which == "line" else "--peer-port"
    second = serve(flag, str(port), data=tmp_path / "second", wait=False)
    assert second.wait(20) != 0
    stderr = second.stderr()
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert str(port) in lines[0] and "in use" in lines[0]
    assert second.proc.stdout is not None and b"ready" not in second.proc.stdout.read()
    # The first server still serves.
    client = first.connect()
    try:
        client.send("ping", id=1)
        assert client.recv() == {"type": "pong", "id": 1}
    finally:
        client.close()


def test_settings_from_environment(serve: Serve, tmp_path: Path) -> None:
    env = base_env(
        TRICHAT_NAME="from-env",
        TRICHAT_HOST="127.0.0.1",
        TRICHAT_PORT="0",
        TRICHAT_WEB_PORT="0",
        TRICHAT_PEER_PORT="0",
        TRICHAT_DATA=str(tmp_path / "env-data"),
        TRICHAT_MAX_TEXT_CHARS="10",
        TRICHAT_RATE_LIMIT="0",
    )
    server = serve(env=env, defaults=False)
    assert server.fields["name"] == "from-env"
    assert server.port != 7000 and server.fields["web"] == "off"
    assert (tmp_path / "env-data").is_dir()
    client = server.connect()
    try:
        assert client.login("alice")["server"] == "from-env"
        client.send("broadcast", text="x" * 11, id=1)
        assert client.expect("error", id=1)["code"] == "text_too_long"
        # No flood control: 300 requests at once are all served.
        client.send_raw(b'{"type":"ping"}\n' * 300)
        assert all(client.recv()["type"] == "pong" for _ in range(300))
    finally:
        client.close()


def test_flag_wins_over_environment(serve: Serve) -> None:
    server = serve("--name", "from-flag", env=base_env(TRICHAT_NAME="from-env"))
    assert server.fields["name"] == "from-flag"


def test_bad_environment_value_exits_with_a_reason(tmp_path: Path) -> None:
    env = base_env(TRICHAT_PORT="notanumber", TRICHAT_DATA=str(tmp_path / "d"))
    result = run_trichat("serve", env=env)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "port" in lines[0].lower(), result.stderr
