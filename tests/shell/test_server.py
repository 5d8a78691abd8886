"""A whole server in-process (``run_server`` with a ``stop`` event) on 127.0.0.1 port 0,
spoken to over real TCP sockets: the ready line, chat, shutdown, limits."""

from __future__ import annotations

import json
import re
import socket

import pytest
import trio

from tests.shell.client import Client
from tests.shell.conftest import StartServer
from trichat.server import StartupError, run_server


async def test_ready_line_names_every_listener(start_server: StartServer) -> None:
    server = await start_server(name="alpha")
    assert re.fullmatch(
        r"ready name=alpha line=127\.0\.0\.1:\d+ web=off peer=127\.0\.0\.1:\d+", server.ready
    ), server.ready


async def test_chat_over_tcp(start_server: StartServer) -> None:
    server = await start_server()
    alice = await server.connect()
    bob = await server.connect()
    await alice.login("alice")
    await bob.login("bob")
    sent = await alice.request("send", to="bob", text="over tcp")
    message = await bob.expect("message")
    assert (message["msg"], message["from"], message["text"]) == (sent["msg"], "alice", "over tcp")
    await bob.send_raw(b"/who\r\n")  # bob's mode is JSON already: a JSON reply
    users = await bob.recv()
    assert users["type"] == "users"


async def test_shutdown_sends_bye_and_keeps_stored_messages(start_server: StartServer) -> None:
    server = await start_server()
    bob = await server.connect()
    await bob.register("bob", "bob-password")
    await bob.aclose()
    alice = await server.connect()
    await alice.login("alice")
    carol = await server.connect()
    await carol.send_raw(b"/login carol\r\n")
    assert "welcome" in await carol.text()
    sent = await alice.request("send", to="bob", text="kept over a restart")

    await server.shut_down()
    assert server.finished.is_set()
    lines = await alice.expect_closed()
    events = [json.loads(line) for line in lines]
    assert events[-1]["type"] == "bye" and events[-1]["reason"] == "shutdown"
    rest = [line.decode() for line in await carol.expect_closed()]
    assert rest[-1].startswith("* bye")
    with pytest.raises(OSError):
        with trio.fail_after(5):
            await trio.open_tcp_stream("127.0.0.1", server.port)

    # The same data folder, a new process: the stored message is still there.
    again = await start_server()
    bob = await again.connect()
    await bob.login("bob", "bob-password")
    message = await bob.expect("message")
    assert (message["msg"], message["text"]) == (sent["msg"], "kept over a restart")


async def test_server_full_over_tcp(start_server: StartServer) -> None:
    server = await start_server(max_connections=3)
    clients = [await server.connect() for _ in range(3)]
    for i, client in enumerate(clients):
        await client.login(f"user{i}")
    extra = await server.connect()
    lines = await extra.expect_closed()
    assert [json.loads(line)["code"] for line in lines] == ["server_full"]
    await clients[0].ping()
    await clients[0].send("logout")
    await clients[0].expect_closed()  # the server forgets a connection before closing it
    late = await server.connect()
    await late.login("late")


async def test_port_in_use_is_a_startup_error(
    start_server: StartServer, make_settings: object
) -> None:
    server = await start_server()
    settings = make_settings(port=server.port, data=server.service.settings.data + "-2")  # type: ignore[operator]
    with pytest.raises(StartupError, match=f"{server.port}.*in use"):
        with trio.fail_after(10):
            await run_server(settings, stop=trio.Event())
    # The running server is unharmed.
    client = await server.connect()
    await client.login("still-fine")


async def test_slow_reader_over_tcp_is_dropped(start_server: StartServer) -> None:
    server = await start_server(outbox_bytes=65536, rate_limit=0)
    alice = await server.connect()
    await alice.login("alice")
    flooder = await server.connect()
    await flooder.login("flooder")
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with trio.fail_after(5):
        await sock.connect(("127.0.0.1", server.port))
    slow = Client(trio.SocketStream(sock))
    await slow.login("slow")
    await alice.expect("presence", user="slow", online=True)

    text = "z" * 4000
    batch = b'{"type":"broadcast","text":"%s"}\n' % text.encode() * 8
    dropped = False
    with trio.fail_after(30):
        for _ in range(2000):
            await flooder.send_raw(batch)
            for _ in range(8):
                await flooder.expect("sent")
            got = 0
            while got < 8:
                event = await alice.recv()
                if event["type"] == "presence":
                    assert (event["user"], event["online"]) == ("slow", False)
                    dropped = True
                    continue
                assert (event["type"], event["text"]) == ("message", text)
                got += 1
            if dropped:
                break
    assert dropped, "the reader that never reads was never dropped"
    # alice and the flooder carry on.
    await flooder.request("broadcast", text="after")
    assert (await alice.expect("message"))["text"] == "after"
    # The slow socket ends (after whatever was in the kernel's buffers).
    await slow.drain_until_closed(limit_s=10)


async def test_many_clients_bursting_do_not_get_fast_readers_dropped(
    start_server: StartServer,
) -> None:
    server = await start_server()
    reader = await server.connect()
    await reader.login("reader")
    senders: list[Client] = []
    for i in range(30):
        client = await server.connect()
        await client.login(f"sender{i}")
        senders.append(client)
    for i in range(30):
        await reader.expect("presence", user=f"sender{i}")

    # Within the default flood allowance (--rate-limit 20 with 5 s of burst: 100 tokens, one
    # of which the login took).
    burst = 90
    try:
        async with trio.open_nursery() as nursery:
            for i, client in enumerate(senders):
                line = b'{"type":"broadcast","text":"%d"}\n' % i
                nursery.start_soon(client.send_raw, line * burst)
        got = 0
        with trio.fail_after(20):
            while got < 30 * burst:
                event = await reader.recv()
                assert event["type"] == "message", event
                got += 1
    finally:
        for client in senders:  # nobody reads them: don't leave the server writing to them
            await client.aclose()
