"""The store queue: the Trio side of the database (protocol.md "Delivery guarantee").

Owns: queueing the hub's storage operations, group commit (many operations, one
transaction: :class:`~trichat.database.Database`), where each batch runs (inline on the event
loop when small, else the one worker thread SQLite runs in), checkpoints, and calling each
operation's callback in order. Must never: decide routing or know SQL (database.py does).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import trio

from trichat.database import (
    DB_FILE,
    MAX_BACKLOG,
    AddAccounts,
    Barrier,
    CreateAccount,
    Database,
    DiscardBacklog,
    Inserted,
    InsertMessage,
    KeepForPeer,
    LoadBacklog,
    MarkReceipt,
    MarkReceiptsOwed,
    Operation,
    SaveLastSeen,
    StoreError,
    TakeKeptForPeer,
    resend_key,
)

__all__ = [  # the database's vocabulary, for the service and tests that import it from here
    "DB_FILE",
    "MAX_BACKLOG",
    "AddAccounts",
    "Barrier",
    "CreateAccount",
    "Database",
    "DiscardBacklog",
    "InsertMessage",
    "Inserted",
    "KeepForPeer",
    "LoadBacklog",
    "MarkReceipt",
    "MarkReceiptsOwed",
    "Operation",
    "SaveLastSeen",
    "Store",
    "StoreError",
    "TakeKeptForPeer",
    "resend_key",
]

log = logging.getLogger(__name__)

INLINE_BATCH_MAX: Final = 16  # batches this small are written without a thread hand-off


Callback = Callable[[Any], None]


class Store:
    """The trio side: queues operations and writes them in batches, one transaction each.

    Callbacks run in the trio thread, in the order the operations were queued, with the
    operation's result or a :class:`StoreError`.

    Args:
        db: the open database.
        batch_max: most operations per transaction.
        queue_max: operations waiting before :meth:`submit` waits (backpressure).
    """

    def __init__(self, db: Database, *, batch_max: int, queue_max: int) -> None:
        self.db = db
        self._batch_max = batch_max
        self._queue_max = queue_max
        self._queue: deque[tuple[Operation, Callback]] = deque()
        self._work = trio.Event()
        self._space = trio.lowlevel.ParkingLot()
        self._limiter = trio.CapacityLimiter(1)
        self._closing = False
        self._checkpoint_due = trio.Event()
        self.batches = 0
        self.operations = 0

    async def submit(self, op: Operation, callback: Callback) -> None:
        """Queue ``op``; waits only while the queue is full (backpressure on the sender)."""
        while len(self._queue) >= self._queue_max:
            await self._space.park()
        self.submit_nowait(op, callback)

    def submit_nowait(self, op: Operation, callback: Callback) -> None:
        """Queue ``op`` even past the limit: for follow-ups of work already admitted."""
        self._queue.append((op, callback))
        self._work.set()

    async def call(self, op: Operation) -> Any:
        """Queue ``op`` and wait for its result (for logins, not the message hot path).

        Raises:
            StoreError: storage failed.
        """
        done = trio.Event()
        box: list[Any] = []

        def finish(result: Any) -> None:
            box.append(result)
            done.set()

        await self.submit(op, finish)
        await done.wait()
        if isinstance(box[0], StoreError):
            raise box[0]
        return box[0]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer task: runs until :meth:`close` and the queue is empty."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._checkpoints)
            task_status.started()
            await self._write_all()
            nursery.cancel_scope.cancel()

    async def _checkpoints(self) -> None:
        limiter = trio.CapacityLimiter(1)  # not the writer's: the two run side by side
        while True:
            await self._checkpoint_due.wait()
            self._checkpoint_due = trio.Event()
            await trio.to_thread.run_sync(self.db.checkpoint, limiter=limiter)

    async def _write_all(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._work = trio.Event()
                await self._work.wait()
                continue
            count = min(len(self._queue), self._batch_max)
            batch = [self._queue.popleft() for _ in range(count)]
            self._space.unpark_all()
            await self._write(batch)

    async def _write(self, batch: list[tuple[Operation, Callback]]) -> None:
        ops = [op for op, _ in batch]
        try:
            if len(ops) <= INLINE_BATCH_MAX and self.db.inline_ok():
                # A few rows commit in tens of microseconds: less than the hand-off to a
                # worker thread and back costs (benchmarks/README.md, "rate" runs).
                results: list[Any] = self.db.run_batch(ops)
                await trio.lowlevel.checkpoint()
            else:
                results = await trio.to_thread.run_sync(
                    self.db.run_batch, ops, limiter=self._limiter
                )
            if self.db.wants_checkpoint():
                self._checkpoint_due.set()
        except StoreError as exc:
            log.error("storage failed for %d operations: %s", len(ops), exc)
            results = [exc] * len(ops)
        self.batches += 1
        self.operations += len(ops)
        for (_, callback), result in zip(batch, results, strict=True):
            callback(result)

    def close(self) -> None:
        """Stop taking work: :meth:`run` returns once what is queued is written."""
        self._closing = True
        self._work.set()
