"""Every setting of a server, with its default, unit and meaning.

Owns: the names and defaults of all limits (protocol.md "Limits and settings" lists them). Each
field becomes a ``trichat serve --flag`` and an env var ``TRICHAT_<FLAG>`` in cli.py, so a
limit added here is documented and settable without more code.
"""

from __future__ import annotations

from typing import Any

import attrs


def setting(default: Any, help: str, *, flag: bool = True) -> Any:
    return attrs.field(default=default, metadata={"help": help, "flag": flag})


@attrs.frozen
class Settings:
    name: str = setting("s1", "this server's name, unique in the mesh")
    host: str = setting("127.0.0.1", "address every listener binds to")
    port: int = setting(7000, "line-protocol TCP port (0 = any free port)")
    web_port: int = setting(3000, "web page and WebSocket port (0 = off)")
    peer_port: int = setting(7100, "port other trichat servers link to (0 = any free port)")
    peer: tuple[str, ...] = setting((), "HOST:PORT of a mesh member to join (repeatable)")
    data: str = setting("./trichat-data", "folder holding this server's SQLite database")
    cluster_secret: str = setting("", "shared secret peers must prove they know")
    advertise: str = setting(
        "",
        "HOST:PORT other servers dial to reach this one's peer port "
        "(default: --host and the peer port; set it when binding 0.0.0.0)",
    )
    rate_limit: float = setting(20.0, "requests per second a connection may make (0 = no limit)")
    rate_burst_s: float = setting(
        5.0, "burst allowance, in seconds' worth of --rate-limit, after a quiet spell"
    )
    rate_limit_strikes: int = setting(
        50,
        "refused requests in a row that close the connection (the last gets bye, "
        "the others rate_limited)",
    )
    max_line_bytes: int = setting(65536, "longest request line accepted, in bytes")
    max_text_chars: int = setting(4096, "longest message text, in characters")
    max_connections: int = setting(10000, "client connections served at once; more get server_full")
    outbox_bytes: int = setting(
        262144, "bytes queued for one slow reader before it is disconnected"
    )
    login_timeout_s: float = setting(
        300.0, "seconds a connection may stay without logging in before it is closed (0 = never)"
    )
    keepalive_s: int = setting(
        10,
        "TCP keepalive idle time and probe interval, seconds; a vanished client is dropped "
        "after about 4x this (half-open detection; 0 = off)",
    )
    users_page_size: int = setting(500, "users per page in welcome and users replies")
    store_batch_max: int = setting(512, "most storage operations written in one transaction")
    store_queue_max: int = setting(
        4096, "storage operations waiting to be written before senders are slowed down"
    )
    dedup_window_s: int = setting(
        86400, "seconds during which a send with a repeated id, to and text is the same message"
    )
    min_password_chars: int = setting(8, "shortest password accepted by register")
    max_password_chars: int = setting(1024, "longest password accepted")
    remembered_guests: int = setting(10000, "gone guests remembered for status and offline replies")
    shutdown_grace_s: float = setting(
        5.0, "seconds connections get to flush their goodbyes on SIGTERM"
    )

    @property
    def rate_burst(self) -> float:
        return max(1.0, self.rate_limit * self.rate_burst_s)


def flag_fields() -> list[attrs.Attribute[Any]]:
    """The settings that are command-line flags, in declaration order."""
    return [f for f in attrs.fields(Settings) if f.metadata.get("flag", True)]
