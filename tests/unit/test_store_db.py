"""Database: the SQLite file behind accounts, messages, receipts and backlogs (sync), and the
store queue in front of it. What each server owes whom, and what survives a restart, is in
test_database.py."""

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
from trichat.accounts import AccountRecord
from trichat.database import CHECKPOINT_ROWS, SCHEMA_VERSION
from trichat.hub import (
    AfterStored,
    Backlog,
    DropBacklog,
    FetchBacklog,
    Hub,
    Reply,
    StoredMessage,
    StoreMessage,
)
from trichat.store import (
    DB_FILE,
    INLINE_BATCH_MAX,
    AddAccounts,
    Barrier,
    CreateAccount,
    Database,
    DiscardBacklog,
    Inserted,
    InsertMessage,
    LoadBacklog,
    MarkReceipt,
    SaveLastSeen,
    Store,
    StoreError,
)

T0 = 1_700_000_000_000


def uid(name: str) -> str:
    """The identity a name stands for in these tests (an account's: any case is it)."""
    return f"u.{name.lower()}"


def account(name: str, oseq: int = 1, *, origin: str = "s1", created: int = T0) -> AccountRecord:
    return AccountRecord(uid(name), name, f"hash-{name}", created, origin, oseq)


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
        f"s1:x:{seq}",
        sender,
        to,
        text,
        kw.pop("ts", T0 + seq),
        kw.pop("req_id", None),
        kw.pop("sender_uid", uid(sender)),
        kw.pop("to_uid", uid(to)),
    )


def insert(db: Database, seq: int, *, since: int = 0, **kw: Any) -> Inserted:
    return one(db, InsertMessage(message(seq, **kw), seq, since))  # type: ignore[no-any-return]


def view(m: StoredMessage) -> tuple[str, str, str, str, int]:
    return (m.msg, m.sender, m.to, m.text, m.ts)


def backlog(db: Database, user: str) -> list[tuple[str, str, str, str, int]]:
    """What is offered to ``user``'s identity (``uid(user)``, or a guest session's id)."""
    who = user if user.startswith("g.") else uid(user)
    found = one(db, LoadBacklog(who))
    assert isinstance(found, Backlog)
    return [view(m) for m in found.messages]


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
        assert {"account_records", "messages", "meta", "kept_receipts"} <= tables
        assert "accounts" not in tables  # schema 1's, by name
    finally:
        database.close()


def test_data_survives_reopening_with_a_new_incarnation(tmp_path: Path) -> None:
    folder = str(tmp_path / "data")
    first = Database(folder)
    incarnation = first.incarnation
    alice = account("Alice")
    one(first, CreateAccount(alice))
    insert(first, 1, to="Alice", text="kept")
    insert(first, 2, to="Alice", text="acked")
    one(first, MarkReceipt("s1:x:2", alice.uid, "delivered", T0))
    one(first, SaveLastSeen(alice.uid, T0 + 5))
    first.close()

    again = Database(folder)
    try:
        # New at every opening (not stored): ids of this run can't repeat an earlier run's.
        assert again.incarnation != incarnation
        assert again.accounts() == [alice]  # with its password hash
        assert again.last_seen() == {alice.uid: T0 + 5}
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
        assert check.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,) == (2,)
        columns = {row[1] for row in check.execute("PRAGMA table_info(messages)")}
        assert {"resend_key", "dropped_at", "delivered_at", "read_at"} <= columns
        assert {"sender_uid", "recipient_uid", "receipts_owed"} <= columns
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


def test_an_account_record_is_stored_once(db: Database) -> None:
    alice = account("Alice")
    assert one(db, CreateAccount(alice)) is True
    assert one(db, CreateAccount(alice)) is False  # that account is stored already
    # Another record with the same origin and oseq is a conflicting copy: refused.
    clash = AccountRecord("u.other", "Other", "h", T0, "s1", 1)
    assert one(db, CreateAccount(clash)) is False
    assert db.accounts() == [alice]


def test_two_registrations_of_one_name_are_both_kept(db: Database) -> None:
    # Names are settled by accounts.py's rule over the records, not by the database: a
    # record from another server that registered the name too is kept, whole.
    mine = AccountRecord("u.dan1", "dan", "h1", T0, "s1", 1)
    theirs = AccountRecord("u.dan2", "DAN", "h2", T0 - 1, "s2", 1)
    assert one(db, CreateAccount(mine)) is True
    one(db, AddAccounts([theirs]))
    assert sorted(db.accounts(), key=lambda r: r.uid) == [mine, theirs]


def test_last_seen_is_saved_per_account(db: Database) -> None:
    alice, bob = account("Alice", 1), account("bob", 2)
    db.run_batch([CreateAccount(alice), CreateAccount(bob)])
    one(db, SaveLastSeen(alice.uid, T0 + 7))
    assert db.last_seen() == {alice.uid: T0 + 7}
    one(db, SaveLastSeen("u.nobody", T0 + 8))  # no such account: nothing to save
    assert db.last_seen() == {alice.uid: T0 + 7}


# --- messages and resends -----------------------------------------------------------


def test_a_new_message_is_stored_as_given(db: Database) -> None:
    result = insert(db, 1, req_id="r1")
    assert result == Inserted(message(1, req_id="r1"), duplicate=False)
    assert db.next_seq() == 2


def test_a_resend_within_the_window_is_the_original_message(db: Database) -> None:
    insert(db, 1, req_id="r1", text="hello", ts=T0)
    resend = StoredMessage("s1:x:2", "ANN", "Bob", "hello", T0 + 500, "r1", uid("ann"), uid("bob"))
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
        # The same name, another identity: a later guest of the name, or another account
        # that was registered with it elsewhere (protocol.md "Identities").
        {"sender_uid": "g.s1.b.2"},
        {"to_uid": "g.s1.b.3"},
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


ANN, BOB = uid("ann"), uid("bob")


def test_a_receipt_names_the_sender_only_the_first_time(db: Database) -> None:
    insert(db, 1, sender="Ann", to="bob")
    assert one(db, MarkReceipt("s1:x:1", BOB, "delivered", T0)) == ("Ann", ANN)
    assert one(db, MarkReceipt("s1:x:1", BOB, "delivered", T0 + 1)) is None
    assert one(db, MarkReceipt("s1:x:1", BOB, "read", T0 + 2)) == ("Ann", ANN)
    assert one(db, MarkReceipt("s1:x:1", BOB, "read", T0 + 3)) is None


def test_only_the_recipient_can_acknowledge(db: Database) -> None:
    insert(db, 1, sender="ann", to="bob")
    assert one(db, MarkReceipt("s1:x:1", ANN, "delivered", T0)) is None
    assert one(db, MarkReceipt("s1:x:1", uid("mallory"), "read", T0)) is None
    assert one(db, MarkReceipt("s1:x:1", "g.s1.b.9", "read", T0)) is None  # a guest named bob
    assert one(db, MarkReceipt("s1:x:404", BOB, "delivered", T0)) is None
    assert len(backlog(db, "bob")) == 1


def test_read_implies_delivered(db: Database) -> None:
    insert(db, 1)
    assert one(db, MarkReceipt("s1:x:1", BOB, "read", T0)) == ("ann", ANN)
    assert one(db, MarkReceipt("s1:x:1", BOB, "delivered", T0 + 1)) is None
    assert backlog(db, "bob") == []


def test_backlog_is_in_order_and_leaves_out_what_was_received(db: Database) -> None:
    for seq, (sender, to) in enumerate(
        [("ann", "bob"), ("bob", "ann"), ("cat", "Bob"), ("ann", "bob"), ("ann", "BOB")], 1
    ):
        insert(db, seq, sender=sender, to=to, text=f"t{seq}")
    one(db, MarkReceipt("s1:x:4", BOB, "delivered", T0))
    assert [m[0] for m in backlog(db, "Bob")] == ["s1:x:1", "s1:x:3", "s1:x:5"]
    assert backlog(db, "ann") == [view(message(2, sender="bob", to="ann", text="t2"))]
    assert backlog(db, "nobody") == []


def test_a_failing_batch_changes_nothing(db: Database) -> None:
    insert(db, 1)
    with pytest.raises(StoreError):
        db.run_batch(
            [
                CreateAccount(account("Zed")),
                InsertMessage(message(1, text="same seq again"), 1, 0),
            ]
        )
    assert db.accounts() == []
    assert backlog(db, "bob") == [view(message(1))]


def test_a_batch_answers_in_order(db: Database) -> None:
    results = db.run_batch(
        [
            CreateAccount(account("bob")),
            InsertMessage(message(1), 1, 0),
            LoadBacklog(BOB),
            MarkReceipt("s1:x:1", BOB, "delivered", T0),
            LoadBacklog(BOB),
            CreateAccount(account("bob")),
        ]
    )
    assert results[0] is True
    assert results[1].duplicate is False
    assert [view(m) for m in results[2].messages] == [view(message(1))]
    assert results[3] == ("ann", ANN)
    assert results[4] == Backlog()
    assert results[5] is False


def test_a_resend_in_the_same_batch_is_recognised(db: Database) -> None:
    first = message(1, req_id=9)
    again = StoredMessage("s1:x:2", "ann", "BOB", "hi", T0 + 2, 9, ANN, BOB)
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
            MarkReceipt("s1:x:1", BOB, "delivered", T0),
            MarkReceipt("s1:x:1", BOB, "delivered", T0 + 1),
            MarkReceipt("s1:x:1", BOB, "read", T0 + 2),
            MarkReceipt("s1:x:1", BOB, "read", T0 + 3),
        ]
    )
    assert results == [("ann", ANN), None, ("ann", ANN), None]


def test_big_batches_are_stored_whole_and_in_order(db: Database) -> None:
    count = 1234  # more rows than one SQL statement takes
    db.run_batch([InsertMessage(message(n, req_id=n), n, 0) for n in range(1, count + 1)])
    assert [m[0] for m in backlog(db, "bob")] == [f"s1:x:{n}" for n in range(1, count + 1)]
    acks = db.run_batch(
        [MarkReceipt(f"s1:x:{n}", BOB, "delivered", T0) for n in range(1, count + 1, 2)]
    )
    assert acks == [("ann", ANN)] * len(acks)
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


GUS = "g.s1.boot.100"  # a guest session of the name gus
GUS_LATER = "g.s1.boot.200"  # a later guest of the same name: someone else


def test_a_guest_leaving_drops_what_it_did_not_acknowledge(db: Database) -> None:
    insert(db, 1, to="Gus", to_uid=GUS, text="acked")
    insert(db, 2, to="gus", to_uid=GUS, text="unread")
    insert(db, 3, to="GUS", to_uid=GUS, text="unread too")
    insert(db, 4, to="ann", text="someone else's")
    one(db, MarkReceipt("s1:x:1", GUS, "read", T0))
    assert one(db, DiscardBacklog(GUS, T0 + 50)) is None
    assert backlog(db, GUS) == []
    # Marked delivered and dropped, not deleted; read_at stays empty: nobody read them.
    assert message_row(db, "s1:x:2") == (T0 + 50, None, T0 + 50)
    assert message_row(db, "s1:x:3") == (T0 + 50, None, T0 + 50)
    assert message_row(db, "s1:x:1") == (T0, T0, None)  # acknowledged: untouched
    assert [m[0] for m in backlog(db, "ann")] == ["s1:x:4"]
    assert one(db, MarkReceipt("s1:x:2", GUS, "delivered", T0 + 60)) is None  # no news
    # Messages to a new guest of that name are its own, and stored as usual.
    insert(db, 5, to="gus", to_uid=GUS_LATER, text="new")
    assert [m[0] for m in backlog(db, GUS_LATER)] == ["s1:x:5"]
    assert backlog(db, GUS) == []


def test_another_guest_leaving_drops_nothing_of_an_earlier_ones(db: Database) -> None:
    insert(db, 1, to="gus", to_uid=GUS, text="for the first gus")
    one(db, DiscardBacklog(GUS_LATER, T0 + 1))
    assert [m[0] for m in backlog(db, GUS)] == ["s1:x:1"]


def test_an_account_registered_with_a_guests_name_never_gets_the_guests_mail(
    db: Database,
) -> None:
    insert(db, 1, to="bob", to_uid=GUS, text="for the guest bob")
    bob = account("Bob")
    assert one(db, CreateAccount(bob)) is True
    assert backlog(db, "bob") == []  # the account's backlog: not the guest's message
    insert(db, 2, to="Bob", text="for the account")
    assert [m[0] for m in backlog(db, "BOB")] == ["s1:x:2"]
    assert [m[0] for m in backlog(db, GUS)] == ["s1:x:1"]  # still the guest's, until dropped


def test_a_refused_registration_keeps_the_accounts_messages(db: Database) -> None:
    one(db, CreateAccount(account("Alice")))
    insert(db, 1, to="Alice")
    assert one(db, CreateAccount(account("ALICE"))) is False
    assert [m[0] for m in backlog(db, "alice")] == ["s1:x:1"]


def test_a_dropped_message_can_not_be_acknowledged_later(db: Database) -> None:
    insert(db, 1, sender="ann", to="bob", to_uid=GUS, text="for the guest bob")
    one(db, DiscardBacklog(GUS, T0 + 1))  # the guest left without reading it
    one(db, CreateAccount(account("bob")))  # someone else registers the name
    assert one(db, MarkReceipt("s1:x:1", GUS, "read", T0 + 3)) is None
    assert one(db, MarkReceipt("s1:x:1", BOB, "read", T0 + 3)) is None


# --- barriers, inline writes and checkpoints -------------------------------------------


def test_a_barrier_answers_none_in_its_place(db: Database) -> None:
    results = db.run_batch(
        [
            InsertMessage(message(1), 1, 0),
            Barrier(),
            MarkReceipt("s1:x:1", BOB, "delivered", T0),
            Barrier(),
            InsertMessage(message(2), 2, 0),
            InsertMessage(message(3), 3, 0),
            Barrier(),
        ]
    )
    assert len(results) == 7
    assert results[1] is None and results[3] is None and results[6] is None
    assert results[0].duplicate is False and results[2] == ("ann", ANN)
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
            store.submit_nowait(LoadBacklog(BOB), lambda r: order.append(f"load {len(r.messages)}"))
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

# Schema 1 as the last release made it (git show HEAD~:trichat/store.py), and two earlier
# shapes of it: before resend detection, and with a resend index on the key alone.
SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE accounts (
    key TEXT PRIMARY KEY, name TEXT NOT NULL, pw_hash TEXT NOT NULL,
    created INTEGER NOT NULL, last_seen INTEGER
);
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY, msg TEXT NOT NULL UNIQUE, sender TEXT NOT NULL,
    sender_key TEXT NOT NULL, recipient TEXT NOT NULL, recipient_key TEXT NOT NULL,
    text TEXT NOT NULL, ts INTEGER NOT NULL, req_id TEXT,{columns}
    delivered_at INTEGER, read_at INTEGER
);
CREATE INDEX messages_pending ON messages (recipient_key, seq) WHERE delivered_at IS NULL;
{index}
INSERT INTO meta VALUES ('incarnation', 'old123');
INSERT INTO accounts VALUES ('bob', 'Bob', 'hash-b', 1, NULL);
INSERT INTO accounts VALUES ('alice', 'Alice', 'hash-a', 2, 77);
INSERT INTO messages (seq, msg, sender, sender_key, recipient, recipient_key, text, ts, req_id)
VALUES
    (7, 's1:old123:7', 'ann', 'ann', 'Bob', 'bob', 'from before', 5, '"r1"'),
    (8, 's1:old123:8', 'Alice', 'alice', 'Bob', 'bob', 'read already', 6, NULL),
    (9, 's1:old123:9', 'Bob', 'bob', 'Alice', 'alice', 'for alice', 7, NULL);
UPDATE messages SET delivered_at = 8, read_at = 9 WHERE seq = 8;
"""
SCHEMA_1_SHAPES = {
    "no-resend-key": ("", ""),
    "old-resend-index": (
        "\n    resend_key INTEGER,",
        "CREATE UNIQUE INDEX messages_resend ON messages (resend_key);",
    ),
    "schema-1": (
        "\n    resend_key INTEGER,\n    dropped_at INTEGER,",
        "CREATE UNIQUE INDEX messages_resend ON messages (sender_key, req_id, resend_key) "
        "WHERE resend_key IS NOT NULL;",
    ),
}


def make_schema_1(folder: Path, shape: str) -> None:
    folder.mkdir()
    columns, index = SCHEMA_1_SHAPES[shape]
    old = sqlite3.connect(folder / DB_FILE)
    old.executescript(SCHEMA_1.format(columns=columns, index=index))
    old.close()


@pytest.mark.parametrize("shape", sorted(SCHEMA_1_SHAPES))
def test_a_schema_1_database_is_migrated_on_opening(tmp_path: Path, shape: str) -> None:
    folder = tmp_path / "data"
    make_schema_1(folder, shape)

    database = Database(str(folder), "s0")
    try:
        check = sqlite3.connect(folder / DB_FILE)
        tables = {row[0] for row in check.execute("SELECT name FROM sqlite_master")}
        assert "accounts" not in tables and "messages_v1" not in tables
        assert check.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        index = [row[2] for row in check.execute("PRAGMA index_info(messages_resend)")]
        assert index == ["sender_uid", "req_id", "resend_key"]
        check.close()
        # Every account is one registered on this server, in the order they were made,
        # with a new id each and its password hash and last-seen time.
        accounts = sorted(database.accounts(), key=lambda r: r.oseq)
        assert [(r.name, r.pw_hash, r.created, r.origin, r.oseq) for r in accounts] == [
            ("Bob", "hash-b", 1, "s0", 1),
            ("Alice", "hash-a", 2, "s0", 2),
        ]
        bob, alice = accounts
        assert bob.uid != alice.uid
        assert all(len(r.uid) == 16 and int(r.uid, 16) >= 0 for r in accounts)
        assert database.last_seen() == {alice.uid: 77}
        assert database.next_seq() == 10
        # What was not delivered is still offered, now to the account's id; what was
        # delivered is not.
        [kept] = one(database, LoadBacklog(bob.uid)).messages
        assert view(kept) == ("s1:old123:7", "ann", "Bob", "from before", 5)
        assert (kept.sender_uid, kept.to_uid) == ("g.legacy.ann", bob.uid)  # ann was a guest
        [for_alice] = one(database, LoadBacklog(alice.uid)).messages
        assert (for_alice.msg, for_alice.sender_uid) == ("s1:old123:9", bob.uid)
        assert one(database, MarkReceipt("s1:old123:8", bob.uid, "read", T0)) is None
        assert one(database, MarkReceipt("s1:old123:7", bob.uid, "read", T0)) == (
            "ann",
            "g.legacy.ann",
        )
        assert one(database, LoadBacklog(bob.uid)) == Backlog()
        # Storing and recognising resends work on the migrated table.
        guest = "g.s0.new.1"
        first = StoredMessage("s1:new:10", "ann", "Bob", "hello", T0, "r1", guest, bob.uid)
        assert one(database, InsertMessage(first, 10, 0)).duplicate is False
        again = StoredMessage("s1:new:11", "ann", "bob", "hello", T0 + 1, "r1", guest, bob.uid)
        result = one(database, InsertMessage(again, 11, 0))
        assert (result.duplicate, result.message.msg) == (True, "s1:new:10")
        # A hub built from it knows the accounts by name.
        hub = Hub("s0", accounts=database.accounts(), last_seen=database.last_seen())
        assert hub.check_login("BOB", "password") == [bob]
        assert hub.book.name_of(alice.uid) == "Alice"
    finally:
        database.close()
    # Opening a migrated database again changes nothing: the same ids, the same messages.
    database = Database(str(folder), "s9")
    try:
        assert sorted(database.accounts(), key=lambda r: r.oseq) == [bob, alice]
        assert database.next_seq() == 11  # 11 was a resend: not stored
        assert [m.msg for m in one(database, LoadBacklog(alice.uid)).messages] == ["s1:old123:9"]
    finally:
        database.close()


# --- against a model, in random batches -----------------------------------------------

# (name, identity): accounts typed in either case, and a guest session named like one.
IDENTITIES = [("ann", ANN), ("Bob", BOB), ("bob", BOB), ("cat", uid("cat")), ("ann", "g.s1.b.1")]
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
        key = (m.sender_uid, repr(m.req_id), m.to_uid, m.text)
        found = self.latest.get(key) if m.req_id is not None else None
        if found is not None and found.message.ts >= op.dedup_since:
            return True, found.message.msg
        row = Row(m)
        self.rows.append(row)
        if m.req_id is not None:
            self.latest[key] = row
        return False, m.msg

    def receipt(self, op: MarkReceipt) -> tuple[str, str] | None:
        for row in self.rows:
            if row.message.msg == op.msg and row.message.to_uid == op.uid:
                news = not (row.read if op.status == "read" else row.delivered)
                row.delivered = True
                row.read = row.read or op.status == "read"
                return (row.message.sender, row.message.sender_uid) if news else None
        return None

    def backlog(self, identity: str) -> list[str]:
        return [
            r.message.msg for r in self.rows if r.message.to_uid == identity and not r.delivered
        ]


@st.composite
def operations(draw: st.DrawFn) -> list[Any]:
    ops: list[Any] = []
    ts = T0
    for seq in range(1, draw(st.integers(1, 40)) + 1):
        ts += draw(st.integers(0, 3))
        if draw(st.integers(0, 2)) or seq == 1:
            sender, sender_uid = draw(st.sampled_from(IDENTITIES))
            to, to_uid = draw(st.sampled_from(IDENTITIES))
            m = StoredMessage(
                f"s1:x:{seq}",
                sender,
                to,
                draw(st.sampled_from(["hi", "Hi", "yo"])),
                ts,
                draw(st.sampled_from([None, "1", 1, "2"])),
                sender_uid,
                to_uid,
            )
            ops.append(InsertMessage(m, seq, ts - WINDOW))
        else:
            target = draw(st.integers(1, seq))  # sometimes a message that does not exist
            ops.append(
                MarkReceipt(
                    f"s1:x:{target}",
                    draw(st.sampled_from(IDENTITIES))[1],
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
            for identity in {i for _, i in IDENTITIES}:
                got = one(database, LoadBacklog(identity)).messages
                assert [m.msg for m in got] == model.backlog(identity)
        finally:
            database.close()


# --- with the hub, across a restart ---------------------------------------------------


def start_hub(folder: str) -> tuple[Hub, Database]:
    """Open the folder and build the hub from it, as server.py does."""
    database = Database(folder, "s1")
    hub = Hub(
        "s1",
        accounts=database.accounts(),
        last_seen=database.last_seen(),
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
        reg, _ = hub.begin_register("bob", T0 + 2)
        record = hub.make_account(reg, "b0b0000000000001", "hash")
        assert one(database, CreateAccount(record)) is True
        hub.account_stored(reg, record)
        effects = hub.login(3, "bob", auto_ack=False, now=T0 + 3, req_id=None, uid=record.uid)
        [fetch] = [e for e in effects if isinstance(e, FetchBacklog)]
        assert one(database, LoadBacklog(fetch.uid)) == Backlog()
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
        bob = hub.conns[2].uid
        one(database, MarkReceipt(f"s1:{database.incarnation}:1", bob, "delivered", T0))
        ops = [
            DiscardBacklog(e.uid, e.ts)
            for e in hub.disconnect(2, T0 + 1)
            if isinstance(e, DropBacklog)
        ]
        assert ops == [DiscardBacklog(bob, T0 + 1)]
        database.run_batch(ops)
        assert backlog(database, bob) == []
        assert message_row(database, f"s1:{database.incarnation}:2") == (T0 + 1, None, T0 + 1)
    finally:
        database.close()
