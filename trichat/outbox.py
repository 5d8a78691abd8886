"""A connection's outgoing bytes: bounded, batched, drained by one writer task.

Owns: the slow-consumer rule of protocol.md "Slow readers". Others append without waiting;
when more than ``max_bytes`` are waiting the reader is too slow and :class:`SlowConsumer`
is raised, so the shell drops that connection instead of slowing everyone else down. The
writer takes everything queued at once and sends it in one write.
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

    @property
    def queued_bytes(self) -> int:
        return self._size

    def put(self, data: bytes) -> None:
        """Queue ``data``; ignored once closed.

        Raises:
            SlowConsumer: more than ``max_bytes`` would be waiting.
        """
        if self.closed:
            return
        if self._size + len(data) > self._max:
            raise SlowConsumer(f"{self._size} bytes already waiting")
        self._chunks.append(data)
        self._size += len(data)
        self._ready.set()

    def close(self) -> None:
        """No more data: the writer sends what is queued, then stops."""
        self.closed = True
        self._ready.set()

    async def take(self) -> bytes:
        """Wait for data and take all of it; ``b""`` means closed and fully drained."""
        while not self._chunks:
            if self.closed:
                return b""
            await self._ready.wait()
            self._ready = trio.Event()
        data = b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        self._chunks = []
        self._size = 0
        return data
