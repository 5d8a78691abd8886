"""Hub: who is online, and what each login, request and storage report makes happen."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from trichat import errors, messages
from trichat.accounts import AccountRecord
from trichat.effects import OwedReceipt
from trichat.errors import ProtocolError
from trichat.hub import (
    AfterStored,
    Backlog,
    Close,
    Deliver,
    DropBacklog,
    Effect,
    FetchBacklog,
    Hub,
    OweReceipts,
    ReceiptsTold,
    Reply,
    SaveLastSeen,
    StoredMessage,
    StoreMessage,
    StoreReceipt,
)
from trichat.messages import Message, Presence, Sent, UserEntry, Welcome

T0 = 1_700_000_000_000
ALICE = AccountRecord("a11ce00000000001", "Alice", "hash-a", T0 - 9000, "s1", 1)
DORA = AccountRecord("d0da000000000002", "dora", "hash-d", T0 - 8000, "s1", 2)


def make_hub(**kwargs: Any) -> Hub:
    kwargs.setdefault("accounts", [ALICE, DORA])
    kwargs.setdefault("last_seen", {DORA.uid: 123})
    return Hub("s1", incarnation="inc", **kwargs)


def login(hub: Hub, conn: int, name: str, *, auto_ack: bool = False, now: int = T0) -> list[Effect]:
    """Log in as the shell does: an account (its password taken as right), else a guest."""
    password = "pw" if hub.is_account(name) else None
    candidates = hub.check_login(name, password)
    uid = candidates[0].uid if candidates else None
    return hub.login(conn, name, auto_ack=auto_ack, now=now, req_id=f"login{conn}", uid=uid)


def ready(hub: Hub, conn: int, name: str, *, auto_ack: bool = False) -> None:
    """Log in and, for an account, finish loading an empty backlog."""
    login(hub, conn, name, auto_ack=auto_ack)
    hub.backlog_loaded(conn, Backlog())


def register(hub: Hub, name: str, uid: str, now: int = T0) -> AccountRecord:
    """Register ``name`` on a hub with no linked peers (nothing to wait for)."""
    reg, effects = hub.begin_register(name, now)
    assert effects == [] and reg.settled
    record = hub.make_account(reg, uid, "hash")
    hub.account_stored(reg, record)
    return record


def uid_of(hub: Hub, conn: int) -> str:
    return hub.conns[conn].uid


def error_code(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ProtocolError) as info:
        fn(*args, **kwargs)
    return info.value.code


def send(
    hub: Hub, conn: int, to: str, text: str = "hi", now: int = T0, req_id: Any = "q"
) -> StoreMessage:
    [effect] = hub.handle(conn, messages.SendRequest(to, text), req_id, now)
    assert isinstance(effect, StoreMessage)
    return effect


def stored(hub: Hub, effect: StoreMessage, *, duplicate: bool = False) -> list[Effect]:
    return hub.message_stored(effect.message, effect.conn, effect.req_id, duplicate=duplicate)


def deliveries(effects: list[Effect]) -> list[tuple[list[int], messages.Event]]:
    return [(e.conns, e.event) for e in effects if isinstance(e, Deliver)]


def broadcast(hub: Hub, conn: int, text: str = "b", req_id: Any = None) -> list[Effect]:
    """A broadcast's effects: all of them wait behind what storage already has queued."""
    [later] = hub.handle(conn, messages.BroadcastRequest(text), req_id, T0)
    assert isinstance(later, AfterStored) and later.conn == conn
    return later.effects


# --- login and presence ---------------------------------------------------------------


def test_a_guest_is_welcomed_with_the_users_list() -> None:
    hub = make_hub()
    assert login(hub, 1, "ann")[0] == Reply(
        1, Welcome("ann", "s1", [UserEntry("ann", True, "s1")]), "login1"
    )
    effects = login(hub, 2, "bob")
    welcome = effects[0]
    assert isinstance(welcome, Reply) and welcome.conn == 2 and welcome.req_id == "login2"
    assert welcome.event == Welcome(
        "bob", "s1", [UserEntry("ann", True, "s1"), UserEntry("bob", True, "s1")]
    )
    presence = Presence("bob", True, server="s1", servers=["s1"])
    assert deliveries(effects) == [([1], presence)]
    assert not any(isinstance(e, FetchBacklog) for e in effects)  # guests have no backlog


def test_a_guest_leaving_is_offline_for_everyone_else() -> None:
    hub = make_hub()
    login(hub, 1, "ann")
    login(hub, 2, "bob")
    login(hub, 3, "cat")
    bob = uid_of(hub, 2)
    effects = hub.disconnect(2, T0 + 5)
    # What the guest session left unacknowledged is dropped first (protocol.md "Guests"),
    # then everyone else hears it is gone.
    assert effects == [
        DropBacklog(bob, T0 + 5),
        Deliver([1, 3], Presence("bob", False, last_seen=T0 + 5)),
    ]
    assert set(hub.online) == {"ann", "cat"}
    assert hub.disconnect(2, T0 + 6) == []  # twice is harmless
    assert hub.disconnect(99, T0) == []  # never logged in


def test_a_guest_name_in_use_is_taken_ignoring_case() -> None:
    hub = make_hub()
    login(hub, 1, "Ann")
    assert error_code(hub.check_login, "aNN", None) == errors.NAME_TAKEN
    assert error_code(hub.login, 2, "ANN", auto_ack=False, now=T0, req_id=None) == "name_taken"
    assert error_code(hub.begin_register, "ann", T0) == errors.NAME_TAKEN
    hub.disconnect(1, T0)
    assert hub.check_login("ann", None) == []  # free again once gone: a guest login


@pytest.mark.parametrize("name", ["", "a" * 33, "two words", "bob!", "caf\u00e9", "a/b", "ann\n"])
def test_bad_names_are_refused(name: str) -> None:
    hub = make_hub()
    assert error_code(hub.check_login, name, None) == errors.BAD_NAME
    assert error_code(hub.begin_register, name, T0) == errors.BAD_NAME


@pytest.mark.parametrize("name", ["a", "a" * 32, "A.b-c_9", "-", "..."])
def test_good_names_are_accepted(name: str) -> None:
    assert make_hub().check_login(name, None) == []


def test_accounts_need_their_password_and_guests_must_not_give_one() -> None:
    hub = make_hub()
    assert hub.check_login("ALICE", "pw") == [ALICE]  # the password is checked against it
    assert error_code(hub.check_login, "alice", None) == errors.AUTH_FAILED
    assert error_code(hub.check_login, "nobody", "pw") == errors.AUTH_FAILED
    assert error_code(hub.begin_register, "Alice", T0) == errors.NAME_TAKEN
    zed = register(hub, "Zed", "2ed0000000000003")
    assert (zed.name, zed.origin, zed.oseq) == ("Zed", "s1", 3)  # the next of this server's
    assert hub.is_account("zed")
    assert hub.check_login("ZED", "pw") == [zed]
    assert error_code(hub.check_login, "zed", None) == errors.AUTH_FAILED
    assert error_code(hub.begin_register, "ZED", T0) == errors.NAME_TAKEN


def test_a_name_being_registered_is_held_until_the_registration_ends() -> None:
    hub = make_hub()
    reg, _ = hub.begin_register("Bob", T0)
    assert error_code(hub.check_login, "bob", None) == errors.NAME_TAKEN  # no guest gets it
    assert error_code(hub.begin_register, "BOB", T0) == errors.NAME_TAKEN
    assert hub.abort_register(reg) == []  # no peers to tell
    assert hub.check_login("bob", None) == []  # free again
    assert not hub.is_account("bob")


def test_an_account_logs_in_under_its_own_spelling_and_loads_its_backlog() -> None:
    hub = make_hub()
    login(hub, 7, "ann")
    effects = login(hub, 1, "ALICE")
    assert effects[0].event.user == "Alice"  # type: ignore[union-attr]
    assert uid_of(hub, 1) == ALICE.uid
    assert FetchBacklog(1, ALICE.uid) in effects
    assert deliveries(effects) == [([7], Presence("Alice", True, server="s1", servers=["s1"]))]


def test_each_guest_session_is_its_own_identity() -> None:
    hub = make_hub()
    login(hub, 1, "bob", now=T0)
    first = uid_of(hub, 1)
    hub.disconnect(1, T0)
    login(hub, 3, "bob", now=T0)  # the same name, the same millisecond: another person
    second = uid_of(hub, 3)
    assert first != second
    assert first.startswith("g.s1.inc.") and second.startswith("g.s1.inc.")


def test_a_message_for_a_guest_who_left_never_reaches_a_later_guest_of_that_name() -> None:
    hub = make_hub()
    ready(hub, 1, "ann")
    ready(hub, 2, "bob")
    effect = send(hub, 1, "bob", "for the first bob")
    assert effect.message.to_uid == uid_of(hub, 2)
    hub.disconnect(2, T0)
    ready(hub, 3, "bob")  # another person takes the free guest name
    assert deliveries(stored(hub, effect)) == []


def test_an_account_on_several_devices_is_one_user_online() -> None:
    hub = make_hub()
    login(hub, 9, "ann")
    login(hub, 1, "alice")
    effects = login(hub, 2, "Alice")
    assert deliveries(effects) == []  # already online: no presence news
    assert hub.online["alice"].conns == {1, 2}
    assert hub.disconnect(1, T0 + 1) == []  # still online on the other device
    assert hub.disconnect(2, T0 + 2) == [
        SaveLastSeen(ALICE.uid, T0 + 2),
        Deliver([9], Presence("Alice", False, last_seen=T0 + 2)),
    ]
    status = hub.handle(9, messages.StatusRequest("alice"), "s", T0 + 3)
    assert status == [Reply(9, messages.Status("Alice", False, last_seen=T0 + 2), "s")]


# --- private messages -----------------------------------------------------------------


def test_send_to_an_online_user_is_stored_then_sent_and_delivered() -> None:
    hub = make_hub()
    ready(hub, 1, "ann")
    ready(hub, 2, "bob")
    effect = send(hub, 1, "BOB", "hello", req_id="r1")
    m = effect.message
    assert (m.sender, m.to, m.text, m.ts, m.req_id) == ("ann", "bob", "hello", T0, "r1")
    assert (m.sender_uid, m.to_uid) == (uid_of(hub, 1), uid_of(hub, 2))
    assert (effect.conn, effect.req_id) == (1, "r1")
    assert stored(hub, effect) == [
        Reply(1, Sent(m.msg, T0), "r1"),
        Deliver([2], Message(m.msg, "ann", "bob", "hello", T0)),
    ]


def test_a_message_reaches_every_connection_of_the_recipient_and_none_of_the_sender() -> None:
    hub = make_hub()
    ready(hub, 1, "dora")
    ready(hub, 4, "dora")  # the sender's other device gets no copy
    ready(hub, 2, "alice")
    ready(hub, 3, "alice")
    effect = send(hub, 1, "alice")
    assert deliveries(stored(hub, effect)) == [([2, 3], effect.message.as_event())]


def test_a_resend_that_storage_found_to_be_a_duplicate_is_only_acknowledged() -> None:
    hub = make_hub()
    ready(hub, 1, "ann")
    ready(hub, 2, "bob")
    effect = send(hub, 1, "bob")
    assert stored(hub, effect, duplicate=True) == [Reply(1, Sent(effect.message.msg, T0), "q")]


def test_the_sender_leaving_before_storage_answers_still_gets_the_message_delivered() -> None:
    hub = make_hub()
    ready(hub, 1, "ann")
    ready(hub, 2, "bob")
    effect = send(hub, 1, "bob")
    hub.disconnect(1, T0)
    assert stored(hub, effect) == [Deliver([2], effect.message.as_event())]


def test_send_to_an_offline_account_is_stored_for_later() -> None:
    hub = make_hub()
    ready(hub, 1, "ann")
    effect = send(hub, 1, "DORA")
    assert (effect.message.to, effect.message.to_uid) == ("dora", DORA.uid)
    assert stored(hub, effect) == [Reply(1, Sent(effect.message.msg, T0), "q")]


def test_send_to_a_gone_guest_is_offline_and_to_nobody_is_no_such_user() -> None:
    hub = make_hub()
    ready(hub, 1, "ann")
    ready(hub, 2, "bob")
    hub.disconnect(2, T0)
    for to, code in [
        ("bob", errors.OFFLINE),
        ("BOB", errors.OFFLINE),
        ("zed", errors.NO_SUCH_USER),
        ("not a name", errors.NO_SUCH_USER),
        ("", errors.NO_SUCH_USER),
        ("*", errors.NO_SUCH_USER),
    ]:
        assert error_code(hub.handle, 1, messages.SendRequest(to, "hi"), None, T0) == code, to


def test_forgotten_guests_become_no_such_user() -> None:
    hub = make_hub(remembered_guests=2)
    ready(hub, 1, "ann")
    for conn, name in [(2, "g1"), (3, "g2"), (4, "g3")]:
        ready(hub, conn, name)
        hub.disconnect(conn, T0)
    assert error_code(hub.handle, 1, messages.SendRequest("g1", "x"), None, T0) == "no_such_user"
    assert error_code(hub.handle, 1, messages.SendRequest("g3", "x"), None, T0) == "offline"


def test_a_registered_former_guest_name_receives_stored_messages() -> None:
    hub = make_hub()
    ready(hub, 1, "ann")
    ready(hub, 2, "bob")
    hub.disconnect(2, T0)
    bob = register(hub, "Bob", "b0b0000000000009")
    m = send(hub, 1, "bob").message
    assert (m.to, m.to_uid) == ("Bob", bob.uid)


@pytest.mark.parametrize("size", [4096, 4097])
def test_text_limit(size: int) -> None:
    hub = make_hub()
    ready(hub, 1, "ann")
    ready(hub, 2, "bob")
    text = "\u00e9" * size  # characters, not bytes
    for request in (messages.SendRequest("bob", text), messages.BroadcastRequest(text)):
        if size <= 4096:
            assert hub.handle(1, request, None, T0)
        else:
            assert error_code(hub.handle, 1, request, None, T0) == errors.TEXT_TOO_LONG


def test_send_to_yourself_reaches_all_your_connections() -> None:
    hub = make_hub()
    ready(hub, 1, "alice")
    ready(hub, 2, "alice")
    effect = send(hub, 1, "alice")
    assert deliveries(stored(hub, effect)) == [([1, 2], effect.message.as_event())]


# --- broadcast, typing, receipts --------------------------------------------------------


def test_broadcast_reaches_everyone_but_the_sending_connection() -> None:
    hub = make_hub()
    ready(hub, 1, "alice")
    ready(hub, 2, "alice")
    ready(hub, 3, "bob")
    login(hub, 4, "dora")  # backlog still loading: broadcasts are live only, so it gets it
    [reply, deliver] = broadcast(hub, 1, "hey all", req_id="b1")
    assert isinstance(reply, Reply) and isinstance(reply.event, Sent)
    msg = reply.event.msg
    assert reply == Reply(1, Sent(msg, T0), "b1")
    assert deliver == Deliver([2, 3, 4], Message(msg, "Alice", "*", "hey all", T0))


def test_a_broadcast_is_carried_out_behind_the_senders_private_messages() -> None:
    # protocol.md "Order": the shell runs AfterStored effects once everything queued to
    # storage before them is stored. A model of that shell: one queue, answered in order.
    hub = make_hub()
    ready(hub, 1, "ann")
    ready(hub, 2, "bob")
    queue: list[Effect] = []
    queue += hub.handle(1, messages.SendRequest("bob", "private first"), "p", T0)
    queue += hub.handle(1, messages.BroadcastRequest("then to all"), "b", T0)
    assert [type(e) for e in queue] == [StoreMessage, AfterStored]
    seen: dict[int, list[messages.Event]] = {1: [], 2: []}
    for effect in queue:
        if isinstance(effect, StoreMessage):
            done = stored(hub, effect)
        else:
            assert isinstance(effect, AfterStored)
            done = effect.effects
        for e in done:
            if isinstance(e, Reply):
                seen[e.conn].append(e.event)
            elif isinstance(e, Deliver):
                for c in e.conns:
                    seen[c].append(e.event)
    assert [type(e).__name__ for e in seen[1]] == ["Sent", "Sent"]
    assert [(e.to, e.text) for e in seen[2]] == [  # type: ignore[attr-defined]
        ("bob", "private first"),
        ("*", "then to all"),
    ]


def test_a_broadcast_with_nobody_else_online_is_still_sent() -> None:
    hub = make_hub()
    ready(hub, 1, "ann")
    [reply, deliver] = broadcast(hub, 1, "anyone?", req_id=4)
    assert isinstance(reply, Reply) and reply.req_id == 4
    assert isinstance(reply.event, Sent) and reply.event.ts == T0
    assert deliver == Deliver([], Message(reply.event.msg, "ann", "*", "anyone?", T0))


def test_typing_goes_to_every_connection_of_the_target_only() -> None:
    hub = make_hub()
    ready(hub, 1, "ann")
    ready(hub, 2, "alice")
    ready(hub, 3, "alice")
    ready(hub, 4, "bob")
    assert hub.handle(1, messages.TypingRequest("ALICE"), None, T0) == [
        Deliver([2, 3], messages.Typing("ann"))
    ]
    assert hub.handle(1, messages.TypingRequest("nobody"), None, T0) == []


def test_received_and_read_become_receipts_by_the_reader() -> None:
    hub = make_hub()
    ready(hub, 1, "alice")
    assert hub.handle(1, messages.ReceivedRequest("s1:inc:7"), None, T0) == [
        StoreReceipt("s1:inc:7", "Alice", "delivered", T0, ALICE.uid)
    ]
    assert hub.handle(1, messages.ReadRequest("s1:inc:7"), None, T0 + 1) == [
        StoreReceipt("s1:inc:7", "Alice", "read", T0 + 1, ALICE.uid)
    ]
    # An id this server never gave out (no message here has it): silently ignored.
    assert hub.handle(1, messages.ReceivedRequest("m1"), None, T0) == []


def test_a_stored_receipt_is_told_to_every_connection_of_the_sender() -> None:
    hub = make_hub()
    ready(hub, 1, "ann")
    ready(hub, 2, "alice")
    ready(hub, 3, "alice")
    assert hub.receipt_stored("m1", "Alice", ALICE.uid, "ann", "read", T0) == [
        Deliver([2, 3], messages.Receipt("m1", "read", "ann", T0))
    ]


def test_a_receipt_for_an_account_online_nowhere_is_kept_for_its_next_login() -> None:
    hub = make_hub()
    ready(hub, 1, "ann")
    assert hub.receipt_stored("m1", "dora", DORA.uid, "ann", "read", T0) == [
        OweReceipts([("m1", 2)])
    ]
    assert hub.receipt_stored("m2", "dora", DORA.uid, "ann", "delivered", T0) == [
        OweReceipts([("m2", 1)])
    ]
    # A guest session that left is nobody's to keep it for.
    assert hub.receipt_stored("m3", "gus", "g.s1.inc.5", "ann", "read", T0) == []


def test_receipts_kept_for_an_account_come_with_its_backlog_and_are_then_forgotten() -> None:
    hub = make_hub()
    login(hub, 1, "dora")
    owed = [
        OwedReceipt("s1:inc:1", "delivered", "ann", T0 + 1, 1),
        OwedReceipt("s1:inc:1", "read", "ann", T0 + 2, 2),
    ]
    effects = hub.backlog_loaded(1, Backlog([], owed))
    assert effects == [
        Deliver([1], messages.Receipt("s1:inc:1", "delivered", "ann", T0 + 1)),
        Deliver([1], messages.Receipt("s1:inc:1", "read", "ann", T0 + 2)),
        ReceiptsTold([("s1:inc:1", 1), ("s1:inc:1", 2)]),
    ]


def test_a_receipt_is_told_only_to_the_identity_that_sent_the_message() -> None:
    # Two guest sessions of one name, one after the other, are two people.
    hub = make_hub()
    ready(hub, 1, "gus")
    old = uid_of(hub, 1)
    hub.disconnect(1, T0)
    ready(hub, 2, "gus")
    assert hub.receipt_stored("m1", "gus", old, "ann", "read", T0) == []


def test_text_mode_connections_acknowledge_what_they_show() -> None:
    hub = make_hub()
    ready(hub, 1, "ann")
    ready(hub, 2, "bob", auto_ack=True)
    ready(hub, 3, "cat")
    text_effect = send(hub, 1, "bob")
    m = text_effect.message
    assert StoreReceipt(m.msg, "bob", "delivered", m.ts, m.to_uid) in stored(hub, text_effect)
    json_effect = send(hub, 1, "cat")
    assert not any(isinstance(e, StoreReceipt) for e in stored(hub, json_effect))


def test_automatic_receipts_carry_the_time_shown_when_given() -> None:
    hub = make_hub()
    ready(hub, 1, "ann")
    ready(hub, 2, "bob", auto_ack=True)
    effect = send(hub, 1, "bob", now=T0)
    m = effect.message
    effects = hub.message_stored(m, 1, "q", duplicate=False, now=T0 + 250)
    assert [e for e in effects if isinstance(e, StoreReceipt)] == [
        StoreReceipt(m.msg, "bob", "delivered", T0 + 250, m.to_uid)
    ]
    # Without a time, the message's own ts (older callers).
    effect = send(hub, 1, "bob", now=T0 + 1)
    effects = hub.message_stored(effect.message, 1, "q", duplicate=False)
    assert StoreReceipt(effect.message.msg, "bob", "delivered", T0 + 1, uid_of(hub, 2)) in effects


def test_a_backlog_shown_in_text_mode_is_acknowledged_at_the_time_shown() -> None:
    hub = make_hub()
    login(hub, 1, "alice", auto_ack=True)
    batch = [old_message(1), old_message(2)]
    effects = hub.backlog_loaded(1, Backlog(batch), now=T0 + 99)
    assert [e for e in effects if isinstance(e, StoreReceipt)] == [
        StoreReceipt("old:1", "Alice", "delivered", T0 + 99, ALICE.uid),
        StoreReceipt("old:2", "Alice", "delivered", T0 + 99, ALICE.uid),
    ]
    # JSON connections acknowledge themselves: no receipt, whatever the time.
    login(hub, 2, "alice")
    effects = hub.backlog_loaded(2, Backlog(batch), now=T0 + 100)
    assert not any(isinstance(e, StoreReceipt) for e in effects)


def test_only_a_guests_last_leaving_drops_its_backlog_and_accounts_never() -> None:
    hub = make_hub()
    ready(hub, 1, "ann")
    ready(hub, 2, "alice")
    ready(hub, 3, "alice")
    ready(hub, 4, "Gus")
    gus = uid_of(hub, 4)
    assert hub.disconnect(2, T0 + 1) == []
    assert not any(isinstance(e, DropBacklog) for e in hub.disconnect(3, T0 + 2))
    assert hub.disconnect(4, T0 + 3)[0] == DropBacklog(gus, T0 + 3)  # that session's only


def test_a_guest_that_takes_the_name_while_it_is_being_registered_gets_none_of_its_mail() -> None:
    hub = make_hub()
    ready(hub, 1, "ann")
    reg, _ = hub.begin_register("bob", T0)  # held while the password is hashed and stored
    # Meanwhile a guest tries to log in as bob: refused, however it gets there.
    assert error_code(hub.check_login, "bob", None) == errors.NAME_TAKEN
    assert error_code(hub.login, 2, "bob", auto_ack=False, now=T0, req_id=None) == "name_taken"
    bob = hub.make_account(reg, "b0b0000000000009", "hash")
    hub.account_stored(reg, bob)  # CreateAccount is stored
    assert error_code(hub.check_login, "bob", None) == errors.AUTH_FAILED  # an account now
    hub.login(3, "bob", auto_ack=False, now=T0, req_id="r", uid=bob.uid)
    hub.backlog_loaded(3, Backlog())
    mail = send(hub, 1, "bob", "for the account only")
    assert mail.message.to_uid == bob.uid
    assert deliveries(stored(hub, mail)) == [([3], mail.message.as_event())]


def test_logout_closes_the_connection() -> None:
    hub = make_hub()
    ready(hub, 1, "ann")
    [effect] = hub.handle(1, messages.LogoutRequest(), None, T0)
    assert isinstance(effect, Close) and effect.conn == 1 and effect.bye.reason == "logout"


# --- backlog ordering -------------------------------------------------------------------


def old_message(n: int, to: AccountRecord = ALICE) -> StoredMessage:
    ts = T0 - 1000 + n
    return StoredMessage(f"old:{n}", "ann", to.name, f"old {n}", ts, None, "g.s1.x.1", to.uid)


def test_messages_stored_while_the_backlog_loads_come_with_it_in_order() -> None:
    hub = make_hub()
    ready(hub, 1, "ann")
    login(hub, 2, "alice")
    live = send(hub, 1, "alice", "while loading")
    effects = stored(hub, live)
    assert deliveries(effects) == []  # not live: the backlog load sees it
    assert Reply(1, Sent(live.message.msg, T0), "q") in effects
    backlog = [old_message(1), old_message(2), live.message]
    assert deliveries(hub.backlog_loaded(2, Backlog(backlog))) == [
        ([2], m.as_event()) for m in backlog
    ]
    after = send(hub, 1, "alice", "after")
    assert deliveries(stored(hub, after)) == [([2], after.message.as_event())]


def test_a_second_device_gets_live_messages_only_after_its_backlog() -> None:
    hub = make_hub()
    ready(hub, 1, "ann")
    ready(hub, 2, "alice")
    login(hub, 3, "alice")
    effect = send(hub, 1, "alice")
    assert deliveries(stored(hub, effect)) == [([2], effect.message.as_event())]
    effects = hub.backlog_loaded(3, Backlog([effect.message]))
    assert deliveries(effects) == [([3], effect.message.as_event())]
    effect = send(hub, 1, "alice")
    assert deliveries(stored(hub, effect)) == [([2, 3], effect.message.as_event())]


def test_a_backlog_for_a_connection_that_left_is_dropped() -> None:
    hub = make_hub()
    login(hub, 1, "alice")
    hub.disconnect(1, T0)
    assert hub.backlog_loaded(1, Backlog([old_message(1)])) == []


def test_a_text_mode_backlog_is_acknowledged_message_by_message() -> None:
    hub = make_hub()
    login(hub, 1, "alice", auto_ack=True)
    batch = [old_message(1), old_message(2)]
    assert hub.backlog_loaded(1, Backlog(batch)) == [
        Deliver([1], batch[0].as_event()),
        StoreReceipt("old:1", "Alice", "delivered", batch[0].ts, ALICE.uid),
        Deliver([1], batch[1].as_event()),
        StoreReceipt("old:2", "Alice", "delivered", batch[1].ts, ALICE.uid),
    ]


# --- ids --------------------------------------------------------------------------------


def test_message_ids_are_unique_and_increasing() -> None:
    hub = make_hub(next_seq=41)
    ready(hub, 1, "ann")
    ready(hub, 2, "bob")
    seqs, ids = [], []
    for i in range(30):
        if i % 3:
            effect = send(hub, 1, "bob")
            seqs.append(effect.seq)
            ids.append(effect.message.msg)
            assert effect.message.msg == f"s1:inc:{effect.seq}"
        else:
            [reply, _] = broadcast(hub, 1)
            ids.append(reply.event.msg)  # type: ignore[union-attr]
    assert seqs[0] >= 41
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert len(set(ids)) == len(ids)
    assert all(i.startswith("s1:inc:") for i in ids)


# --- users and status -------------------------------------------------------------------


def test_users_are_paged_with_after_and_next() -> None:
    hub = make_hub(users_page_size=3)
    names = ["ann", "Bob", "cat", "Dan", "eve", "fay", "gus"]
    for conn, name in enumerate(names, 1):
        ready(hub, conn, name)
    welcome = login(hub, 99, "zoe")[0].event  # type: ignore[union-attr]
    assert [u.user for u in welcome.users] == ["ann", "Bob", "cat"]
    assert welcome.next == "cat"
    seen: list[str] = []
    after = None
    while True:
        [reply] = hub.handle(1, messages.UsersRequest(after), "u", T0)
        page = reply.event
        assert isinstance(page, messages.Users) and len(page.users) <= 3
        assert all(u.online and u.server == "s1" for u in page.users)
        seen += [u.user for u in page.users]
        if page.next is None:
            break
        after = page.next
    assert seen == [*names, "zoe"]
    # "after" is compared ignoring case and need not be anyone's name.
    [reply] = hub.handle(1, messages.UsersRequest("BZ"), None, T0)
    assert [u.user for u in reply.event.users] == ["cat", "Dan", "eve"]  # type: ignore[union-attr]


@settings(max_examples=50)
@given(
    names=st.lists(st.from_regex(r"[a-zA-Z0-9]{1,6}", fullmatch=True), min_size=1, max_size=12),
    page=st.integers(1, 4),
)
def test_paging_lists_everyone_once_in_name_order(names: list[str], page: int) -> None:
    hub = Hub("s1", users_page_size=page)
    online: dict[str, str] = {}
    for conn, name in enumerate(names):
        if name.lower() not in online:  # the same name in another case is taken
            hub.login(conn, name, auto_ack=False, now=T0, req_id=None)
            online[name.lower()] = name
    seen: list[str] = []
    after = None
    for _ in range(len(names) + 1):
        [reply] = hub.handle(0, messages.UsersRequest(after), None, T0)
        assert isinstance(reply, Reply) and isinstance(reply.event, messages.Users)
        seen += [u.user for u in reply.event.users]
        after = reply.event.next
        if after is None:
            break
    assert after is None
    assert seen == [online[k] for k in sorted(online)]


def test_status_online_offline_last_seen_and_unknown() -> None:
    hub = make_hub()
    ready(hub, 1, "ann")
    ready(hub, 2, "bob")
    hub.disconnect(2, T0 + 9)

    def status(name: str) -> Any:
        [reply] = hub.handle(1, messages.StatusRequest(name), "st", T0)
        assert isinstance(reply, Reply) and reply.req_id == "st"
        return reply.event

    assert status("ANN") == messages.Status("ann", True, server="s1", servers=["s1"])
    assert status("Bob") == messages.Status("bob", False, last_seen=T0 + 9)
    assert status("DORA") == messages.Status("dora", False, last_seen=123)
    assert status("alice") == messages.Status("Alice", False, last_seen=None)
    assert error_code(hub.handle, 1, messages.StatusRequest("zed"), None, T0) == "no_such_user"


# --- the state machine ------------------------------------------------------------------

NAMES = ["ann", "Ann", "bob", "Alice", "alice", "dora", "zed"]


class HubMachine(RuleBasedStateMachine):
    """Connections come and go, send and broadcast; storage answers in order, later."""

    def __init__(self) -> None:
        super().__init__()
        self.hub = make_hub(users_page_size=2)
        self.now = T0
        self.next_conn = 1
        self.conn_user: dict[int, str] = {}  # conn -> name key
        self.conn_uid: dict[int, str] = {}  # conn -> its identity
        self.uids = 0
        self.every_uid: set[str] = set()
        self.text_conns: set[int] = set()
        self.loading: set[int] = set()  # account connections waiting for their backlog
        self.gone_guests: set[str] = set()
        self.pending: list[StoreMessage] = []  # storage answers in submission order
        self.seen_ids: set[str] = set()

    def check(self, effects: list[Effect]) -> list[Effect]:
        for effect in effects:
            if isinstance(effect, Deliver):
                assert set(effect.conns) <= set(self.hub.conns), effect
                assert len(set(effect.conns)) == len(effect.conns)
            if isinstance(effect, Reply):
                assert effect.conn in self.hub.conns
        return effects

    def users_of(self, key: str) -> list[int]:
        return sorted(c for c, k in self.conn_user.items() if k == key)

    def conns_of(self, uid: str) -> list[int]:
        return sorted(c for c, u in self.conn_uid.items() if u == uid)

    @rule(name=st.sampled_from(NAMES), text_mode=st.booleans())
    def log_in(self, name: str, text_mode: bool) -> None:
        key = name.lower()
        account = self.hub.is_account(name)
        conn, self.next_conn = self.next_conn, self.next_conn + 1
        try:
            candidates = self.hub.check_login(name, "pw" if account else None)
        except ProtocolError as exc:
            assert (exc.code, account, key in self.conn_user.values()) == (
                errors.NAME_TAKEN,
                False,
                True,
            )
            return
        others = sorted(self.conn_user)
        first = key not in self.conn_user.values()
        uid = candidates[0].uid if candidates else None
        effects = self.check(
            self.hub.login(conn, name, auto_ack=text_mode, now=self.now, req_id=1, uid=uid)
        )
        assert isinstance(effects[0], Reply) and effects[0].conn == conn
        assert isinstance(effects[0].event, Welcome)
        presence = [(c, e) for c, e in deliveries(effects) if isinstance(e, Presence)]
        assert presence == ([(others, presence[0][1])] if first else [])
        got = self.hub.conns[conn].uid
        if uid is None:  # a guest session: a new identity, never one seen before
            assert got not in self.every_uid and got.startswith("g.s1.inc.")
        else:
            assert got == uid
        self.every_uid.add(got)
        self.conn_user[conn] = key
        self.conn_uid[conn] = self.hub.conns[conn].uid
        self.gone_guests.discard(key)
        if text_mode:
            self.text_conns.add(conn)
        if account:
            self.loading.add(conn)

    @precondition(lambda self: self.conn_user)
    @rule(data=st.data())
    def disconnect(self, data: st.DataObject) -> None:
        conn = data.draw(st.sampled_from(sorted(self.conn_user)))
        key = self.conn_user.pop(conn)
        uid = self.conn_uid.pop(conn)
        self.loading.discard(conn)
        self.now += 1
        effects = self.check(self.hub.disconnect(conn, self.now))
        last = key not in self.conn_user.values()
        offline = [e for _, e in deliveries(effects) if isinstance(e, Presence)]
        assert len(offline) == int(last)
        if last:
            assert offline[0].online is False and offline[0].last_seen == self.now
            if not self.hub.is_account(key):
                self.gone_guests.add(key)
        assert any(isinstance(e, SaveLastSeen) for e in effects) == (
            last and self.hub.is_account(key)
        )
        drops = [e for e in effects if isinstance(e, DropBacklog)]
        if last and not self.hub.is_account(key):
            offline_at = next(i for i, e in enumerate(effects) if isinstance(e, Deliver))
            assert drops == [DropBacklog(uid, self.now)]
            assert effects.index(drops[0]) < offline_at  # dropped before anyone hears of it
        else:
            assert drops == []

    @precondition(lambda self: self.conn_user)
    @rule(data=st.data(), to=st.sampled_from([*NAMES, "nobody"]))
    def send(self, data: st.DataObject, to: str) -> None:
        conn = data.draw(st.sampled_from(sorted(self.conn_user)))
        key = to.lower()
        try:
            effects = self.check(self.hub.handle(conn, messages.SendRequest(to, "x"), 5, self.now))
        except ProtocolError as exc:
            online_or_account = key in self.conn_user.values() or self.hub.is_account(to)
            assert not online_or_account
            assert exc.code == (errors.OFFLINE if key in self.gone_guests else "no_such_user")
            return
        [effect] = effects
        assert isinstance(effect, StoreMessage)
        online = self.users_of(key)
        holder = self.hub.book.holder(to)
        expected = self.conn_uid[online[0]] if online else holder
        assert effect.message.to_uid == expected
        assert effect.message.sender_uid == self.conn_uid[conn]
        assert effect.message.msg not in self.seen_ids
        self.seen_ids.add(effect.message.msg)
        self.pending.append(effect)

    @precondition(lambda self: self.pending)
    @rule(duplicate=st.booleans())
    def storage_answers(self, duplicate: bool) -> None:
        effect = self.pending.pop(0)
        effects = self.check(
            self.hub.message_stored(effect.message, effect.conn, effect.req_id, duplicate=duplicate)
        )
        sent = [e for e in effects if isinstance(e, Reply)]
        assert len(sent) == int(effect.conn in self.conn_user)
        # Only the identity it was sent to gets it: not a later guest of the same name.
        targets = [] if duplicate else self.conns_of(effect.message.to_uid)
        targets = [c for c in targets if c not in self.loading]
        assert deliveries(effects) == ([(targets, effect.message.as_event())] if targets else [])
        acks = [e for e in effects if isinstance(e, StoreReceipt)]
        assert bool(acks) == any(c in self.text_conns for c in targets)

    @precondition(lambda self: self.loading)
    @rule(data=st.data())
    def backlog_arrives(self, data: st.DataObject) -> None:
        conn = data.draw(st.sampled_from(sorted(self.loading)))
        self.loading.discard(conn)
        message = StoredMessage(
            f"old:{conn}", "zed", self.conn_user[conn], "old", T0, None, "g.x", self.conn_uid[conn]
        )
        effects = self.check(self.hub.backlog_loaded(conn, Backlog([message])))
        assert deliveries(effects) == [([conn], message.as_event())]

    @rule(name=st.sampled_from(["bob", "Zed", "ann"]))
    def register(self, name: str) -> None:
        key = name.lower()
        taken = key in self.conn_user.values() or self.hub.is_account(name)
        try:
            reg, effects = self.hub.begin_register(name, self.now)
        except ProtocolError as exc:
            assert taken and exc.code == errors.NAME_TAKEN
            return
        assert not taken and effects == []
        self.uids += 1
        record = self.hub.make_account(reg, f"{self.uids:016x}", "hash")
        self.check(self.hub.account_stored(reg, record))
        assert self.hub.is_account(name) and self.hub.book.name_of(record.uid) == name
        self.gone_guests.discard(key)

    @precondition(lambda self: self.conn_user)
    @rule(data=st.data())
    def broadcast(self, data: st.DataObject) -> None:
        conn = data.draw(st.sampled_from(sorted(self.conn_user)))
        [later] = self.hub.handle(conn, messages.BroadcastRequest("all"), 3, self.now)
        assert isinstance(later, AfterStored) and later.conn == conn
        effects = self.check(later.effects)
        assert [e for e in effects if isinstance(e, Reply)] == [
            Reply(conn, Sent(effects[0].event.msg, self.now), 3)  # type: ignore[union-attr]
        ]
        [(conns, event)] = deliveries(effects)
        assert sorted(conns) == sorted(c for c in self.conn_user if c != conn)
        assert isinstance(event, Message) and event.msg not in self.seen_ids
        self.seen_ids.add(event.msg)

    @precondition(lambda self: self.conn_user)
    @rule(data=st.data(), to=st.sampled_from(NAMES))
    def typing(self, data: st.DataObject, to: str) -> None:
        conn = data.draw(st.sampled_from(sorted(self.conn_user)))
        effects = self.check(self.hub.handle(conn, messages.TypingRequest(to), None, self.now))
        targets = self.users_of(to.lower())
        assert deliveries(effects) == (
            [(targets, messages.Typing(self.hub.conns[conn].user))] if targets else []
        )

    @invariant()
    def online_is_exactly_the_users_with_a_connection(self) -> None:
        assert set(self.hub.online) == set(self.conn_user.values())
        assert set(self.hub.conns) == set(self.conn_user)
        for key, user in self.hub.online.items():
            assert user.conns == set(self.users_of(key))
            assert user.name.lower() == key


HubMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestHubMachine = HubMachine.TestCase
