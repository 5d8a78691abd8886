"""Database: the SQLite file behind accounts, messages, receipts and backlogs (sync)."""

from __future__ import annotations

import itertools
import sqlite3
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from trichat import messages
from trichat.hub import AfterStored, DropBacklog, Hub, Reply, StoredMessage, StoreMessage
from trichat.store import (
    CHECKPOINT_ROWS,
    DB_FILE,
    INLINE_BATCH_MAX,
    SCHEMA_VERSION,
    Barrier,
    CreateAccount,
    Database,
    DiscardBacklog,
    GetPasswordHash,
    Inserted,
    InsertMessage,
    LoadBacklog,
    MarkReceipt,
    SaveLastSeen,
    Store,
    StoreError,
)

T0 = 1_700_000_000_000


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(str(tmp_path / "data"))
    yield database
    database.close()


def one(db: Database, op: Any) -> Any:
    [result] = db.run_batch([op])
    return result


def message(
    seq: int, sender: str = "ann", to: str = "bob", text: str = "hi", **kw: Any
) -> StoredMessage:
    return StoredMessage(
        f"s1:x:{seq}", sender, to, text, kw.pop("ts", T0 + seq), kw.pop("req_id", None)
    )


def insert(db: Database, seq: int, *, since: int = 0, **kw: Any) -> Inserted:
    return one(db, InsertMessage(message(seq, **kw), seq, since))  # type: ignore[no-any-return]


def view(m: StoredMessage) -> tuple[str, str, str, str, int]:
    return (m.msg, m.sender, m.to, m.text, m.ts)


def backlog(db: Database, user: str) -> list[tuple[str, str, str, str, int]]:
    return [view(m) for m in one(db, LoadBacklog(user))]


# --- the file -------------------------------------------------------------------------


def test_a_fresh_folder_gets_an_empty_database(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "nested"
    database = Database(str(folder))
    try:
        assert (folder / DB_FILE).exists()
        assert database.accounts() == []
        assert database.next_seq() == 1
        assert backlog(database, "bob") == []
        tables = {
            row[0]
            for row in sqlite3.connect(folder / DB_FILE).execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
            )
        }
        assert {"accounts", "messages", "meta"} <= tables
    finally:
        database.close()


def test_data_survives_reopening_with_a_new_incarnation(tmp_path: Path) -> None:
    folder = str(tmp_path / "data")
    first = Database(folder)
    incarnation = first.incarnation
    one(first, CreateAccount("Alice", "hash-a", T0))
    insert(first, 1, to="Alice", text="kept")
    insert(first, 2, to="Alice", text="acked")
    one(first, MarkReceipt("s1:x:2", "alice", "delivered", T0))
    one(first, SaveLastSeen("alice", T0 + 5))
    first.close()

    again = Database(folder)
    try:
        # New at every opening (not stored): ids of this run can't repeat an earlier run's.
        assert again.incarnation != incarnation
        assert again.accounts() == [("Alice", T0 + 5)]
        assert one(again, GetPasswordHash("ALICE")) == "hash-a"
        assert backlog(again, "alice") == [view(message(1, to="Alice", text="kept"))]
        assert again.next_seq() == 3
    finally:
        again.close()


def test_every_opening_has_its_own_incarnation(tmp_path: Path) -> None:
    folder = str(tmp_path / "data")
    seen = []
    for _ in range(5):
        database = Database(folder)
        seen.append(database.incarnation)
        database.close()
    assert len(set(seen)) == len(seen)
    assert all(inc and ":" not in inc for inc in seen)  # one part of SERVER:INC:N


def test_a_fresh_database_is_at_the_current_schema_version(db: Database) -> None:
    check = sqlite3.connect(db.path)
    try:
        assert check.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,) == (1,)
        columns = {row[1] for row in check.execute("PRAGMA table_info(messages)")}
        assert {"resend_key", "dropped_at", "delivered_at", "read_at"} <= columns
    finally:
        check.close()


def test_each_new_database_has_its_own_incarnation(tmp_path: Path) -> None:
    a, b = Database(str(tmp_path / "a")), Database(str(tmp_path / "b"))
    try:
        assert a.incarnation != b.incarnation
        assert a.incarnation and b.incarnation
    finally:
        a.close()
        b.close()


# --- accounts -------------------------------------------------------------------------


def test_account_names_are_unique_ignoring_case(db: Database) -> None:
    assert one(db, CreateAccount("Alice", "hash-1", T0)) is True
    assert one(db, CreateAccount("ALICE", "hash-2", T0)) is False
    assert one(db, GetPasswordHash("alice")) == "hash-1"  # the first one stays
    assert db.accounts() == [("Alice", None)]


def test_unknown_accounts_have_no_hash(db: Database) -> None:
    assert one(db, GetPasswordHash("nobody")) is None


def test_last_seen_is_saved_per_account(db: Database) -> None:
    db.run_batch([CreateAccount("Alice", "h", T0), CreateAccount("bob", "h", T0)])
    one(db, SaveLastSeen("ALICE", T0 + 7))
    assert sorted(db.accounts()) == [("Alice", T0 + 7), ("bob", None)]


# --- messages and resends -----------------------------------------------------------


def test_a_new_message_is_stored_as_given(db: Database) -> None:
    result = insert(db, 1, req_id="r1")
    assert result == Inserted(message(1, req_id="r1"), duplicate=False)
    assert db.next_seq() == 2


def test_a_resend_within_the_window_is_the_original_message(db: Database) -> None:
    insert(db, 1, req_id="r1", text="hello", ts=T0)
    resend = StoredMessage("s1:x:2", "ANN", "Bob", "hello", T0 + 500, "r1")
    result = one(db, InsertMessage(resend, 2, T0 - 1000))
    assert result.duplicate is True
    assert (result.message.msg, result.message.ts) == ("s1:x:1", T0)  # the same sent reply
    assert db.next_seq() == 2  # nothing new was written
    assert len(backlog(db, "bob")) == 1


@pytest.mark.parametrize(
    "changes",
    [
        {"text": "hello?"},  # same id, different text: a new message
        {"to": "cat"},
        {"sender": "dan"},
        {"req_id": "r2"},
        {"req_id": 1},  # an integer id is not the string "1"
        {"req_id": None},  # without an id nothing is deduplicated
    ],
)
def test_a_different_request_is_a_new_message(db: Database, changes: dict[str, Any]) -> None:
    insert(db, 1, req_id="1", text="hello")
    fields: dict[str, Any] = {"req_id": "1", "text": "hello", **changes}
    result = insert(db, 2, **fields)
    assert result.duplicate is False
    assert result.message.msg == "s1:x:2"
    assert db.next_seq() == 3


def test_a_resend_after_the_window_is_a_new_message(db: Database) -> None:
    insert(db, 1, req_id="r1", ts=T0)
    assert insert(db, 2, req_id="r1", ts=T0 + 10_000, since=T0).duplicate is True  # just in
    assert insert(db, 3, req_id="r1", ts=T0 + 10_001, since=T0 + 1).duplicate is False
    # From then on the new message is the one a resend matches.
    result = insert(db, 4, req_id="r1", ts=T0 + 10_002, since=T0 + 1)
    assert (result.duplicate, result.message.msg) == (True, "s1:x:3")


def test_messages_without_an_id_are_never_merged(db: Database) -> None:
    assert insert(db, 1).duplicate is False
    assert insert(db, 2).duplicate is False
    assert len(backlog(db, "bob")) == 2


# --- receipts and backlog -----------------------------------------------------------


def test_a_receipt_names_the_sender_only_the_first_time(db: Database) -> None:
    insert(db, 1, sender="Ann", to="bob")
    assert one(db, MarkReceipt("s1:x:1", "BOB", "delivered", T0)) == "Ann"
    assert one(db, MarkReceipt("s1:x:1", "bob", "delivered", T0 + 1)) is None
    assert one(db, MarkReceipt("s1:x:1", "bob", "read", T0 + 2)) == "Ann"
    assert one(db, MarkReceipt("s1:x:1", "bob", "read", T0 + 3)) is None


def test_only_the_recipient_can_acknowledge(db: Database) -> None:
    insert(db, 1, sender="ann", to="bob")
    assert one(db, MarkReceipt("s1:x:1", "ann", "delivered", T0)) is None
    assert one(db, MarkReceipt("s1:x:1", "mallory", "read", T0)) is None
    assert one(db, MarkReceipt("s1:x:404", "bob", "delivered", T0)) is None
    assert len(backlog(db, "bob")) == 1


def test_read_implies_delivered(db: Database) -> None:
    insert(db, 1)
    assert one(db, MarkReceipt("s1:x:1", "bob", "read", T0)) == "ann"
    assert one(db, MarkReceipt("s1:x:1", "bob", "delivered", T0 + 1)) is None
    assert backlog(db, "bob") == []


def test_backlog_is_in_order_and_leaves_out_what_was_received(db: Database) -> None:
    for seq, (sender, to) in enumerate(
        [("ann", "bob"), ("bob", "ann"), ("cat", "Bob"), ("ann", "bob"), ("ann", "BOB")], 1
    ):
        insert(db, seq, sender=sender, to=to, text=f"t{seq}")
    one(db, MarkReceipt("s1:x:4", "bob", "delivered", T0))
    assert [m[0] for m in backlog(db, "Bob")] == ["s1:x:1", "s1:x:3", "s1:x:5"]
    assert backlog(db, "ann") == [view(message(2, sender="bob", to="ann", text="t2"))]
    assert backlog(db, "nobody") == []


def test_a_failing_batch_changes_nothing(db: Database) -> None:
    insert(db, 1)
    with pytest.raises(StoreError):
        db.run_batch(
            [
                CreateAccount("Zed", "h", T0),
                InsertMessage(message(1, text="same seq again"), 1, 0),
            ]
        )
    assert one(db, GetPasswordHash("zed")) is None
    assert backlog(db, "bob") == [view(message(1))]


def test_a_batch_answers_in_order(db: Database) -> None:
    results = db.run_batch(
        [
            CreateAccount("bob", "h", T0),
            InsertMessage(message(1), 1, 0),
            LoadBacklog("bob"),
            MarkReceipt("s1:x:1", "bob", "delivered", T0),
            LoadBacklog("bob"),
            GetPasswordHash("bob"),
        ]
    )
    assert results[0] is True
    assert results[1].duplicate is False
    assert [view(m) for m in results[2]] == [view(message(1))]
    assert results[3] == "ann"
    assert results[4] == []
    assert results[5] == "h"


def test_a_resend_in_the_same_batch_is_recognised(db: Database) -> None:
    first = message(1, req_id=9)
    again = StoredMessage("s1:x:2", "ann", "BOB", "hi", T0 + 2, 9)
    results = db.run_batch([InsertMessage(first, 1, 0), InsertMessage(again, 2, 0)])
    assert results[0] == Inserted(first, duplicate=False)
    assert results[1].duplicate is True
    assert results[1].message.msg == "s1:x:1"


def test_a_resend_matches_its_own_text_even_after_the_id_was_reused(db: Database) -> None:
    insert(db, 1, req_id="r", text="A")
    insert(db, 2, req_id="r", text="B")
    result = insert(db, 3, req_id="r", text="A")
    assert (result.duplicate, result.message.msg) == (True, "s1:x:1")


def test_an_acknowledgement_twice_in_one_batch_is_news_once(db: Database) -> None:
    insert(db, 1)
    results = db.run_batch(
        [
            MarkReceipt("s1:x:1", "bob", "delivered", T0),
            MarkReceipt("s1:x:1", "bob", "delivered", T0 + 1),
            MarkReceipt("s1:x:1", "bob", "read", T0 + 2),
            MarkReceipt("s1:x:1", "bob", "read", T0 + 3),
        ]
    )
    assert results == ["ann", None, "ann", None]


def test_big_batches_are_stored_whole_and_in_order(db: Database) -> None:
    count = 1234  # more rows than one SQL statement takes
    db.run_batch([InsertMessage(message(n, req_id=n), n, 0) for n in range(1, count + 1)])
    assert [m[0] for m in backlog(db, "bob")] == [f"s1:x:{n}" for n in range(1, count + 1)]
    acks = db.run_batch(
        [MarkReceipt(f"s1:x:{n}", "bob", "delivered", T0) for n in range(1, count + 1, 2)]
    )
    assert acks == ["ann"] * len(acks)
    assert [m[0] for m in backlog(db, "bob")] == [f"s1:x:{n}" for n in range(2, count + 1, 2)]


def message_row(db: Database, msg: str) -> tuple[Any, ...]:
    check = sqlite3.connect(db.path)
    try:
        row = check.execute(
            "SELECT delivered_at, read_at, dropped_at FROM messages WHERE msg = ?", (msg,)
        ).fetchone()
        assert row is not None, msg
        return tuple(row)
    finally:
        check.close()


# --- a guest's messages, dropped -------------------------------------------------------


def test_a_guest_leaving_drops_what_it_did_not_acknowledge(db: Database) -> None:
    insert(db, 1, to="Gus", text="acked")
    insert(db, 2, to="gus", text="unread")
    insert(db, 3, to="GUS", text="unread too")
    insert(db, 4, to="ann", text="someone else's")
    one(db, MarkReceipt("s1:x:1", "gus", "read", T0))
    assert one(db, DiscardBacklog("Gus", T0 + 50)) is None
    assert backlog(db, "gus") == []
    # Marked delivered and dropped, not deleted; read_at stays empty: nobody read them.
    assert message_row(db, "s1:x:2") == (T0 + 50, None, T0 + 50)
    assert message_row(db, "s1:x:3") == (T0 + 50, None, T0 + 50)
    assert message_row(db, "s1:x:1") == (T0, T0, None)  # acknowledged: untouched
    assert [m[0] for m in backlog(db, "ann")] == ["s1:x:4"]
    assert one(db, MarkReceipt("s1:x:2", "gus", "delivered", T0 + 60)) is None  # no news
    # Later messages to the name are stored as usual (a new guest of that name is online).
    insert(db, 5, to="gus", text="new")
    assert [m[0] for m in backlog(db, "gus")] == ["s1:x:5"]


def test_registering_a_name_drops_what_was_left_for_a_guest_of_that_name(db: Database) -> None:
    insert(db, 1, to="bob", text="for the guest bob")
    assert one(db, CreateAccount("Bob", "hash", T0 + 9)) is True
    assert backlog(db, "bob") == []
    assert message_row(db, "s1:x:1") == (T0 + 9, None, T0 + 9)
    insert(db, 2, to="Bob", text="for the account")
    assert [m[0] for m in backlog(db, "BOB")] == ["s1:x:2"]


def test_a_refused_registration_keeps_the_accounts_messages(db: Database) -> None:
    one(db, CreateAccount("Alice", "hash", T0))
    insert(db, 1, to="Alice")
    assert one(db, CreateAccount("ALICE", "other", T0 + 1)) is False
    assert [m[0] for m in backlog(db, "alice")] == ["s1:x:1"]


def test_a_dropped_message_can_not_be_acknowledged_later(db: Database) -> None:
    insert(db, 1, sender="ann", to="bob", text="for the guest bob")
    one(db, DiscardBacklog("bob", T0 + 1))  # the guest left without reading it
    one(db, CreateAccount("bob", "hash", T0 + 2))  # someone else registers the name
    assert one(db, MarkReceipt("s1:x:1", "bob", "read", T0 + 3)) is None


# --- barriers, inline writes and checkpoints -------------------------------------------


def test_a_barrier_answers_none_in_its_place(db: Database) -> None:
    results = db.run_batch(
        [
            InsertMessage(message(1), 1, 0),
            Barrier(),
            MarkReceipt("s1:x:1", "bob", "delivered", T0),
            Barrier(),
            InsertMessage(message(2), 2, 0),
            InsertMessage(message(3), 3, 0),
            Barrier(),
        ]
    )
    assert len(results) == 7
    assert results[1] is None and results[3] is None and results[6] is None
    assert results[0].duplicate is False and results[2] == "ann"
    assert [r.message.msg for r in (results[4], results[5])] == ["s1:x:2", "s1:x:3"]


@pytest.mark.parametrize("batch_max", [1, 3, 512])
async def test_a_barriers_callback_runs_after_everything_queued_before_it(
    tmp_path: Path, batch_max: int
) -> None:
    database = Database(str(tmp_path / "data"))
    store = Store(database, batch_max=batch_max, queue_max=1000)
    order: list[str] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            # More than INLINE_BATCH_MAX before the barrier: that batch goes to the thread.
            for seq in range(1, INLINE_BATCH_MAX + 5):
                op = InsertMessage(message(seq), seq, 0)
                store.submit_nowait(op, lambda r, n=seq: order.append(f"insert {n}"))
            store.submit_nowait(Barrier(), lambda r: order.append(f"barrier {r}"))
            store.submit_nowait(LoadBacklog("bob"), lambda r: order.append(f"load {len(r)}"))
            store.close()
    finally:
        database.close()
    inserts = [f"insert {n}" for n in range(1, INLINE_BATCH_MAX + 5)]
    assert order == [*inserts, "barrier None", f"load {INLINE_BATCH_MAX + 4}"]


async def test_small_batches_are_written_on_the_event_loop_thread_and_big_ones_not(
    tmp_path: Path,
) -> None:
    database = Database(str(tmp_path / "data"))
    threads: list[tuple[int, bool]] = []
    run_batch = database.run_batch

    def spy(ops: list[Any]) -> list[Any]:
        threads.append((len(ops), threading.get_ident() == loop_thread))
        return run_batch(ops)

    database.run_batch = spy  # type: ignore[method-assign]
    loop_thread = threading.get_ident()
    store = Store(database, batch_max=512, queue_max=1000)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            for seq in range(1, INLINE_BATCH_MAX + 1):
                await store.submit(InsertMessage(message(seq), seq, 0), lambda r: None)
            await trio.testing.wait_all_tasks_blocked()
            for seq in range(100, 100 + INLINE_BATCH_MAX + 1):
                store.submit_nowait(InsertMessage(message(seq), seq, 0), lambda r: None)
            store.close()
    finally:
        database.close()
    assert all(inline for size, inline in threads if size <= INLINE_BATCH_MAX)
    assert (INLINE_BATCH_MAX + 1, False) in threads


def test_checkpoints_are_due_after_many_rows_and_never_block_a_reader(db: Database) -> None:
    assert not db.wants_checkpoint() and db.inline_ok()
    db.run_batch([InsertMessage(message(n), n, 0) for n in range(1, CHECKPOINT_ROWS + 1)])
    assert db.wants_checkpoint()
    reader = sqlite3.connect(db.path)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM messages").fetchone()  # holds a read snapshot
        db.checkpoint()  # PASSIVE: does what it can now, never waits for the reader
        assert not db.wants_checkpoint()
        reader.execute("COMMIT")
    finally:
        reader.close()
    assert len(backlog(db, "bob")) == CHECKPOINT_ROWS


# --- databases made by earlier versions -------------------------------------------------

OLD_MESSAGES = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE accounts (
    key TEXT PRIMARY KEY, name TEXT NOT NULL, pw_hash TEXT NOT NULL,
    created INTEGER NOT NULL, last_seen INTEGER
);
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY, msg TEXT NOT NULL UNIQUE, sender TEXT NOT NULL,
    sender_key TEXT NOT NULL, recipient TEXT NOT NULL, recipient_key TEXT NOT NULL,
    text TEXT NOT NULL, ts INTEGER NOT NULL, req_id TEXT,{resend_column}
    delivered_at INTEGER, read_at INTEGER
);
CREATE INDEX messages_pending ON messages (recipient_key, seq) WHERE delivered_at IS NULL;
INSERT INTO meta VALUES ('incarnation', 'old123');
INSERT INTO accounts VALUES ('bob', 'Bob', 'hash-b', 1, NULL);
INSERT INTO messages (seq, msg, sender, sender_key, recipient, recipient_key, text, ts, req_id)
    VALUES (7, 's1:old123:7', 'ann', 'ann', 'Bob', 'bob', 'from before', 5, '"r1"');
"""


@pytest.mark.parametrize(
    ("resend_column", "old_index"),
    [
        ("", ""),  # before resend detection: no resend_key, no dropped_at
        (
            "\n    resend_key INTEGER,",  # resend_key with a unique index on it alone
            "CREATE UNIQUE INDEX messages_resend ON messages (resend_key);",
        ),
    ],
    ids=["no-resend-key", "old-resend-index"],
)
def test_an_old_database_is_migrated_on_opening(
    tmp_path: Path, resend_column: str, old_index: str
) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    old = sqlite3.connect(folder / DB_FILE)
    old.executescript(OLD_MESSAGES.format(resend_column=resend_column) + old_index)
    old.close()

    database = Database(str(folder))
    try:
        check = sqlite3.connect(folder / DB_FILE)
        columns = {row[1] for row in check.execute("PRAGMA table_info(messages)")}
        assert {"resend_key", "dropped_at"} <= columns
        assert check.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        index = [row[2] for row in check.execute("PRAGMA index_info(messages_resend)")]
        assert index == ["sender_key", "req_id", "resend_key"]
        check.close()
        # What was stored before is still there and offered.
        assert database.accounts() == [("Bob", None)]
        assert database.next_seq() == 8
        assert backlog(database, "bob") == [("s1:old123:7", "ann", "Bob", "from before", 5)]
        # Storing and recognising resends work on the migrated table.
        first = StoredMessage("s1:new:8", "ann", "Bob", "hello", T0, "r1")
        assert one(database, InsertMessage(first, 8, 0)).duplicate is False
        again = StoredMessage("s1:new:9", "ANN", "bob", "hello", T0 + 1, "r1")
        result = one(database, InsertMessage(again, 9, 0))
        assert (result.duplicate, result.message.msg) == (True, "s1:new:8")
        # The old row has no resend key: a send with its id is a new message.
        fresh = insert(database, 10, sender="ann", to="Bob", text="from before", req_id="r1")
        assert fresh.duplicate is False
        assert one(database, MarkReceipt("s1:old123:7", "bob", "read", T0)) == "ann"
        one(database, DiscardBacklog("bob", T0))
        assert backlog(database, "bob") == []
    finally:
        database.close()
    # Opening a migrated database again changes nothing.
    database = Database(str(folder))
    try:
        assert database.next_seq() == 11
    finally:
        database.close()


# --- against a model, in random batches -----------------------------------------------

NAMES = ["ann", "Bob", "bob", "cat"]
WINDOW = 4


@attrs.define
class Row:
    message: StoredMessage
    delivered: bool = False
    read: bool = False


class StoreModel:
    """The rules of protocol.md "Resending a send" and "received and read", in plain Python."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.latest: dict[tuple[str, str, str, str], Row] = {}

    def insert(self, op: InsertMessage) -> tuple[bool, str]:
        m = op.message
        key = (m.sender.lower(), repr(m.req_id), m.to.lower(), m.text)
        found = self.latest.get(key) if m.req_id is not None else None
        if found is not None and found.message.ts >= op.dedup_since:
            return True, found.message.msg
        row = Row(m)
        self.rows.append(row)
        if m.req_id is not None:
            self.latest[key] = row
        return False, m.msg

    def receipt(self, op: MarkReceipt) -> str | None:
        for row in self.rows:
            if row.message.msg == op.msg and row.message.to.lower() == op.by.lower():
                news = not (row.read if op.status == "read" else row.delivered)
                row.delivered = True
                row.read = row.read or op.status == "read"
                return row.message.sender if news else None
        return None

    def backlog(self, user: str) -> list[str]:
        return [
            r.message.msg
            for r in self.rows
            if r.message.to.lower() == user.lower() and not r.delivered
        ]


@st.composite
def operations(draw: st.DrawFn) -> list[Any]:
    ops: list[Any] = []
    ts = T0
    for seq in range(1, draw(st.integers(1, 40)) + 1):
        ts += draw(st.integers(0, 3))
        if draw(st.integers(0, 2)) or seq == 1:
            m = StoredMessage(
                f"s1:x:{seq}",
                draw(st.sampled_from(NAMES)),
                draw(st.sampled_from(NAMES)),
                draw(st.sampled_from(["hi", "Hi", "yo"])),
                ts,
                draw(st.sampled_from([None, "1", 1, "2"])),
            )
            ops.append(InsertMessage(m, seq, ts - WINDOW))
        else:
            target = draw(st.integers(1, seq))  # sometimes a message that does not exist
            ops.append(
                MarkReceipt(
                    f"s1:x:{target}",
                    draw(st.sampled_from(NAMES)),
                    draw(st.sampled_from(["delivered", "read"])),
                    ts,
                )
            )
    return ops


@settings(max_examples=60, deadline=None)
@given(ops=operations(), cuts=st.lists(st.integers(0, 40), max_size=6))
def test_batches_answer_as_the_rules_say_whatever_the_batching(
    ops: list[Any], cuts: list[int]
) -> None:
    model = StoreModel()
    bounds = sorted({0, len(ops), *(c for c in cuts if c < len(ops))})
    with tempfile.TemporaryDirectory() as folder:
        database = Database(folder)
        try:
            for start, end in itertools.pairwise(bounds):
                batch = ops[start:end]
                for op, got in zip(batch, database.run_batch(batch), strict=True):
                    if isinstance(op, InsertMessage):
                        assert (got.duplicate, got.message.msg) == model.insert(op)
                    else:
                        assert got == model.receipt(op)
            for user in ("ann", "bob", "cat"):
                assert [m[0] for m in backlog(database, user)] == model.backlog(user)
        finally:
            database.close()


# --- with the hub, across a restart ---------------------------------------------------


def start_hub(folder: str) -> tuple[Hub, Database]:
    """Open the folder and build the hub from it, as server.py does."""
    database = Database(folder)
    hub = Hub(
        "s1",
        accounts=database.accounts(),
        next_seq=database.next_seq(),
        incarnation=database.incarnation,
    )
    return hub, database


def store(hub: Hub, database: Database, effect: StoreMessage) -> None:
    [inserted] = database.run_batch([InsertMessage(effect.message, effect.seq, 0)])
    hub.message_stored(inserted.message, effect.conn, effect.req_id, duplicate=inserted.duplicate)


def test_private_message_ids_are_not_reused_after_a_restart(tmp_path: Path) -> None:
    folder = str(tmp_path / "data")
    hub, database = start_hub(folder)
    hub.login(1, "ann", auto_ack=False, now=T0, req_id=None)
    hub.login(2, "bob", auto_ack=False, now=T0, req_id=None)
    before = set()
    for _ in range(3):
        [effect] = hub.handle(1, messages.SendRequest("bob", "x"), None, T0)
        store(hub, database, effect)
        before.add(effect.message.msg)
    database.close()

    hub, database = start_hub(folder)
    try:
        hub.login(1, "ann", auto_ack=False, now=T0, req_id=None)
        hub.login(2, "bob", auto_ack=False, now=T0, req_id=None)
        [effect] = hub.handle(1, messages.SendRequest("bob", "x"), None, T0)
        assert effect.message.msg not in before
    finally:
        database.close()


def broadcast_id(hub: Hub, conn: int) -> str:
    [later] = hub.handle(conn, messages.BroadcastRequest("hello all"), None, T0)
    assert isinstance(later, AfterStored)
    sent = later.effects[0]
    assert isinstance(sent, Reply) and isinstance(sent.event, messages.Sent)
    return sent.event.msg


def test_broadcast_ids_are_not_reused_after_a_restart(tmp_path: Path) -> None:
    # Broadcasts are numbered but not stored: after a restart the next private message
    # gets the same number, but the new incarnation keeps its id apart.
    folder = str(tmp_path / "data")
    hub, database = start_hub(folder)
    hub.login(1, "ann", auto_ack=False, now=T0, req_id=None)
    hub.login(2, "bob", auto_ack=False, now=T0, req_id=None)
    broadcast = broadcast_id(hub, 1)
    database.close()

    hub, database = start_hub(folder)
    try:
        hub.login(1, "ann", auto_ack=False, now=T0, req_id=None)
        hub.login(2, "bob", auto_ack=False, now=T0, req_id=None)
        [effect] = hub.handle(1, messages.SendRequest("bob", "private"), None, T0)
        assert effect.seq == int(broadcast.rsplit(":", 1)[1])  # the same number ...
        assert effect.message.msg != broadcast  # ... in a different id
    finally:
        database.close()


def test_message_ids_never_repeat_across_reopenings(tmp_path: Path) -> None:
    folder = str(tmp_path / "data")
    ids: list[str] = []
    for run in range(4):
        hub, database = start_hub(folder)
        try:
            hub.login(1, "ann", auto_ack=False, now=T0, req_id=None)
            hub.login(2, "bob", auto_ack=False, now=T0, req_id=None)
            for i in range(3):
                if (run + i) % 2:
                    ids.append(broadcast_id(hub, 1))
                else:
                    [effect] = hub.handle(1, messages.SendRequest("bob", "x"), None, T0)
                    store(hub, database, effect)
                    ids.append(effect.message.msg)
        finally:
            database.close()
    assert len(set(ids)) == len(ids) == 12
    assert len({i.split(":")[1] for i in ids}) == 4  # one incarnation per opening


def test_a_guests_messages_are_not_offered_to_a_later_account_of_that_name(
    tmp_path: Path,
) -> None:
    hub, database = start_hub(str(tmp_path / "data"))
    try:
        hub.login(1, "ann", auto_ack=False, now=T0, req_id=None)
        hub.login(2, "bob", auto_ack=False, now=T0, req_id=None)  # bob is a guest
        [effect] = hub.handle(1, messages.SendRequest("bob", "the door code is 4711"), None, T0)
        hub.disconnect(2, T0 + 1)  # bob leaves before reading it (no 'received')
        store(hub, database, effect)  # storage was slow: stored after bob left
        # Someone else registers the now free name "bob" and logs in.
        assert one(database, CreateAccount("bob", "hash", T0 + 2)) is True
        hub.add_account("bob")
        hub.login(3, "bob", auto_ack=False, now=T0 + 3, req_id=None)
        assert backlog(database, "bob") == []
    finally:
        database.close()


def test_a_guests_unread_messages_are_dropped_when_it_leaves(tmp_path: Path) -> None:
    # The effects a guest's leaving makes, carried out in order as the shell does.
    hub, database = start_hub(str(tmp_path / "data"))
    try:
        hub.login(1, "ann", auto_ack=False, now=T0, req_id=None)
        hub.login(2, "bob", auto_ack=False, now=T0, req_id=None)
        for text in ("one", "two"):
            [effect] = hub.handle(1, messages.SendRequest("bob", text), None, T0)
            store(hub, database, effect)
        one(database, MarkReceipt(f"s1:{database.incarnation}:1", "bob", "received", T0))
        ops = [
            DiscardBacklog(e.user, e.ts)
            for e in hub.disconnect(2, T0 + 1)
            if isinstance(e, DropBacklog)
        ]
        assert ops == [DiscardBacklog("bob", T0 + 1)]
        database.run_batch(ops)
        assert backlog(database, "bob") == []
        assert message_row(database, f"s1:{database.incarnation}:2") == (T0 + 1, None, T0 + 1)
    finally:
        database.close()
