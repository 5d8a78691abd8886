"""The web port (protocol.md "Web port").

The web client and its WebSocket bridge arrive in a later version; until then the port is
claimed, so a cluster's layout does not change, and any HTTP request gets a clear 503.
Must never: hold a request head of more than ``MAX_HEAD_BYTES`` or wait on a client forever.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from trichat.service import ChatService

MAX_HEAD_BYTES = 8192
HEAD_TIMEOUT_S = 10.0

_BODY = b"The trichat web client is not in this version yet: use the line protocol (nc).\n"
_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: " + str(len(_BODY)).encode() + b"\r\nConnection: close\r\n\r\n" + _BODY
)


async def serve_http(service: ChatService, stream: trio.abc.Stream) -> None:
    """Answer one HTTP request with 503 and close."""
    head = b""
    with trio.move_on_after(HEAD_TIMEOUT_S):
        try:
            while b"\r\n\r\n" not in head and len(head) < MAX_HEAD_BYTES:
                data = await stream.receive_some(MAX_HEAD_BYTES)
                if not data:
                    break
                head += data
            await stream.send_all(_RESPONSE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await trio.aclose_forcefully(stream)
