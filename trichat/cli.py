"""The ``trichat`` command: ``serve``, ``cluster`` and ``client`` (protocol.md "Command line").

Every setting in config.py is a ``serve`` flag and an env var ``TRICHAT_<FLAG>``; a flag on
the command line wins over the env var, which wins over the default.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import attrs
import trio

from trichat import __version__
from trichat.config import Settings, flag_fields


def _env_name(field: attrs.Attribute[Any]) -> str:
    return "TRICHAT_" + field.name.upper()


def _flag_name(field: attrs.Attribute[Any]) -> str:
    return "--" + field.name.replace("_", "-")


def _convert(field: attrs.Attribute[Any], raw: str) -> Any:
    kind: Any = type(field.default)
    if kind is tuple:
        return tuple(p.strip() for p in raw.split(",") if p.strip())
    return kind(raw)


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, defaulting to its env var, then to config.py's default."""
    for field in flag_fields():
        env = _env_name(field)
        kind = type(field.default)
        # argparse converts a string default with ``type`` too, so a bad env value gets the
        # same one-line "invalid int value" error as a bad flag.
        default = os.environ.get(env, field.default) if kind is not tuple else field.default
        if kind is tuple and env in os.environ:
            default = _convert(field, os.environ[env])
        help_text = f"{field.metadata['help']} (env {env}; default: %(default)s)"
        if kind is tuple:
            parser.add_argument(
                _flag_name(field),
                action="append",
                default=None,
                metavar="HOST:PORT",
                help=f"{field.metadata['help']} (env {env}, comma-separated)",
            )
            parser.set_defaults(**{f"{field.name}_env": default})
        else:
            parser.add_argument(_flag_name(field), type=kind, default=default, help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    values: dict[str, Any] = {}
    for field in flag_fields():
        value = getattr(args, field.name)
        if type(field.default) is tuple:
            value = tuple(value) if value is not None else getattr(args, f"{field.name}_env")
        values[field.name] = value
    return Settings(**values)


def check_settings(s: Settings) -> str | None:
    """A one-line reason the settings can't work, or None."""
    from trichat.names import is_valid_name

    if not is_valid_name(s.name):
        return f"--name {s.name!r}: a server name is 1-32 letters, digits, '_', '-' or '.'"
    for flag in ("port", "web_port", "peer_port"):
        if not 0 <= getattr(s, flag) <= 65535:
            return f"--{flag.replace('_', '-')} must be between 0 and 65535"
    for flag in (
        "max_line_bytes",
        "max_text_chars",
        "max_connections",
        "outbox_bytes",
        "users_page_size",
        "store_batch_max",
        "store_queue_max",
    ):
        if getattr(s, flag) < 1:
            return f"--{flag.replace('_', '-')} must be at least 1"
    for flag in (
        "rate_limit",
        "rate_burst_s",
        "rate_limit_strikes",
        "login_timeout_s",
        "keepalive_s",
        "dedup_window_s",
        "min_password_chars",
        "remembered_guests",
        "shutdown_grace_s",
    ):
        if getattr(s, flag) < 0:
            return f"--{flag.replace('_', '-')} must be 0 or more"
    if s.max_password_chars < max(1, s.min_password_chars):
        return "--max-password-chars must be at least --min-password-chars (and 1)"
    for peer in s.peer:
        host, _, port = peer.rpartition(":")
        if not host or not port.isdigit():
            return f"--peer {peer!r}: expected HOST:PORT"
    return None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not the whole usage: the reason is what a person needs.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="trichat",
        description="trichat: a small distributed chat server. "
        "Talk to it with `nc localhost 7000` and type /help.",
    )
    parser.add_argument("--version", action="version", version=f"trichat {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("TRICHAT_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="log detail (env TRICHAT_LOG_LEVEL)",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    serve = sub.add_parser("serve", help="run one server", description="Run one trichat server.")
    add_settings_flags(serve)
    cluster = sub.add_parser(
        "cluster",
        help="run N linked servers on this machine",
        description="Start N servers as separate processes (server i: line 7000+i, "
        "web 3000+i, peer 7100+i) and stop them all on Ctrl-C.",
    )
    cluster.add_argument(
        "--size",
        type=int,
        default=int(os.environ.get("TRICHAT_SIZE", "3")),
        help="how many servers (env TRICHAT_SIZE; default: %(default)s)",
    )
    cluster.add_argument("--host", default=os.environ.get("TRICHAT_HOST", "127.0.0.1"))
    cluster.add_argument(
        "--data",
        default=os.environ.get("TRICHAT_DATA", "./trichat-data"),
        help="parent folder; server i keeps its database in DATA/s<i>",
    )
    client = sub.add_parser(
        "client",
        help="the terminal client",
        description="Chat from a terminal: type /help once connected.",
    )
    client.add_argument(
        "--server",
        default=os.environ.get("TRICHAT_SERVER", "127.0.0.1:7000"),
        help="HOST:PORT (env TRICHAT_SERVER; default: %(default)s)",
    )
    client.add_argument(
        "--user",
        default=os.environ.get("TRICHAT_USER"),
        help="log in as this guest name at once (env TRICHAT_USER)",
    )
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    if args.command == "serve":
        return _serve(args)
    if args.command == "cluster":
        from trichat.cluster import run_cluster

        return run_cluster(args.size, host=args.host, data=args.data, log_level=args.log_level)
    from clients.terminal import run_client

    return run_client(args.server, args.user)


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except (TypeError, ValueError) as exc:
        print(f"trichat: bad setting: {exc}", file=sys.stderr)
        return 2
    problem = check_settings(settings)
    if problem:
        print(f"trichat: {problem}", file=sys.stderr)
        return 2
    return run_or_explain(settings)


def run_or_explain(settings: Settings) -> int:
    """Run a server; a startup problem is one line on stderr and exit status 1."""
    from trichat.server import StartupError, run_server

    try:
        trio.run(run_server, settings)
    except StartupError as exc:
        print(f"trichat: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
