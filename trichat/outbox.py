"""A connection's outgoing bytes: bounded, batched, written without a task switch if possible.

Owns: the slow-consumer rule of protocol.md "Slow readers". Others append without waiting;
when more than ``max_bytes`` are waiting the reader is too slow and :class:`SlowConsumer` is
raised, so the shell drops that connection instead of slowing everyone else down.

How bytes leave, like Redis's write handling (``handleClientsWithPendingWrites`` before the
event loop sleeps): what is queued during one pass of the event loop is written once at its
end, straight from a non-blocking socket when the kernel takes it all; only what the kernel
can't take now wakes the connection's writer task, which waits until the socket is writable.
"""

from __future__ import annotations

import trio


class SlowConsumer(Exception):
    """The peer is not reading fast enough; its connection should be dropped."""


class Outbox:
    """Bytes waiting to be written to one connection.

    Args:
        max_bytes: how much may wait before the reader counts as too slow.
    """

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._chunks: list[bytes] = []
        self._size = 0
        self._ready = trio.Event()
        self.closed = False
        self.writer_busy = False

    @property
    def queued_bytes(self) -> int:
        return self._size

    def put(self, data: bytes) -> None:
        """Queue ``data`` (ignored once closed); someone must then flush or wake the writer.

        Raises:
            SlowConsumer: more than ``max_bytes`` would be waiting.
        """
        if self.closed:
            return
        if self._size + len(data) > self._max:
            raise SlowConsumer(f"{self._size} bytes already waiting")
        self._chunks.append(data)
        self._size += len(data)

    def take_nowait(self) -> bytes:
        """All queued bytes, as one string (``b""`` if none)."""
        chunks = self._chunks
        if not chunks:
            return b""
        data = b"".join(chunks) if len(chunks) > 1 else chunks[0]
        self._chunks = []
        self._size = 0
        return data

    def put_back(self, data: bytes) -> None:
        """Return bytes the kernel did not take, ahead of anything queued since."""
        self._chunks.insert(0, data)
        self._size += len(data)

    def wake_writer(self) -> None:
        self._ready.set()

    def close(self) -> None:
        """No more data: the writer sends what is queued, then stops."""
        self.closed = True
        self._ready.set()

    async def take(self) -> bytes:
        """(The writer task.) Wait to be woken with data; ``b""`` means closed and drained."""
        while not self._chunks:
            if self.closed:
                return b""
            await self._ready.wait()
            self._ready = trio.Event()
        return self.take_nowait()
