"""Every error code, each produced by its own cause, and the connection still served
afterwards (contract "Bad input never closes the connection or disturbs anyone else")."""

from __future__ import annotations

import json

import pytest
import trio

from tests.conftest import ServiceFactory
from tests.shell.client import Client
from tests.shell.conftest import Connect

PASSWORD = "s3cret-enough"


async def logged_in(connect: Connect, service: object, user: str) -> Client:
    client = await connect(service)
    await client.login(user)
    return client


@pytest.mark.parametrize(
    "line",
    [
        b"{not json",
        b'{"type": "ping"',
        b'{"type": "ping", "id": 1,}',
        b'{"type": "ping"} trailing',
        b'{"type": "ping", "text": "\xff\xfe"}',
    ],
    ids=["garbage", "unterminated", "trailing-comma", "trailing-junk", "bad-utf8"],
)
async def test_bad_json(make_service: ServiceFactory, connect: Connect, line: bytes) -> None:
    service = await make_service()
    for client in (await connect(service), await logged_in(connect, service, "alice")):
        await client.send_raw(line + b"\n")
        await client.expect_error("bad_json")
        await client.ping_next()


@pytest.mark.parametrize(
    "body",
    [
        {"type": "send", "to": "bob"},
        {"type": "send", "to": "bob", "text": 5},
        {"type": "send", "to": ["bob"], "text": "hi"},
        {"type": "broadcast", "text": None},
        {"type": "broadcast", "text": True},
        {"text": "no type"},
        {"type": "status"},
    ],
    ids=["missing", "int-text", "list-to", "null-text", "bool-text", "no-type", "no-user"],
)
async def test_bad_request_echoes_id(
    make_service: ServiceFactory, connect: Connect, body: dict[str, object]
) -> None:
    service = await make_service()
    await logged_in(connect, service, "bob")
    alice = await logged_in(connect, service, "alice")
    await alice.send_raw(json.dumps({**body, "id": 5}).encode() + b"\n")
    error = await alice.expect_error("bad_request")
    if "type" in body:
        assert error["id"] == 5
    await alice.ping_next()


async def test_bad_request_on_login_fields(make_service: ServiceFactory, connect: Connect) -> None:
    service = await make_service()
    client = await connect(service)
    await client.send("login", id=1, user=12)
    assert (await client.expect_error("bad_request"))["id"] == 1
    await client.send("login", id=2)
    assert (await client.expect_error("bad_request"))["id"] == 2
    await client.login("carol")


async def test_unknown_type(make_service: ServiceFactory, connect: Connect) -> None:
    service = await make_service()
    client = await connect(service)
    await client.send("frobnicate", id="u1")
    assert (await client.expect_error("unknown_type"))["id"] == "u1"
    await client.login("alice")
    for kind in ("frobnicate", "welcome", "message", "help"):
        await client.send(kind, id=kind)
        assert (await client.expect_error("unknown_type"))["id"] == kind
    await client.ping_next()


async def test_line_too_long_megabyte_without_newline(
    make_service: ServiceFactory, connect: Connect
) -> None:
    service = await make_service()
    alice = await logged_in(connect, service, "alice")
    bob = await logged_in(connect, service, "bob")
    chunk = b"x" * 65536
    for _ in range(16):
        await alice.send_raw(chunk)
    # Still no newline: others are served meanwhile.
    await bob.ping_next()
    assert service.connections  # nobody was dropped
    await alice.send_raw(b"\n")
    await alice.expect_error("line_too_long")
    # One error for one line, and the connection is served again.
    await alice.ping_next()
    await alice.request("send", to="bob", text="still here")
    assert (await bob.expect("message"))["text"] == "still here"


async def test_line_at_the_limit_is_accepted_and_one_byte_more_is_not(
    make_service: ServiceFactory, connect: Connect
) -> None:
    service = await make_service(max_line_bytes=200)
    client = await logged_in(connect, service, "alice")
    prefix = b'{"type":"ping","pad":"'
    suffix = b'"}'
    exact = prefix + b"a" * (200 - len(prefix) - len(suffix)) + suffix
    assert len(exact) == 200
    await client.send_raw(exact + b"\r\n")
    assert (await client.recv())["type"] == "pong"
    over = prefix + b"a" * (201 - len(prefix) - len(suffix)) + suffix
    await client.send_raw(over + b"\n")
    await client.expect_error("line_too_long")
    await client.ping_next()


async def test_not_logged_in(make_service: ServiceFactory, connect: Connect) -> None:
    service = await make_service()
    client = await connect(service)
    requests = [
        {"type": "send", "to": "bob", "text": "hi"},
        {"type": "broadcast", "text": "hi"},
        {"type": "users"},
        {"type": "status", "user": "bob"},
        {"type": "typing", "to": "bob"},
        {"type": "received", "msg": "m"},
        {"type": "read", "msg": "m"},
    ]
    for i, body in enumerate(requests):
        await client.send_raw(json.dumps({**body, "id": i}).encode() + b"\n")
        assert (await client.expect_error("not_logged_in"))["id"] == i
    await client.ping_next()
    await client.login("alice")


async def test_already_logged_in(make_service: ServiceFactory, connect: Connect) -> None:
    service = await make_service()
    client = await logged_in(connect, service, "alice")
    await client.send("login", id=1, user="other")
    assert (await client.expect_error("already_logged_in"))["id"] == 1
    await client.send("register", id=2, user="other", password=PASSWORD)
    assert (await client.expect_error("already_logged_in"))["id"] == 2
    # Still alice, and "other" was not taken.
    other = await logged_in(connect, service, "other")
    status = await other.request("status", user="alice")
    assert status["online"] is True


@pytest.mark.parametrize("name", ["", "has space", "a" * 33, "semi;colon", "é", "new\nline", "*"])
async def test_bad_name(make_service: ServiceFactory, connect: Connect, name: str) -> None:
    service = await make_service()
    client = await connect(service)
    await client.send("login", id=1, user=name)
    assert (await client.expect_error("bad_name"))["id"] == 1
    await client.send("register", id=2, user=name, password=PASSWORD)
    assert (await client.expect_error("bad_name"))["id"] == 2
    await client.login("a" * 32)


async def test_name_taken(make_service: ServiceFactory, connect: Connect) -> None:
    service = await make_service()
    await logged_in(connect, service, "alice")
    client = await connect(service)
    for name in ("alice", "ALICE", "Alice"):
        await client.send("login", id=name, user=name)
        assert (await client.expect_error("name_taken"))["id"] == name
    # Registering a name a guest is using, or an existing account, is taken too.
    await client.send("register", id="r", user="alice", password=PASSWORD)
    await client.expect_error("name_taken", id="r")
    await client.register("bob", PASSWORD)
    other = await connect(service)
    await other.send("register", id="r2", user="BOB", password=PASSWORD)
    await other.expect_error("name_taken", id="r2")
    await other.login("alice2")


async def test_auth_failed(make_service: ServiceFactory, connect: Connect) -> None:
    service = await make_service()
    bob = await connect(service)
    await bob.register("bob", PASSWORD)
    client = await connect(service)
    await client.send("login", id=1, user="bob", password="wrong password")
    await client.expect_error("auth_failed", id=1)
    await client.send("login", id=2, user="bob")  # a registered name needs its password
    await client.expect_error("auth_failed", id=2)
    await client.send("login", id=3, user="nobody", password=PASSWORD)  # no such account
    await client.expect_error("auth_failed", id=3)
    await client.login("bob", PASSWORD)


@pytest.mark.parametrize("password", ["", "short", "1234567"])
async def test_weak_password(make_service: ServiceFactory, connect: Connect, password: str) -> None:
    service = await make_service()
    client = await connect(service)
    await client.send("register", id=1, user="bob", password=password)
    await client.expect_error("weak_password", id=1)
    # Nothing was created: the name is still free for a guest.
    await client.login("bob")


async def test_no_such_user(make_service: ServiceFactory, connect: Connect) -> None:
    service = await make_service()
    client = await logged_in(connect, service, "alice")
    await client.send("send", id=1, to="nobody", text="hello?")
    await client.expect_error("no_such_user", id=1)
    await client.send("send", id=2, to="not a name", text="hello?")
    await client.expect_error("no_such_user", id=2)
    await client.send("status", id=3, user="nobody")
    await client.expect_error("no_such_user", id=3)
    await client.ping_next()


async def test_offline_guest(make_service: ServiceFactory, connect: Connect) -> None:
    service = await make_service()
    alice = await logged_in(connect, service, "alice")
    guest = await logged_in(connect, service, "guest")
    await guest.aclose()
    await alice.expect("presence", user="guest", online=False)
    await alice.send("send", id=1, to="guest", text="are you there?")
    await alice.expect_error("offline", id=1)
    await alice.ping_next()


async def test_text_too_long(make_service: ServiceFactory, connect: Connect) -> None:
    service = await make_service()
    alice = await logged_in(connect, service, "alice")
    bob = await logged_in(connect, service, "bob")
    await alice.send("send", id=1, to="bob", text="é" * 4097)
    await alice.expect_error("text_too_long", id=1)
    await alice.send("broadcast", id=2, text="x" * 4097)
    await alice.expect_error("text_too_long", id=2)
    # Exactly at the limit (counted in characters, not bytes) is fine.
    sent = await alice.request("send", to="bob", text="é" * 4096)
    assert sent["type"] == "sent"
    assert (await bob.expect("message"))["text"] == "é" * 4096


async def test_rate_limited_then_served_again(
    make_service: ServiceFactory, connect: Connect, autojump_clock: trio.abc.Clock
) -> None:
    service = await make_service(rate_limit=2.0, rate_burst_s=1.0)
    client = await logged_in(connect, service, "alice")
    await trio.sleep(5)  # refill the bucket
    await client.send_raw(b'{"type":"ping"}\n' * 5)
    replies = [await client.recv() for _ in range(5)]
    assert [r["type"] for r in replies] == ["pong", "pong", "error", "error", "error"]
    assert {r.get("code") for r in replies[2:]} == {"rate_limited"}
    await trio.sleep(2)
    await client.ping_next()


async def test_rate_limited_error_echoes_id(make_service: ServiceFactory, connect: Connect) -> None:
    service = await make_service(rate_limit=1.0, rate_burst_s=2.0)
    client = await logged_in(connect, service, "alice")
    await client.send_raw(b'{"type":"ping","id":1}\n{"type":"ping","id":2}\n')
    assert await client.recv() == {"type": "pong", "id": 1}
    error = await client.expect_error("rate_limited")
    assert error.get("id") == 2


async def test_flooder_is_closed_and_others_are_unaffected(
    make_service: ServiceFactory, connect: Connect
) -> None:
    service = await make_service(rate_limit=5.0, rate_burst_s=1.0, rate_limit_strikes=10)
    alice = await logged_in(connect, service, "alice")
    flooder = await logged_in(connect, service, "flooder")
    await alice.expect("presence", skip=(), user="flooder")

    await flooder.send_raw(b'{"type":"broadcast","text":"spam"}\n' * 1000)
    lines = await flooder.expect_closed()
    events = [json.loads(line) for line in lines]
    assert events[-1]["type"] == "bye"
    assert events[-1]["reason"] == "rate_limited"
    errors = [e for e in events if e["type"] == "error"]
    assert errors and all(e["code"] == "rate_limited" for e in errors)
    sent = [e for e in events if e["type"] == "sent"]
    assert 1 <= len(sent) <= 5

    # alice got the few broadcasts that were allowed, then the flooder went offline,
    # and she is served as before.
    for _ in sent:
        assert (await alice.expect("message", skip=()))["text"] == "spam"
    offline = await alice.expect("presence", skip=())
    assert (offline["user"], offline["online"]) == ("flooder", False)
    await alice.ping_next()
