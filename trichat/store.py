"""Everything this server keeps on disk, in one SQLite database.

Owns: the schema, the SQL, group commit (many operations, one transaction) and the one
worker thread SQLite runs in (protocol.md "Delivery guarantee"). Must never: decide routing;
the hub decides, the store records and answers. Durability: WAL with synchronous=NORMAL, so a
committed transaction survives the server process being killed (SIGKILL); a power cut may
lose the last moments (set ``synchronous=FULL`` in :data:`PRAGMAS` to trade speed for that).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import sqlite3
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import attrs
import orjson
import trio

from trichat.hub import StoredMessage
from trichat.names import name_key

log = logging.getLogger(__name__)

DB_FILE: Final = "trichat.sqlite3"
MAX_BACKLOG: Final = 10000  # stored messages offered at one login; the rest at the next
INLINE_BATCH_MAX: Final = 16  # batches this small are written without a thread hand-off
CHECKPOINT_ROWS: Final = 4000  # rows written before the WAL is copied back into the database

SCHEMA_VERSION: Final = 1

PRAGMAS: Final = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA busy_timeout=5000",
    "PRAGMA foreign_keys=ON",
    "PRAGMA temp_store=MEMORY",  # multi-row upserts need a statement journal: not a file
    "PRAGMA cache_size=-16384",  # 16 MiB of pages: the hot index pages stay in memory
    # Checkpoints (the only fsyncs with synchronous=NORMAL) run in the worker thread, never
    # inside a commit that may run on the event loop: see Store._write.
    "PRAGMA wal_autocheckpoint=0",
)

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS accounts (
    key TEXT PRIMARY KEY,          -- the name in lower case: names are unique ignoring case
    name TEXT NOT NULL,
    pw_hash TEXT NOT NULL,
    created INTEGER NOT NULL,
    last_seen INTEGER
);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,       -- this server's order of storing
    msg TEXT NOT NULL UNIQUE,      -- the id clients see
    sender TEXT NOT NULL,
    sender_key TEXT NOT NULL,
    recipient TEXT NOT NULL,
    recipient_key TEXT NOT NULL,
    text TEXT NOT NULL,
    ts INTEGER NOT NULL,
    req_id TEXT,                   -- the client's id, JSON-encoded
    resend_key INTEGER,            -- hash of sender, id, recipient and text: a resend has it too
    delivered_at INTEGER,
    read_at INTEGER,
    dropped_at INTEGER             -- set when undelivered messages to a guest were dropped
);
"""

INDEXES: Final = """
CREATE INDEX IF NOT EXISTS messages_pending
    ON messages (recipient_key, seq) WHERE delivered_at IS NULL;
-- Led by sender and id so one sender's inserts touch few index pages (a bare hash would
-- touch a random page per insert: 5x the disk writes).
CREATE UNIQUE INDEX IF NOT EXISTS messages_resend
    ON messages (sender_key, req_id, resend_key) WHERE resend_key IS NOT NULL;
"""

# --- operations: what the hub asks of storage, each answered in order --------------


@attrs.define
class InsertMessage:
    message: StoredMessage
    seq: int
    dedup_since: int  # ms; an identical resend after this is the same message


@attrs.define
class MarkReceipt:
    msg: str
    by: str
    status: str  # "delivered" or "read"
    ts: int


@attrs.define
class LoadBacklog:
    user: str


@attrs.define
class SaveLastSeen:
    user: str
    ts: int


@attrs.define
class CreateAccount:
    name: str
    pw_hash: str
    ts: int


@attrs.define
class GetPasswordHash:
    name: str


@attrs.define
class DiscardBacklog:
    """A guest left: what it did not acknowledge will never be offered to anyone."""

    user: str
    ts: int


@attrs.define
class Barrier:
    """No storage work: its callback runs after those of everything queued before it (how a
    broadcast keeps its place behind the sender's private messages)."""


Operation = (
    InsertMessage
    | MarkReceipt
    | LoadBacklog
    | SaveLastSeen
    | CreateAccount
    | GetPasswordHash
    | DiscardBacklog
    | Barrier
)


@attrs.define
class Inserted:
    message: StoredMessage  # the existing one when ``duplicate``
    duplicate: bool


class StoreError(Exception):
    """Storage failed (disk full, corrupt file); the operations of the batch did not happen."""


class Database:
    """The SQLite file; every method is blocking and runs in the store's worker thread."""

    def __init__(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, DB_FILE)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        for pragma in PRAGMAS:
            self._db.execute(pragma)
        self._db.executescript(SCHEMA)
        self._migrate()
        self._checkpointer = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None
        )
        self.incarnation = self._incarnation()
        self._rows_since_checkpoint = 0

    def _migrate(self) -> None:
        """Bring a database made by an earlier version up to this schema."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(messages)")}
        for column in ("resend_key", "dropped_at"):
            if column not in columns:
                self._db.execute(f"ALTER TABLE messages ADD COLUMN {column} INTEGER")
        resend = [row[2] for row in self._db.execute("PRAGMA index_info(messages_resend)")]
        if resend and resend != ["sender_key", "req_id", "resend_key"]:
            self._db.execute("DROP INDEX messages_resend")
        self._db.executescript(INDEXES)
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _incarnation(self) -> str:
        # New at every opening, and part of every message id: ids never repeat, not after a
        # restart (broadcasts are numbered but not stored) nor after the folder is wiped.
        return secrets.token_hex(3)

    def close(self) -> None:
        self.checkpoint()
        self._checkpointer.close()
        self._db.close()

    def inline_ok(self) -> bool:
        """Whether a small batch may run on the calling (event loop) thread: not while the
        write-ahead log has grown past its checkpoint size (a checkpoint is overdue)."""
        return self._rows_since_checkpoint < 4 * CHECKPOINT_ROWS

    def wants_checkpoint(self) -> bool:
        return self._rows_since_checkpoint >= CHECKPOINT_ROWS

    def checkpoint(self) -> None:
        """Copy the write-ahead log into the database file (fsyncs).

        Runs on its own connection and never blocks the writer (PASSIVE): commits go on
        while it works, so a slow disk sync never delays a ``sent``.
        """
        self._rows_since_checkpoint = 0
        try:
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:
            log.warning("checkpoint failed: %s", exc)

    def accounts(self) -> list[tuple[str, int | None]]:
        return list(self._db.execute("SELECT name, last_seen FROM accounts"))

    def next_seq(self) -> int:
        (top,) = self._db.execute("SELECT coalesce(max(seq), 0) FROM messages").fetchone()
        return int(top) + 1

    def run_batch(self, ops: list[Operation]) -> list[Any]:
        """Apply ``ops`` in one transaction; results in the same order.

        Runs of inserts and of receipts become one statement each: per-row statements cost
        more Python than SQLite (benchmarks/README.md).

        Raises:
            StoreError: nothing of the batch was applied.
        """
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                results = self._apply_all(ops)
                self._db.execute("COMMIT")
                self._rows_since_checkpoint += len(ops)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc
        return results

    def _apply_all(self, ops: list[Operation]) -> list[Any]:
        results: list[Any] = []
        i = 0
        while i < len(ops):
            op = ops[i]
            j = i + 1
            if isinstance(op, InsertMessage):
                while j < len(ops) and isinstance(ops[j], InsertMessage):
                    j += 1
                results += self._insert_run(ops[i:j])  # type: ignore[arg-type]
            elif isinstance(op, MarkReceipt):
                while j < len(ops) and _same_receipt_kind(op, ops[j]):
                    j += 1
                results += self._receipt_run(ops[i:j])  # type: ignore[arg-type]
            else:
                results.append(self._apply(op))
            i = j
        return results

    def _apply(self, op: Operation) -> Any:
        match op:
            case LoadBacklog(user=user):
                return self._backlog(user)
            case SaveLastSeen(user=user, ts=ts):
                self._db.execute(
                    "UPDATE accounts SET last_seen = ? WHERE key = ?", (ts, name_key(user))
                )
                return None
            case CreateAccount(name=name, pw_hash=pw_hash, ts=ts):
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO accounts (key, name, pw_hash, created) "
                    "VALUES (?, ?, ?, ?)",
                    (name_key(name), name, pw_hash, ts),
                )
                if cur.rowcount != 1:
                    return False
                # Whatever a guest of this name left unread was for that guest, not for the
                # new account (protocol.md "Guests and accounts").
                self._discard_backlog(name, ts)
                return True
            case DiscardBacklog(user=user, ts=ts):
                self._discard_backlog(user, ts)
                return None
            case Barrier():
                return None
            case GetPasswordHash(name=name):
                row = self._db.execute(
                    "SELECT pw_hash FROM accounts WHERE key = ?", (name_key(name),)
                ).fetchone()
                return row[0] if row else None
        raise TypeError(f"unknown storage operation {op!r}")

    def _insert_run(self, ops: list[InsertMessage]) -> list[Inserted]:
        rows = [_message_row(op) for op in ops]
        inserted = self._insert_rows(rows)
        results: list[Inserted] = []
        for op, row in zip(ops, rows, strict=True):
            if op.seq in inserted:
                results.append(Inserted(op.message, duplicate=False))
            else:
                results.append(self._resend_or_insert(op, row))
        return results

    def _insert_rows(self, rows: list[tuple[Any, ...]]) -> set[int]:
        """Insert what is not a resend; the seqs inserted."""
        inserted: set[int] = set()
        for start in range(0, len(rows), _ROWS_PER_STATEMENT):
            chunk = rows[start : start + _ROWS_PER_STATEMENT]
            values = ",".join([_ROW_PLACEHOLDERS] * len(chunk))
            cur = self._db.execute(
                f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES {values} "
                "ON CONFLICT (sender_key, req_id, resend_key) WHERE resend_key IS NOT NULL "
                "DO NOTHING RETURNING seq",
                [v for row in chunk for v in row],
            )
            inserted.update(seq for (seq,) in cur)
        return inserted

    def _resend_or_insert(self, op: InsertMessage, row: tuple[Any, ...]) -> Inserted:
        # The same sender, id, recipient and text are stored already: a resend, unless the
        # earlier one is older than the resend window, which frees its key for this one.
        found = self._db.execute(
            "SELECT msg, sender, recipient, text, ts FROM messages "
            "WHERE sender_key = ? AND req_id = ? AND resend_key = ?",
            (row[3], row[8], row[9]),
        ).fetchone()
        msg, sender, to, text, ts = found
        if ts >= op.dedup_since:
            original = StoredMessage(msg, sender, to, text, ts, op.message.req_id)
            return Inserted(original, duplicate=True)
        self._db.execute(
            "UPDATE messages SET resend_key = NULL "
            "WHERE sender_key = ? AND req_id = ? AND resend_key = ?",
            (row[3], row[8], row[9]),
        )
        self._insert_rows([row])
        return Inserted(op.message, duplicate=False)

    def _receipt_run(self, ops: list[MarkReceipt]) -> list[str | None]:
        """For each receipt, the message's sender if it is news (first delivered or read)."""
        news: dict[tuple[str, str], str] = {}
        for start in range(0, len(ops), _ROWS_PER_STATEMENT):
            chunk = ops[start : start + _ROWS_PER_STATEMENT]
            values = ",".join(["(?, ?, ?)"] * len(chunk))
            sql = _READ_SQL if chunk[0].status == "read" else _DELIVERED_SQL
            params = [v for op in chunk for v in (op.msg, name_key(op.by), op.ts)]
            for msg, rkey, sender in self._db.execute(sql.format(values=values), params):
                news[msg, rkey] = sender
        # A message acknowledged twice in one run is news once.
        return [news.pop((op.msg, name_key(op.by)), None) for op in ops]

    def _discard_backlog(self, user: str, ts: int) -> None:
        # Marked delivered-and-dropped (read_at stays NULL, dropped_at set) rather than
        # deleted, so the history stays whole.
        self._db.execute(
            "UPDATE messages SET delivered_at = ?, dropped_at = ? "
            "WHERE recipient_key = ? AND delivered_at IS NULL",
            (ts, ts, name_key(user)),
        )

    def _backlog(self, user: str) -> list[StoredMessage]:
        rows = self._db.execute(
            "SELECT msg, sender, recipient, text, ts FROM messages "
            "WHERE recipient_key = ? AND delivered_at IS NULL ORDER BY seq LIMIT ?",
            (name_key(user), MAX_BACKLOG),
        )
        return [StoredMessage(*row) for row in rows]


_MESSAGE_COLUMNS: Final = (
    "seq, msg, sender, sender_key, recipient, recipient_key, text, ts, req_id, resend_key"
)
_ROW_PLACEHOLDERS: Final = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_ROWS_PER_STATEMENT: Final = 500  # 10 parameters a row, under SQLite's 32766

_DELIVERED_SQL: Final = (
    "UPDATE messages SET delivered_at = v.column3 FROM (VALUES {values}) AS v "
    "WHERE messages.msg = v.column1 AND messages.recipient_key = v.column2 "
    "AND messages.delivered_at IS NULL AND messages.dropped_at IS NULL "
    "RETURNING messages.msg, messages.recipient_key, messages.sender"
)
_READ_SQL: Final = (
    "UPDATE messages SET read_at = v.column3, "
    "delivered_at = coalesce(messages.delivered_at, v.column3) FROM (VALUES {values}) AS v "
    "WHERE messages.msg = v.column1 AND messages.recipient_key = v.column2 "
    "AND messages.read_at IS NULL AND messages.dropped_at IS NULL "
    "RETURNING messages.msg, messages.recipient_key, messages.sender"
)


def _same_receipt_kind(first: MarkReceipt, op: Operation) -> bool:
    return isinstance(op, MarkReceipt) and op.status == first.status


def resend_key(sender: str, req_id: str, to: str, text: str) -> int:
    """A signed 64-bit hash that a resend of the same message shares (SQLite INTEGER)."""
    digest = hashlib.blake2b(
        "\0".join((name_key(sender), req_id, name_key(to), text)).encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big", signed=True)


def _message_row(op: InsertMessage) -> tuple[Any, ...]:
    m = op.message
    req = None if m.req_id is None else orjson.dumps(m.req_id).decode()
    key = None if req is None else resend_key(m.sender, req, m.to, m.text)
    return (
        op.seq,
        m.msg,
        m.sender,
        name_key(m.sender),
        m.to,
        name_key(m.to),
        m.text,
        m.ts,
        req,
        key,
    )


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
