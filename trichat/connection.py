"""One client connection as the shell sees it: its session, outbox and cancel scope.

Shared by the TCP and (later) WebSocket shells. Must never: decide anything about chat; it
only moves bytes between a stream and the session/outbox.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import trio

from trichat.codec import RequestId
from trichat.messages import Bye, Event
from trichat.outbox import Outbox, SlowConsumer
from trichat.session import Session

log = logging.getLogger(__name__)

EARLY_FLUSH_BYTES = 32768


class Connection:
    """A client connection.

    Args:
        conn_id: the id the hub knows it by.
        peer: a printable address, for logs.
        session: its protocol state.
        outbox: its outgoing queue.
        on_dirty: called once when data is queued, so the data gets flushed at the end of
            this pass of the event loop; None wakes the writer task instead.
    """

    def __init__(
        self,
        conn_id: int,
        peer: str,
        session: Session,
        outbox: Outbox,
        on_dirty: Callable[[Connection], None] | None = None,
    ) -> None:
        self.id = conn_id
        self.peer = peer
        self.session = session
        self.outbox = outbox
        self.cancel_scope = trio.CancelScope()
        self.closing = False
        self.drop_reason: str | None = None
        self.raw_socket: socket.socket | None = None  # for direct writes; see outbox.py
        self.dirty = False
        self._on_dirty = on_dirty
        self.pending_stores = 0  # sends waiting for storage: their `sent` must go out first
        self._closing_bye: Bye | None = None
        self._close_deferred = False

    def send(self, event: Event, req_id: RequestId = None) -> None:
        """Queue one event in this connection's mode."""
        self.send_bytes(self.session.render(event, req_id))

    def send_bytes(self, data: bytes) -> None:
        """Queue bytes already encoded; drops the connection if it is too slow to read."""
        if self.outbox.queued_bytes >= EARLY_FLUSH_BYTES and self.dirty:
            # Much is queued in this pass already (a burst from many clients): hand it to
            # the kernel now, so that the outbox limit counts only what the reader has not
            # taken, never what we had not yet tried to write.
            self.flush()
        try:
            self.outbox.put(data)
        except SlowConsumer as exc:
            self.drop(f"slow reader: {exc}")
            return
        if self.dirty:
            return
        if self._on_dirty is None:
            self.outbox.wake_writer()
        else:
            self.dirty = True
            self._on_dirty(self)

    def flush(self) -> None:
        """Write what is queued now if the kernel takes it; else leave it to the writer.

        The connection may stay on the flusher's list; flushing it again there is harmless.
        """
        self.dirty = False
        if self.raw_socket is None or self.outbox.writer_busy or self.closing:
            self.outbox.wake_writer()
            return
        data = self.outbox.take_nowait()
        if not data:
            return
        try:
            sent = self.raw_socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.drop(f"write failed: {exc}")
            return
        if sent < len(data):
            self.outbox.put_back(data[sent:])
            self.outbox.wake_writer()

    def close(self, bye: Bye | None) -> None:
        """Stop reading; once every pending ``sent`` is queued, say ``bye`` (if any), flush
        and close. A client that sends and then hangs up at once still gets its ``sent``."""
        if self.closing:
            return
        self.closing = True
        self.session.close()
        if self.pending_stores:
            self._closing_bye, self._close_deferred = bye, True
        else:
            self._finish(bye)

    def _finish(self, bye: Bye | None) -> None:
        if bye is not None:
            self.send(bye)
        self.outbox.close()

    def store_started(self) -> None:
        self.pending_stores += 1

    def store_finished(self) -> None:
        self.pending_stores -= 1
        if self.pending_stores == 0 and self._close_deferred:
            self._close_deferred = False
            self._finish(self._closing_bye)

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
