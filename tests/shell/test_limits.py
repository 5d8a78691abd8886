"""Connection limits: slow readers, the login timeout, a full server, a client that closes
its sending side (contract "Bad input never ... disturbs anyone else"; STYLE "slow
consumer")."""

from __future__ import annotations

import json

import trio

from tests.conftest import ServiceFactory
from tests.shell.client import Client
from tests.shell.conftest import Connect


async def test_slow_consumer_is_dropped_and_others_keep_getting_messages(
    make_service: ServiceFactory, connect: Connect
) -> None:
    service = await make_service(outbox_bytes=4096, rate_limit=0)
    alice = await connect(service)
    await alice.login("alice")
    # Lockstep: the server can't write a byte more than the client reads.
    slow = await connect(service, lockstep=True)
    await slow.login("slow")
    flooder = await connect(service)
    await flooder.login("flooder")
    await alice.expect("presence", skip=(), user="slow")
    await alice.expect("presence", skip=(), user="flooder")
    # slow stops reading here.

    # One broadcast at a time, as a person (or a polite program) sends them: alice reads
    # each one; the slow reader's queue only grows.
    text = "x" * 100
    went_offline = False
    for i in range(100):
        await flooder.send("broadcast", text=text, id=i)
        assert (await flooder.expect("sent", skip=("presence",)))["id"] == i
        event = await alice.recv()
        if event["type"] == "presence":
            assert (event["user"], event["online"]) == ("slow", False)
            went_offline = True
            event = await alice.recv()
        assert (event["type"], event["text"]) == ("message", text)
    assert went_offline
    assert slow.done is not None
    with trio.fail_after(5):
        await slow.done.wait()
    # What the slow reader still gets is bounded by the outbox limit, then the end.
    assert await slow.drain_until_closed() <= 4096 + 1024
    await flooder.request("broadcast", text="after")
    assert (await alice.expect("message", skip=()))["text"] == "after"


async def test_login_timeout(
    make_service: ServiceFactory, connect: Connect, autojump_clock: trio.abc.Clock
) -> None:
    service = await make_service(login_timeout_s=30.0)
    idle = await connect(service)
    busy = await connect(service)  # pings do not count as logging in
    user = await connect(service)
    await user.login("stays")
    start = trio.current_time()
    for _ in range(10):
        await busy.ping_next()
        await trio.sleep(2)

    bye = await idle.recv(limit_s=60)
    waited = trio.current_time() - start
    assert 29 <= waited <= 31
    assert bye["type"] == "bye" and bye["reason"] == "login_timeout"
    assert await idle.expect_closed() == []
    assert (await busy.expect("bye", skip=()))["reason"] == "login_timeout"
    await busy.expect_closed()

    # A logged-in connection has no such limit.
    await trio.sleep(600)
    await user.ping_next()


async def test_server_full(make_service: ServiceFactory, connect: Connect) -> None:
    service = await make_service(max_connections=2)
    first = await connect(service)
    await first.login("first")
    second = await connect(service)
    await second.ping_next()

    third = await connect(service)
    lines = await third.expect_closed()
    assert len(lines) == 1
    error = json.loads(lines[0])
    assert error["type"] == "error" and error["code"] == "server_full"
    # The ones already in are served as before.
    await first.ping_next()
    await second.login("second")

    # Once someone leaves there is room again.
    await first.send("logout")
    await first.expect_closed()
    assert first.done is not None
    with trio.fail_after(5):
        await first.done.wait()
    fourth = await connect(service)
    await fourth.login("fourth")


async def test_half_close_still_answers_queued_requests(
    make_service: ServiceFactory, connect: Connect
) -> None:
    service = await make_service()
    client = await connect(service)
    await client.send_raw(b'{"type":"login","user":"eof","id":1}\n{"type":"ping","id":2}\n')
    await client.stream.send_eof()
    lines = [json.loads(line) for line in await client.expect_closed()]
    assert [(e["type"], e.get("id")) for e in lines] == [("welcome", 1), ("pong", 2)]


async def send_then_end(client: Client, end: str) -> list[dict[str, object]]:
    """Log in, send to bob, then end the session at once; every event the client got."""
    script = (
        b'{"type":"login","user":"quick","id":1}\n'
        b'{"type":"send","to":"bob","text":"bye now","id":2}\n'
    )
    if end == "logout":
        script += b'{"type":"logout","id":3}\n'
    await client.send_raw(script)
    if end == "eof":
        await client.stream.send_eof()
    return [json.loads(line) for line in await client.expect_closed()]


async def test_logout_right_after_send_still_gets_sent(
    make_service: ServiceFactory, connect: Connect
) -> None:
    service = await make_service()
    bob = await connect(service)
    await bob.login("bob")
    events = await send_then_end(await connect(service), "logout")
    # The message went through ...
    assert (await bob.expect("message"))["text"] == "bye now"
    # ... and the sender was told so before the connection closed.
    assert [e["type"] for e in events if e.get("id") == 2] == ["sent"]
    assert events[-1]["type"] == "bye"


async def test_end_of_input_while_storage_is_busy_still_gets_sent(
    make_service: ServiceFactory, connect: Connect
) -> None:
    service = await make_service(rate_limit=0)
    away = await connect(service)
    await away.register("away", "away-password")
    await away.aclose()
    bob = await connect(service)
    await bob.login("bob")
    # Someone else keeps storage busy: 600 messages for a user who is offline.
    busy = await connect(service)
    await busy.login("busy")
    await busy.send_raw(b'{"type":"send","to":"away","text":"queued"}\n' * 600)
    # Its requests are read: the 600 writes are queued or under way (their `sent` replies,
    # which carry no id here, may come before the pong).
    reply = await busy.request("ping", skip=("sent",))
    assert reply["type"] == "pong"

    events = await send_then_end(await connect(service), "eof")
    assert (await bob.expect("message"))["text"] == "bye now"
    assert [e["type"] for e in events if e.get("id") == 2] == ["sent"]


async def test_end_of_input_after_send_still_gets_sent_when_storage_is_idle(
    make_service: ServiceFactory, connect: Connect
) -> None:
    service = await make_service()
    bob = await connect(service)
    await bob.login("bob")
    events = await send_then_end(await connect(service), "eof")
    assert (await bob.expect("message"))["text"] == "bye now"
    assert [e["type"] for e in events if e.get("id") == 2] == ["sent"]
