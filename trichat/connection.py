"""One client connection as the shell sees it: its session, outbox and cancel scope.

Shared by the TCP and (later) WebSocket shells. Must never: decide anything about chat; it
only moves bytes between a stream and the session/outbox.
"""

from __future__ import annotations

import logging

import trio

from trichat.codec import RequestId
from trichat.messages import Bye, Event
from trichat.outbox import Outbox, SlowConsumer
from trichat.session import Session

log = logging.getLogger(__name__)


class Connection:
    """A client connection.

    Args:
        conn_id: the id the hub knows it by.
        peer: a printable address, for logs.
        session: its protocol state.
        outbox: its outgoing queue.
    """

    def __init__(self, conn_id: int, peer: str, session: Session, outbox: Outbox) -> None:
        self.id = conn_id
        self.peer = peer
        self.session = session
        self.outbox = outbox
        self.cancel_scope = trio.CancelScope()
        self.closing = False
        self.drop_reason: str | None = None

    def send(self, event: Event, req_id: RequestId = None) -> None:
        """Queue one event in this connection's mode."""
        self.send_bytes(self.session.render(event, req_id))

    def send_bytes(self, data: bytes) -> None:
        """Queue bytes already encoded; drops the connection if it is too slow to read."""
        try:
            self.outbox.put(data)
        except SlowConsumer as exc:
            self.drop(f"slow reader: {exc}")

    def close(self, bye: Bye) -> None:
        """Say goodbye, flush what is queued, then close."""
        if self.closing:
            return
        self.send(bye)
        self.closing = True
        self.session.close()
        self.outbox.close()

    def drop(self, reason: str) -> None:
        """Close at once, without flushing (the peer is too slow or gone)."""
        if self.drop_reason is None:
            self.drop_reason = reason
            log.warning(
                "dropping connection %d (%s, %s): %s",
                self.id,
                self.peer,
                self.session.user or "not logged in",
                reason,
            )
        self.closing = True
        self.outbox.close()
        self.cancel_scope.cancel()
