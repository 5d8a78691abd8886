"""Database, what the mesh relies on: what is stored, what each server still owes whom,
what is marked once delivered, and what survives closing and reopening (sync, no Trio).

protocol.md "Store and forward": the server a message was sent on keeps it, by the
recipient's identity, until that identity's ``received`` comes back; receipts for a sender
who is online nowhere are kept with the message until told; receipts for a server that is
not linked are kept per server until it links again.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trichat import database as database_module
from trichat.accounts import AccountRecord
from trichat.effects import Backlog, OwedReceipt, StoredMessage
from trichat.peerproto import PeerReceipt
from trichat.store import (
    AddAccounts,
    CreateAccount,
    Database,
    DiscardBacklog,
    Inserted,
    InsertMessage,
    KeepForPeer,
    LoadBacklog,
    MarkReceipt,
    MarkReceiptsOwed,
    SaveLastSeen,
    TakeKeptForPeer,
)

T0 = 1_700_000_000_000
ANN = "a00a00a00a00a001"  # accounts' ids
BOB = "b00b00b00b00b002"
GUEST_ANN = "g.s1.boot.1000"  # a guest session named ann


@pytest.fixture
def folder(tmp_path: Path) -> str:
    return str(tmp_path / "data")


@pytest.fixture
def db(folder: str) -> Iterator[Database]:
    database = Database(folder, "s1")
    yield database
    database.close()


def one(db: Database, op: Any) -> Any:
    [result] = db.run_batch([op])
    return result


def msg(
    seq: int,
    *,
    sender: tuple[str, str] = ("ann", ANN),
    to: tuple[str, str] = ("bob", BOB),
    text: str = "hi",
    req_id: Any = None,
) -> StoredMessage:
    return StoredMessage(f"s1:x:{seq}", sender[0], to[0], text, T0 + seq, req_id, sender[1], to[1])


def insert(db: Database, seq: int, **kw: Any) -> Inserted:
    return one(db, InsertMessage(msg(seq, **kw), seq, 0))  # type: ignore[no-any-return]


def backlog(db: Database, uid: str) -> Backlog:
    found = one(db, LoadBacklog(uid))
    assert isinstance(found, Backlog)
    return found


def pending(db: Database, uid: str) -> list[str]:
    return [m.msg for m in backlog(db, uid).messages]


def record(uid: str, name: str, origin: str = "s1", oseq: int = 1) -> AccountRecord:
    return AccountRecord(uid, name, f"scrypt${name}", T0 + oseq, origin, oseq)


# --- what is stored ---------------------------------------------------------------------


def test_a_message_is_stored_with_both_identities(db: Database) -> None:
    sent = msg(1, sender=("ann", GUEST_ANN), text="from a guest", req_id={"n": 1})
    assert one(db, InsertMessage(sent, 1, 0)) == Inserted(sent, duplicate=False)
    [got] = backlog(db, BOB).messages
    # All but the request id (the sender's own business) comes back as stored.
    assert got == StoredMessage(
        "s1:x:1", "ann", "bob", "from a guest", T0 + 1, None, GUEST_ANN, BOB
    )


def test_account_records_are_stored_whole_and_once(db: Database) -> None:
    mine = record(ANN, "ann")
    assert one(db, CreateAccount(mine)) is True
    learned = [record(BOB, "bob", "s2", 1), record("c0c0c0c0c0c0c0c3", "Cy", "s2", 2)]
    assert one(db, AddAccounts([*learned, mine])) is None  # the known one is skipped
    one(db, AddAccounts(learned))  # learned again from another peer: nothing changes
    assert sorted(db.accounts(), key=lambda r: r.uid) == sorted(
        [mine, *learned], key=lambda r: r.uid
    )
    assert one(db, CreateAccount(mine)) is False


# --- the backlog: what this server owes each identity -----------------------------------


def test_the_backlog_is_by_recipient_identity_in_the_order_stored(db: Database) -> None:
    # Stored out of order in separate batches: seq (this server's order) decides.
    for seq in (3, 1, 5, 2):
        insert(db, seq, text=f"t{seq}")
    insert(db, 4, to=("bob", "g.s1.boot.2000"))  # a guest named bob: someone else
    insert(db, 6, to=("ann", ANN))
    assert pending(db, BOB) == ["s1:x:1", "s1:x:2", "s1:x:3", "s1:x:5"]
    assert pending(db, "g.s1.boot.2000") == ["s1:x:4"]
    assert pending(db, ANN) == ["s1:x:6"]
    assert pending(db, "nobody") == []


def test_a_delivered_message_is_no_longer_owed(db: Database) -> None:
    for seq in (1, 2, 3):
        insert(db, seq)
    assert one(db, MarkReceipt("s1:x:2", BOB, "delivered", T0 + 10)) == ("ann", ANN)
    assert pending(db, BOB) == ["s1:x:1", "s1:x:3"]
    assert one(db, MarkReceipt("s1:x:3", BOB, "read", T0 + 11)) == ("ann", ANN)
    assert pending(db, BOB) == ["s1:x:1"]


def test_a_receipt_from_anyone_but_the_recipient_changes_nothing(db: Database) -> None:
    insert(db, 1)
    for who in (ANN, GUEST_ANN, "g.s2.boot.7", "b00b00b00b00b00X", ""):
        assert one(db, MarkReceipt("s1:x:1", who, "delivered", T0)) is None
        assert one(db, MarkReceipt("s1:x:1", who, "read", T0)) is None
    assert pending(db, BOB) == ["s1:x:1"]
    # The recipient's own receipt is still news afterwards.
    assert one(db, MarkReceipt("s1:x:1", BOB, "read", T0)) == ("ann", ANN)


def test_more_than_max_backlog_is_offered_over_several_logins(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database_module, "MAX_BACKLOG", 3)
    for seq in range(1, 8):
        insert(db, seq)
    first = pending(db, BOB)
    assert first == ["s1:x:1", "s1:x:2", "s1:x:3"]
    db.run_batch([MarkReceipt(m, BOB, "delivered", T0) for m in first])
    assert pending(db, BOB) == ["s1:x:4", "s1:x:5", "s1:x:6"]


def test_a_guest_sessions_backlog_is_dropped_and_no_one_elses(db: Database) -> None:
    insert(db, 1, to=("ann", GUEST_ANN))
    insert(db, 2, to=("ann", ANN))  # the account that goes by ann now
    one(db, DiscardBacklog(GUEST_ANN, T0 + 5))
    assert pending(db, GUEST_ANN) == []
    assert pending(db, ANN) == ["s1:x:2"]
    # Dropped counts as delivered for nobody: no receipt is news for it later.
    assert one(db, MarkReceipt("s1:x:1", GUEST_ANN, "delivered", T0 + 6)) is None


# --- resends ----------------------------------------------------------------------------


def test_a_resend_is_recognised_by_the_senders_identity(db: Database) -> None:
    first = insert(db, 1, sender=("ann", GUEST_ANN), req_id=7, text="same")
    again = insert(db, 2, sender=("ann", GUEST_ANN), req_id=7, text="same")
    assert (again.duplicate, again.message.msg) == (True, first.message.msg)
    # Another guest session of the name, same id and text: another person's message.
    other = insert(db, 3, sender=("ann", "g.s1.boot.5000"), req_id=7, text="same")
    assert (other.duplicate, other.message.msg) == (False, "s1:x:3")
    # The account named ann, too.
    account = insert(db, 4, sender=("ann", ANN), req_id=7, text="same")
    assert account.duplicate is False
    assert pending(db, BOB) == ["s1:x:1", "s1:x:3", "s1:x:4"]


def test_a_resend_to_another_identity_of_the_same_name_is_a_new_message(db: Database) -> None:
    insert(db, 1, req_id=1, to=("bob", BOB))
    again = insert(db, 2, req_id=1, to=("bob", "g.s1.boot.9"))
    assert again.duplicate is False


# --- receipts owed to a sender who was away ---------------------------------------------


def test_receipts_owed_come_with_the_senders_backlog_until_told(db: Database) -> None:
    insert(db, 1)  # ann -> bob
    insert(db, 2)
    one(db, MarkReceipt("s1:x:1", BOB, "delivered", T0 + 10))
    one(db, MarkReceipt("s1:x:2", BOB, "read", T0 + 20))
    # ann was online nowhere: the receipts are kept for her.
    one(db, MarkReceiptsOwed([("s1:x:1", 1), ("s1:x:2", 2)], owed=True))
    expected = [
        OwedReceipt("s1:x:1", "delivered", "bob", T0 + 10, 1),
        OwedReceipt("s1:x:2", "read", "bob", T0 + 20, 2),
    ]
    assert backlog(db, ANN).receipts == expected
    assert backlog(db, ANN).receipts == expected  # loading is not telling
    assert backlog(db, BOB).receipts == []  # they are ann's, not bob's
    assert backlog(db, GUEST_ANN).receipts == []
    one(db, MarkReceiptsOwed([("s1:x:1", 1)], owed=False))  # told
    assert backlog(db, ANN).receipts == expected[1:]
    one(db, MarkReceiptsOwed([("s1:x:2", 2)], owed=False))
    assert backlog(db, ANN) == Backlog()


def test_both_receipts_of_one_message_may_be_owed(db: Database) -> None:
    insert(db, 1)
    one(db, MarkReceipt("s1:x:1", BOB, "delivered", T0 + 1))
    one(db, MarkReceiptsOwed([("s1:x:1", 1)], owed=True))
    one(db, MarkReceipt("s1:x:1", BOB, "read", T0 + 2))
    one(db, MarkReceiptsOwed([("s1:x:1", 2)], owed=True))
    assert [(r.status, r.ts) for r in backlog(db, ANN).receipts] == [
        ("delivered", T0 + 1),
        ("read", T0 + 2),
    ]
    one(db, MarkReceiptsOwed([("s1:x:1", 2)], owed=False))  # clearing one keeps the other
    assert [r.status for r in backlog(db, ANN).receipts] == ["delivered"]


def test_an_owed_bit_for_what_never_happened_is_not_a_receipt(db: Database) -> None:
    insert(db, 1)
    one(db, MarkReceiptsOwed([("s1:x:1", 3)], owed=True))  # neither delivered nor read yet
    assert backlog(db, ANN).receipts == []


# --- receipts kept for servers that are not linked --------------------------------------


def peer_receipt(n: int, status: str = "delivered", uid: str = BOB) -> PeerReceipt:
    return PeerReceipt(f"s2:y:{n}", status, "bob", T0 + n, uid)


def test_receipts_kept_for_a_server_are_taken_once(db: Database) -> None:
    kept = [peer_receipt(1), peer_receipt(1, "read"), peer_receipt(2)]
    assert db.run_batch([KeepForPeer("s2", r) for r in kept]) == [True, True, True]
    one(db, KeepForPeer("s3", peer_receipt(9)))
    one(db, KeepForPeer("s2", peer_receipt(1)))  # the same receipt again: kept once
    taken = one(db, TakeKeptForPeer("s2"))
    assert sorted(taken, key=lambda r: (r.msg, r.status)) == kept
    assert one(db, TakeKeptForPeer("s2")) == []  # taken means deleted
    assert one(db, TakeKeptForPeer("s3")) == [peer_receipt(9)]  # each server its own


def test_receipts_kept_for_peers_are_bounded(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(database_module, "MAX_KEPT_FOR_PEERS", 3)
    results = db.run_batch([KeepForPeer("s2", peer_receipt(n)) for n in range(1, 6)])
    assert results == [True, True, True, False, False]
    assert len(one(db, TakeKeptForPeer("s2"))) == 3
    assert one(db, KeepForPeer("s3", peer_receipt(7))) is True  # room again once taken


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["keep", "take"]), st.sampled_from(["s2", "s3"]), st.integers(1, 4)
        ),
        max_size=25,
    )
)
def test_what_is_taken_for_a_server_is_what_was_kept_for_it_since(
    ops: list[tuple[str, str, int]],
) -> None:
    model: dict[str, dict[str, PeerReceipt]] = {"s2": {}, "s3": {}}
    with tempfile.TemporaryDirectory() as folder:
        database = Database(folder, "s1")
        try:
            for kind, server, n in ops:
                if kind == "keep":
                    r = peer_receipt(n)
                    assert one(database, KeepForPeer(server, r)) is True
                    model[server][r.msg] = r
                else:
                    taken = one(database, TakeKeptForPeer(server))
                    assert sorted(taken, key=lambda r: r.msg) == sorted(
                        model[server].values(), key=lambda r: r.msg
                    )
                    model[server] = {}
        finally:
            database.close()


# --- what survives closing and reopening ------------------------------------------------


def test_everything_owed_survives_reopening(folder: str) -> None:
    first = Database(folder, "s1")
    ann, bob = record(ANN, "ann"), record(BOB, "bob", "s2", 1)
    first.run_batch(
        [
            CreateAccount(ann),
            AddAccounts([bob]),
            SaveLastSeen(ANN, T0 + 99),
            InsertMessage(msg(1), 1, 0),  # ann -> bob, delivered, receipt owed to ann
            InsertMessage(msg(2), 2, 0),  # ann -> bob, still owed to bob
            InsertMessage(msg(3, sender=("ann", GUEST_ANN), req_id="r"), 3, 0),
            MarkReceipt("s1:x:1", BOB, "delivered", T0 + 50),
            MarkReceiptsOwed([("s1:x:1", 1)], owed=True),
            KeepForPeer("s2", peer_receipt(4, "read")),
        ]
    )
    first.close()  # or killed: every batch is committed when run_batch returns

    again = Database(folder, "s1")
    try:
        assert sorted(again.accounts(), key=lambda r: r.uid) == [ann, bob]
        assert again.last_seen() == {ANN: T0 + 99}
        assert again.next_seq() == 4
        assert pending(again, BOB) == ["s1:x:2", "s1:x:3"]
        assert backlog(again, ANN).receipts == [
            OwedReceipt("s1:x:1", "delivered", "bob", T0 + 50, 1)
        ]
        assert one(again, TakeKeptForPeer("s2")) == [peer_receipt(4, "read")]
        # The resend window holds across a restart: the client retries after reconnecting.
        resend = msg(4, sender=("ann", GUEST_ANN), req_id="r")
        result = one(again, InsertMessage(resend, 4, 0))
        assert (result.duplicate, result.message.msg) == (True, "s1:x:3")
    finally:
        again.close()
    third = Database(folder, "s1")
    try:
        assert one(third, TakeKeptForPeer("s2")) == []  # taken before the restart: gone
        assert third.next_seq() == 4
    finally:
        third.close()


def test_a_batch_that_fails_keeps_nothing_owed(db: Database) -> None:
    insert(db, 1)
    with pytest.raises(database_module.StoreError):
        db.run_batch(
            [
                KeepForPeer("s2", peer_receipt(1)),
                MarkReceipt("s1:x:1", BOB, "delivered", T0),
                InsertMessage(msg(1, text="the same seq"), 1, 0),
            ]
        )
    assert one(db, TakeKeptForPeer("s2")) == []
    assert pending(db, BOB) == ["s1:x:1"]
