"""Everything this server keeps on disk, in one SQLite database: the schema, the SQL, and the
operations the store queue runs against it.

Owns: the tables (accounts, messages this server stored, receipts kept for peers), their
migration from earlier versions, and one transaction per batch of operations. Must never:
decide routing (the hub decides, the database records and answers) or run on the event loop
for long (store.py decides where it runs). Durability: WAL with synchronous=NORMAL, so a
committed transaction survives the server process being killed (SIGKILL); a power cut may
lose the last moments (set ``synchronous=FULL`` in :data:`PRAGMAS` to trade speed for that).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import sqlite3
from typing import Any, Final

import attrs
import orjson

from trichat import peerproto
from trichat.accounts import AccountRecord
from trichat.effects import Backlog, OwedReceipt, StoredMessage

log = logging.getLogger(__name__)

DB_FILE: Final = "trichat.sqlite3"
MAX_BACKLOG: Final = 10000  # stored messages offered at one login; the rest at the next
MAX_KEPT_FOR_PEERS: Final = 100_000  # receipts kept for unlinked servers; past it, refused
CHECKPOINT_ROWS: Final = 4000  # rows written before the WAL is copied back into the database

SCHEMA_VERSION: Final = 2

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
CREATE TABLE IF NOT EXISTS account_records (
    uid TEXT PRIMARY KEY,          -- never changes (protocol.md "Identities")
    name TEXT NOT NULL,            -- as registered; the name it goes by is accounts.py's rule
    pw_hash TEXT NOT NULL,
    created INTEGER NOT NULL,
    origin TEXT NOT NULL,          -- the server it was registered on
    oseq INTEGER NOT NULL,         -- that server's count of registrations
    last_seen INTEGER,             -- here
    UNIQUE (origin, oseq)
);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,       -- this server's order of storing
    msg TEXT NOT NULL UNIQUE,      -- the id clients see
    sender TEXT NOT NULL,
    sender_uid TEXT NOT NULL,      -- the account, or the guest session, that sent it
    recipient TEXT NOT NULL,
    recipient_uid TEXT NOT NULL,   -- the account, or the guest session, it is for
    text TEXT NOT NULL,
    ts INTEGER NOT NULL,
    req_id TEXT,                   -- the client's id, JSON-encoded
    resend_key INTEGER,            -- hash of sender, id, recipient and text: a resend has it too
    delivered_at INTEGER,
    read_at INTEGER,
    dropped_at INTEGER,            -- set when undelivered messages to a guest were dropped
    receipts_owed INTEGER NOT NULL DEFAULT 0  -- kept for an absent sender: 1 delivered, 2 read
);
CREATE TABLE IF NOT EXISTS kept_receipts (  -- for servers that were not linked
    server TEXT NOT NULL,
    msg TEXT NOT NULL,
    uid TEXT NOT NULL,
    status TEXT NOT NULL,
    by_name TEXT NOT NULL,
    ts INTEGER NOT NULL,
    PRIMARY KEY (server, msg, uid, status)
) WITHOUT ROWID;
"""

INDEXES: Final = """
CREATE INDEX IF NOT EXISTS messages_pending
    ON messages (recipient_uid, seq) WHERE delivered_at IS NULL;
-- Led by sender and id so one sender's inserts touch few index pages (a bare hash would
-- touch a random page per insert: 5x the disk writes).
CREATE UNIQUE INDEX IF NOT EXISTS messages_resend
    ON messages (sender_uid, req_id, resend_key) WHERE resend_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_owed
    ON messages (sender_uid, seq) WHERE receipts_owed != 0;
"""

# Schema 1 (one server's accounts by name; messages by name) to 2 (ids): every account
# becomes one registered on this server; a name that was no account was a guest's.
MIGRATE_1_TO_2: Final = """
DROP INDEX IF EXISTS messages_pending;
DROP INDEX IF EXISTS messages_resend;
ALTER TABLE messages RENAME TO messages_v1;
{schema}
INSERT INTO account_records (uid, name, pw_hash, created, origin, oseq, last_seen)
    SELECT lower(hex(randomblob(8))), name, pw_hash, created, :origin,
           row_number() OVER (ORDER BY created, key), last_seen
    FROM accounts;
INSERT INTO messages
    SELECT m.seq, m.msg, m.sender,
           coalesce((SELECT uid FROM account_records a WHERE lower(a.name) = m.sender_key),
                    'g.legacy.' || m.sender_key),
           m.recipient,
           coalesce((SELECT uid FROM account_records a WHERE lower(a.name) = m.recipient_key),
                    'g.legacy.' || m.recipient_key),
           m.text, m.ts, m.req_id, m.resend_key, m.delivered_at, m.read_at, m.dropped_at, 0
    FROM messages_v1 m;
DROP TABLE messages_v1;
DROP TABLE accounts;
"""

# --- operations: what the hub asks of storage, each answered in order --------------


@attrs.define
class InsertMessage:
    message: StoredMessage
    seq: int
    dedup_since: int  # ms; an identical resend after this is the same message


@attrs.define
class MarkReceipt:
    """Answers ``(sender, sender_uid)`` when the receipt is news (first delivered or
    read), else None."""

    msg: str
    uid: str  # who answered: must be whom the message is for
    status: str  # "delivered" or "read"
    ts: int


@attrs.define
class LoadBacklog:
    """Answers a :class:`Backlog` for ``uid``."""

    uid: str


@attrs.define
class SaveLastSeen:
    uid: str
    ts: int


@attrs.define
class CreateAccount:
    """Answers False if that account (or its origin's oseq) is stored already."""

    record: AccountRecord


@attrs.define
class AddAccounts:
    """Records learned from peers; those already here are skipped."""

    records: list[AccountRecord]


@attrs.define
class DiscardBacklog:
    """A guest session ended: what it did not acknowledge will never be offered."""

    uid: str
    ts: int


@attrs.define
class MarkReceiptsOwed:
    """Set (``owed``) or clear receipts kept for a sender: (msg, bits) pairs."""

    receipts: list[tuple[str, int]]
    owed: bool


@attrs.define
class KeepForPeer:
    server: str
    receipt: peerproto.PeerReceipt


@attrs.define
class TakeKeptForPeer:
    """Answers and deletes what was kept for ``server`` (list of PeerReceipt)."""

    server: str


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
    | AddAccounts
    | DiscardBacklog
    | MarkReceiptsOwed
    | KeepForPeer
    | TakeKeptForPeer
    | Barrier
)


@attrs.define
class Inserted:
    message: StoredMessage  # the existing one when ``duplicate``
    duplicate: bool


class StoreError(Exception):
    """Storage failed (disk full, corrupt file); the operations of the batch did not happen."""


class Database:
    """The SQLite file; every method is blocking and runs in the store's worker thread.

    Args:
        folder: where the file lives (made if missing).
        server: this server's name: the origin of accounts an older version stored.
    """

    def __init__(self, folder: str, server: str = "trichat") -> None:
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, DB_FILE)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        for pragma in PRAGMAS:
            self._db.execute(pragma)
        self._migrate(server)
        self._checkpointer = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None
        )
        self.incarnation = self._incarnation()
        self._rows_since_checkpoint = 0

    def _migrate(self, server: str) -> None:
        """Make the schema, or bring a database made by an earlier version up to it."""
        tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master")}
        if "accounts" in tables and "messages" in tables:
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(messages)")}
            for column in ("resend_key", "dropped_at"):  # added during schema 1
                if column not in columns:
                    self._db.execute(f"ALTER TABLE messages ADD COLUMN {column} INTEGER")
            script = MIGRATE_1_TO_2.format(schema=SCHEMA).replace(":origin", _quote(server))
            self._db.executescript(f"BEGIN; {script} COMMIT;")
            log.info("database migrated to schema %d", SCHEMA_VERSION)
        self._db.executescript(SCHEMA)
        self._db.executescript(INDEXES)
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _incarnation(self) -> str:
        # New at every opening, and part of every message id and guest session id: they
        # never repeat, not after a restart nor after the folder is wiped.
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

    # --- read at startup ------------------------------------------------------------

    def accounts(self) -> list[AccountRecord]:
        rows = self._db.execute(
            "SELECT uid, name, pw_hash, created, origin, oseq FROM account_records"
        )
        return [AccountRecord(*row) for row in rows]

    def last_seen(self) -> dict[str, int]:
        rows = self._db.execute(
            "SELECT uid, last_seen FROM account_records WHERE last_seen IS NOT NULL"
        )
        return {uid: seen for uid, seen in rows}

    def next_seq(self) -> int:
        (top,) = self._db.execute("SELECT coalesce(max(seq), 0) FROM messages").fetchone()
        return int(top) + 1

    # --- batches --------------------------------------------------------------------

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
            case LoadBacklog(uid=uid):
                return self._backlog(uid)
            case SaveLastSeen(uid=uid, ts=ts):
                self._db.execute(
                    "UPDATE account_records SET last_seen = ? WHERE uid = ?", (ts, uid)
                )
                return None
            case CreateAccount(record=record):
                return self._add_accounts([record]) == 1
            case AddAccounts(records=records):
                self._add_accounts(records)
                return None
            case DiscardBacklog(uid=uid, ts=ts):
                # Marked delivered-and-dropped (read_at stays NULL, dropped_at set) rather
                # than deleted, so the history stays whole.
                self._db.execute(
                    "UPDATE messages SET delivered_at = ?, dropped_at = ? "
                    "WHERE recipient_uid = ? AND delivered_at IS NULL",
                    (ts, ts, uid),
                )
                return None
            case MarkReceiptsOwed(receipts=receipts, owed=owed):
                sql = (
                    "UPDATE messages SET receipts_owed = receipts_owed | ? WHERE msg = ?"
                    if owed
                    else "UPDATE messages SET receipts_owed = receipts_owed & ~? WHERE msg = ?"
                )
                self._db.executemany(sql, [(bits, msg) for msg, bits in receipts])
                return None
            case KeepForPeer(server=server, receipt=r):
                return self._keep_for_peer(server, r)
            case TakeKeptForPeer(server=server):
                return self._take_kept(server)
            case Barrier():
                return None
        raise TypeError(f"unknown storage operation {op!r}")

    # --- accounts -------------------------------------------------------------------

    def _add_accounts(self, records: list[AccountRecord]) -> int:
        """Insert records not stored yet; how many were new."""
        cur = self._db.executemany(
            "INSERT OR IGNORE INTO account_records (uid, name, pw_hash, created, origin, oseq) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(r.uid, r.name, r.pw_hash, r.created, r.origin, r.oseq) for r in records],
        )
        return cur.rowcount

    # --- messages -------------------------------------------------------------------

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
                "ON CONFLICT (sender_uid, req_id, resend_key) WHERE resend_key IS NOT NULL "
                "DO NOTHING RETURNING seq",
                [v for row in chunk for v in row],
            )
            inserted.update(seq for (seq,) in cur)
        return inserted

    def _resend_or_insert(self, op: InsertMessage, row: tuple[Any, ...]) -> Inserted:
        # The same sender, id, recipient and text are stored already: a resend, unless the
        # earlier one is older than the resend window, which frees its key for this one.
        found = self._db.execute(
            "SELECT msg, sender, recipient, text, ts, sender_uid, recipient_uid FROM messages "
            "WHERE sender_uid = ? AND req_id = ? AND resend_key = ?",
            (row[3], row[8], row[9]),
        ).fetchone()
        msg, sender, to, text, ts, sender_uid, to_uid = found
        if ts >= op.dedup_since:
            original = StoredMessage(
                msg, sender, to, text, ts, op.message.req_id, sender_uid, to_uid
            )
            return Inserted(original, duplicate=True)
        self._db.execute(
            "UPDATE messages SET resend_key = NULL "
            "WHERE sender_uid = ? AND req_id = ? AND resend_key = ?",
            (row[3], row[8], row[9]),
        )
        self._insert_rows([row])
        return Inserted(op.message, duplicate=False)

    def _receipt_run(self, ops: list[MarkReceipt]) -> list[tuple[str, str] | None]:
        """For each receipt, (sender, sender_uid) if it is news (first delivered or read)."""
        news: dict[tuple[str, str], tuple[str, str]] = {}
        for start in range(0, len(ops), _ROWS_PER_STATEMENT):
            chunk = ops[start : start + _ROWS_PER_STATEMENT]
            values = ",".join(["(?, ?, ?)"] * len(chunk))
            sql = _READ_SQL if chunk[0].status == "read" else _DELIVERED_SQL
            params = [v for op in chunk for v in (op.msg, op.uid, op.ts)]
            for msg, uid, sender, sender_uid in self._db.execute(sql.format(values=values), params):
                news[msg, uid] = (sender, sender_uid)
        # A message acknowledged twice in one run is news once.
        return [news.pop((op.msg, op.uid), None) for op in ops]

    def _backlog(self, uid: str) -> Backlog:
        rows = self._db.execute(
            "SELECT msg, sender, recipient, text, ts, sender_uid, recipient_uid FROM messages "
            "WHERE recipient_uid = ? AND delivered_at IS NULL ORDER BY seq LIMIT ?",
            (uid, MAX_BACKLOG),
        )
        backlog = Backlog(
            [StoredMessage(m, s, r, t, ts, None, su, ru) for m, s, r, t, ts, su, ru in rows]
        )
        owed = self._db.execute(
            "SELECT msg, recipient, delivered_at, read_at, receipts_owed FROM messages "
            "WHERE sender_uid = ? AND receipts_owed != 0 ORDER BY seq LIMIT ?",
            (uid, MAX_BACKLOG),
        )
        for msg, by, delivered_at, read_at, bits in owed:
            if bits & 1 and delivered_at is not None:
                backlog.receipts.append(OwedReceipt(msg, "delivered", by, delivered_at, 1))
            if bits & 2 and read_at is not None:
                backlog.receipts.append(OwedReceipt(msg, "read", by, read_at, 2))
        return backlog

    # --- receipts kept for other servers ---------------------------------------------

    def _keep_for_peer(self, server: str, r: peerproto.PeerReceipt) -> bool:
        (count,) = self._db.execute("SELECT count(*) FROM kept_receipts").fetchone()
        if count >= MAX_KEPT_FOR_PEERS:
            log.warning(
                "%d receipts are kept for unlinked servers (MAX_KEPT_FOR_PEERS): "
                "a receipt for %s is not kept; its message will be offered again",
                count,
                server,
            )
            return False
        self._db.execute(
            "INSERT OR IGNORE INTO kept_receipts (server, msg, uid, status, by_name, ts) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (server, r.msg, r.uid, r.status, r.by, r.ts),
        )
        return True

    def _take_kept(self, server: str) -> list[peerproto.PeerReceipt]:
        rows = self._db.execute(
            "DELETE FROM kept_receipts WHERE server = ? RETURNING msg, status, by_name, ts, uid",
            (server,),
        ).fetchall()
        return [peerproto.PeerReceipt(*row) for row in rows]


_MESSAGE_COLUMNS: Final = (
    "seq, msg, sender, sender_uid, recipient, recipient_uid, text, ts, req_id, resend_key"
)
_ROW_PLACEHOLDERS: Final = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_ROWS_PER_STATEMENT: Final = 500  # 10 parameters a row, under SQLite's 32766

_DELIVERED_SQL: Final = (
    "UPDATE messages SET delivered_at = v.column3 FROM (VALUES {values}) AS v "
    "WHERE messages.msg = v.column1 AND messages.recipient_uid = v.column2 "
    "AND messages.delivered_at IS NULL AND messages.dropped_at IS NULL "
    "RETURNING messages.msg, messages.recipient_uid, messages.sender, messages.sender_uid"
)
_READ_SQL: Final = (
    "UPDATE messages SET read_at = v.column3, "
    "delivered_at = coalesce(messages.delivered_at, v.column3) FROM (VALUES {values}) AS v "
    "WHERE messages.msg = v.column1 AND messages.recipient_uid = v.column2 "
    "AND messages.read_at IS NULL AND messages.dropped_at IS NULL "
    "RETURNING messages.msg, messages.recipient_uid, messages.sender, messages.sender_uid"
)


def _same_receipt_kind(first: MarkReceipt, op: Operation) -> bool:
    return isinstance(op, MarkReceipt) and op.status == first.status


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def resend_key(sender_uid: str, req_id: str, to_uid: str, text: str) -> int:
    """A signed 64-bit hash that a resend of the same message shares (SQLite INTEGER).
    Identities, not names: a guest session's name may be someone else's tomorrow."""
    digest = hashlib.blake2b(
        "\0".join((sender_uid, req_id, to_uid, text)).encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big", signed=True)


def _message_row(op: InsertMessage) -> tuple[Any, ...]:
    m = op.message
    req = None if m.req_id is None else orjson.dumps(m.req_id).decode()
    key = None if req is None else resend_key(m.sender_uid, req, m.to_uid, m.text)
    return (op.seq, m.msg, m.sender, m.sender_uid, m.to, m.to_uid, m.text, m.ts, req, key)
