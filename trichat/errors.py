"""The wire error codes and the one exception that carries them.

Owns: the list of error codes of protocol.md section "Error codes". Must never: know about
sockets. A ProtocolError is always answered with an ``error`` object; it never closes the
connection by itself (the shell decides that, e.g. for a flood).
"""

from __future__ import annotations

from typing import Final

BAD_JSON: Final = "bad_json"
BAD_REQUEST: Final = "bad_request"
UNKNOWN_TYPE: Final = "unknown_type"
LINE_TOO_LONG: Final = "line_too_long"
NOT_LOGGED_IN: Final = "not_logged_in"
ALREADY_LOGGED_IN: Final = "already_logged_in"
BAD_NAME: Final = "bad_name"
NAME_TAKEN: Final = "name_taken"
AUTH_FAILED: Final = "auth_failed"
WEAK_PASSWORD: Final = "weak_password"
NO_SUCH_USER: Final = "no_such_user"
OFFLINE: Final = "offline"
TEXT_TOO_LONG: Final = "text_too_long"
RATE_LIMITED: Final = "rate_limited"
# Extensions to the contract (protocol.md "Error codes"): the server is at its connection limit,
# or an internal failure (storage) kept a request from completing.
SERVER_FULL: Final = "server_full"
UNAVAILABLE: Final = "unavailable"

ALL_CODES: Final = frozenset(
    {
        BAD_JSON,
        BAD_REQUEST,
        UNKNOWN_TYPE,
        LINE_TOO_LONG,
        NOT_LOGGED_IN,
        ALREADY_LOGGED_IN,
        BAD_NAME,
        NAME_TAKEN,
        AUTH_FAILED,
        WEAK_PASSWORD,
        NO_SUCH_USER,
        OFFLINE,
        TEXT_TOO_LONG,
        RATE_LIMITED,
        SERVER_FULL,
        UNAVAILABLE,
    }
)


class ProtocolError(Exception):
    """A request that can't be served; becomes ``{"type": "error", "code": ..., ...}``.

    Args:
        code: one of the wire error codes above.
        message: a sentence for a person.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
