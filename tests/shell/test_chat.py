"""Chatting over ``tcp.serve_connection``: login, private messages, broadcast, presence,
several devices, stored messages, receipts and resends (contract "Semantics")."""

from __future__ import annotations

import trio

from tests.conftest import ServiceFactory
from tests.shell.client import Client
from tests.shell.conftest import Connect

PASSWORD = "correct horse"


async def login(connect: Connect, service: object, user: str, pw: str | None = None) -> Client:
    client = await connect(service)
    await client.login(user, pw)
    return client


async def test_guest_login_gets_welcome_with_id_echo(
    make_service: ServiceFactory, connect: Connect
) -> None:
    service = await make_service(name="alpha")
    alice = await connect(service)
    await alice.send("login", user="alice", id=42)
    welcome = await alice.recv()
    assert welcome["type"] == "welcome"
    assert welcome["id"] == 42
    assert welcome["user"] == "alice"
    assert welcome["server"] == "alpha"
    assert {"user": "alice", "online": True, "server": "alpha"} in welcome["users"]

    bob = await connect(service)
    await bob.send("login", user="bob", id="string-id")
    welcome = await bob.recv()
    assert (welcome["type"], welcome["id"]) == ("welcome", "string-id")
    assert sorted(u["user"] for u in welcome["users"]) == ["alice", "bob"]


async def test_ping_before_login_and_ids_on_replies(
    make_service: ServiceFactory, connect: Connect
) -> None:
    service = await make_service()
    client = await connect(service)
    await client.send("ping", id=7)
    assert await client.recv() == {"type": "pong", "id": 7}
    await client.send("ping")
    assert await client.recv() == {"type": "pong"}
    await client.send("ping", id="x", extra_field_ignored=True)
    assert await client.recv() == {"type": "pong", "id": "x"}


async def test_private_message_between_two_connections(
    make_service: ServiceFactory, connect: Connect
) -> None:
    service = await make_service()
    alice = await login(connect, service, "alice")
    bob = await login(connect, service, "bob")

    sent = await alice.request("send", to="bob", text="hi bob")
    assert sent["type"] == "sent"
    assert isinstance(sent["msg"], str) and sent["msg"]
    assert isinstance(sent["ts"], int)
    message = await bob.expect("message")
    assert message == {
        "type": "message",
        "msg": sent["msg"],
        "from": "alice",
        "to": "bob",
        "text": "hi bob",
        "ts": sent["ts"],
    }
    # A name is matched ignoring case; the message carries the recipient's own spelling.
    await alice.request("send", to="BOB", text="again")
    message = await bob.expect("message", text="again")
    assert message["to"] == "bob"
    # The sender does not get its own private message back.
    await alice.ping_next()


async def test_messages_from_one_sender_arrive_in_order(
    make_service: ServiceFactory, connect: Connect
) -> None:
    service = await make_service(rate_limit=0)
    alice = await login(connect, service, "alice")
    bob = await login(connect, service, "bob")
    lines = b"".join(
        b'{"type":"send","to":"bob","text":"%d","id":%d}\n' % (i, i) for i in range(100)
    )
    await alice.send_raw(lines)
    texts = [(await bob.expect("message"))["text"] for _ in range(100)]
    assert texts == [str(i) for i in range(100)]
    msgs = set()
    for _ in range(100):
        sent = await alice.expect("sent")
        msgs.add(sent["msg"])
    assert len(msgs) == 100


async def test_broadcast_reaches_every_other_connection(
    make_service: ServiceFactory, connect: Connect
) -> None:
    service = await make_service()
    alice = await login(connect, service, "alice")
    bob = await login(connect, service, "bob")
    carol = await login(connect, service, "carol")

    sent = await alice.request("broadcast", text="hello all")
    assert sent["type"] == "sent"
    for other in (bob, carol):
        message = await other.expect("message")
        assert message == {
            "type": "message",
            "msg": sent["msg"],
            "from": "alice",
            "to": "*",
            "text": "hello all",
            "ts": sent["ts"],
        }
    # The sending connection itself gets only `sent`: the next thing it sees is the pong.
    await alice.ping_next()


async def test_presence_on_login_logout_and_disconnect(
    make_service: ServiceFactory, connect: Connect
) -> None:
    service = await make_service(name="s9")
    alice = await login(connect, service, "alice")
    bob = await login(connect, service, "bob")
    online = await alice.expect("presence", skip=())
    assert online["user"] == "bob" and online["online"] is True
    assert online["server"] == "s9" or online.get("servers") == ["s9"]

    await bob.send("logout")
    bye = await bob.expect("bye", skip=())
    assert bye["reason"] == "logout"
    assert await bob.expect_closed() == []
    offline = await alice.expect("presence", skip=())
    assert offline["user"] == "bob" and offline["online"] is False
    assert isinstance(offline["last_seen"], int)

    # A connection that just vanishes (no logout) goes offline too.
    carol = await login(connect, service, "carol")
    await alice.expect("presence", skip=(), user="carol", online=True)
    await carol.aclose()
    offline = await alice.expect("presence", skip=(), user="carol")
    assert offline["online"] is False

    status = await alice.request("status", user="carol")
    assert status["type"] == "status" and status["online"] is False
    assert status["last_seen"] == offline["last_seen"]
    status = await alice.request("status", user="alice")
    assert status["online"] is True


async def test_users_and_typing(make_service: ServiceFactory, connect: Connect) -> None:
    service = await make_service()
    alice = await login(connect, service, "alice")
    bob = await login(connect, service, "bob")
    users = await alice.request("users")
    assert users["type"] == "users"
    assert sorted(u["user"] for u in users["users"]) == ["alice", "bob"]
    assert all(u["online"] is True for u in users["users"])

    await alice.send("typing", to="bob")
    assert await bob.expect("typing") == {"type": "typing", "from": "alice"}


async def test_registered_user_on_two_devices_gets_every_message(
    make_service: ServiceFactory, connect: Connect
) -> None:
    service = await make_service()
    phone = await connect(service)
    await phone.register("bob", PASSWORD)
    laptop = await login(connect, service, "bob", PASSWORD)
    alice = await login(connect, service, "alice")

    sent = await alice.request("send", to="bob", text="to both")
    for device in (phone, laptop):
        message = await device.expect("message")
        assert (message["msg"], message["text"]) == (sent["msg"], "to both")

    # A broadcast from one device reaches the user's other device, not the sender.
    sent = await phone.request("broadcast", text="from the phone")
    assert (await laptop.expect("message"))["msg"] == sent["msg"]
    assert (await alice.expect("message"))["msg"] == sent["msg"]
    await phone.ping_next()

    # Bob stays online while one device is left.
    await phone.send("logout")
    await phone.expect_closed()
    status = await alice.request("status", user="bob")
    assert status["online"] is True


async def test_offline_message_is_stored_and_offered_until_received(
    make_service: ServiceFactory, connect: Connect
) -> None:
    service = await make_service()
    bob = await connect(service)
    await bob.register("bob", PASSWORD)
    await bob.send("logout")
    await bob.expect_closed()
    alice = await login(connect, service, "alice")

    sent = await alice.request("send", to="bob", text="while you were away")
    assert sent["type"] == "sent"

    # First login: the stored message arrives after welcome.
    bob = await login(connect, service, "bob", PASSWORD)
    message = await bob.expect("message")
    assert (message["msg"], message["from"], message["text"]) == (
        sent["msg"],
        "alice",
        "while you were away",
    )
    # No `received`: it is offered again, with the same msg, at the next login.
    await bob.aclose()
    bob = await login(connect, service, "bob", PASSWORD)
    again = await bob.expect("message")
    assert again == message

    await bob.send("received", msg=sent["msg"])
    receipt = await alice.expect("receipt")
    assert receipt["msg"] == sent["msg"]
    assert receipt["status"] == "delivered"
    assert receipt["by"] == "bob"
    assert isinstance(receipt["ts"], int)
    await bob.aclose()

    # Acknowledged: not offered any more. A message sent after login is stored behind the
    # backlog, so its arrival proves nothing older is still coming.
    bob = await login(connect, service, "bob", PASSWORD)
    await alice.request("send", to="bob", text="marker")
    assert (await bob.expect("message"))["text"] == "marker"


async def test_receipts_delivered_and_read(make_service: ServiceFactory, connect: Connect) -> None:
    service = await make_service()
    alice = await login(connect, service, "alice")
    bob = await login(connect, service, "bob")
    sent = await alice.request("send", to="bob", text="did you see this?")
    msg = (await bob.expect("message"))["msg"]
    assert msg == sent["msg"]

    await bob.send("received", msg=msg)
    delivered = await alice.expect("receipt")
    assert (delivered["msg"], delivered["status"], delivered["by"]) == (msg, "delivered", "bob")
    await bob.send("read", msg=msg)
    read = await alice.expect("receipt")
    assert (read["msg"], read["status"], read["by"]) == (msg, "read", "bob")

    # Receipts for a message that is not yours tell nobody anything.
    await alice.send("read", msg=msg)
    await bob.send("read", msg="no-such-message")
    sent = await bob.request("send", to="alice", text="marker", skip=())
    assert (await alice.expect("message", skip=()))["msg"] == sent["msg"]
    await alice.ping_next()


async def test_resend_with_same_id_is_the_same_message(
    make_service: ServiceFactory, connect: Connect
) -> None:
    service = await make_service()
    alice = await login(connect, service, "alice")
    bob = await login(connect, service, "bob")

    await alice.send("send", id="m1", to="bob", text="once")
    first = await alice.expect("sent", id="m1")
    await alice.send("send", id="m1", to="bob", text="once")
    second = await alice.expect("sent", id="m1")
    assert second == first
    assert (await bob.expect("message"))["msg"] == first["msg"]

    # Same id with another text is a new message.
    await alice.send("send", id="m1", to="bob", text="twice")
    third = await alice.expect("sent", id="m1")
    assert third["msg"] != first["msg"]
    assert (await bob.expect("message"))["text"] == "twice"


async def test_resend_after_reconnect_is_the_same_message(
    make_service: ServiceFactory, connect: Connect
) -> None:
    service = await make_service()
    for name in ("bob", "alice"):
        client = await connect(service)
        await client.register(name, PASSWORD)
        await client.aclose()
    alice = await login(connect, service, "alice", PASSWORD)
    await alice.send("send", id=99, to="bob", text="did it arrive?")
    first = await alice.expect("sent", id=99)
    await alice.aclose()

    # The connection broke; the client logs in again and resends.
    alice = await login(connect, service, "alice", PASSWORD)
    await alice.send("send", id=99, to="bob", text="did it arrive?")
    assert await alice.expect("sent", id=99) == first

    bob = await login(connect, service, "bob", PASSWORD)
    assert (await bob.expect("message"))["msg"] == first["msg"]
    await alice.request("send", to="bob", text="marker")
    assert (await bob.expect("message"))["text"] == "marker"


async def test_a_new_guest_of_a_reused_name_is_never_taken_for_a_resend(
    make_service: ServiceFactory, connect: Connect
) -> None:
    # protocol.md "Resend": guests are told apart by session, not name: two people who
    # use the guest name alice one after the other, with the same id and text, are two
    # messages (one must never swallow the other's).
    service = await make_service()
    bob = await connect(service)
    await bob.register("bob", PASSWORD)
    await bob.aclose()
    sent = []
    for _ in range(2):
        alice = await login(connect, service, "alice")
        await alice.send("send", id=1, to="bob", text="hi")
        sent.append((await alice.expect("sent", id=1))["msg"])
        await alice.aclose()
    assert sent[0] != sent[1]
    bob = await login(connect, service, "bob", PASSWORD)
    got = {(await bob.expect("message"))["msg"] for _ in range(2)}
    assert got == set(sent)


async def test_registered_names_ignore_case_and_keep_their_spelling(
    make_service: ServiceFactory, connect: Connect
) -> None:
    service = await make_service()
    bob = await connect(service)
    welcome = await bob.register("BobSmith", PASSWORD)
    assert welcome["user"] == "BobSmith"
    other = await connect(service)
    welcome = await other.login("bobsmith", PASSWORD)
    assert welcome["user"] == "BobSmith"


async def test_logout_closes_and_frees_a_guest_name(
    make_service: ServiceFactory, connect: Connect
) -> None:
    service = await make_service()
    first = await login(connect, service, "dave")
    await first.send("logout", id=1)
    lines = await first.expect_closed()
    assert lines and b'"bye"' in lines[0]
    assert first.done is not None
    with trio.fail_after(5):
        await first.done.wait()
    again = await login(connect, service, "dave")
    assert again.user == "dave"
