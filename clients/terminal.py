"""The bundled terminal client: ``trichat client [--server HOST:PORT] [--user NAME]``.

It speaks the plain-text mode (protocol.md "Plain-text mode"): what you type goes to the
server as it is (``/msg bob hi``, ``/help``), what the server says is printed. A richer
client (failover, resend, local history) is planned; this one is the honest minimum.
"""

from __future__ import annotations

import os
import sys

import trio


def _split(server: str) -> tuple[str, int]:
    host, _, port = server.rpartition(":")
    return (host or "127.0.0.1"), int(port)


async def _pump_stdin(stream: trio.SocketStream) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stdin:
        while True:
            data = await stdin.receive_some(4096)
            if not data:
                await stream.send_all(b"/quit\n")
                return
            await stream.send_all(data)


async def _pump_server(stream: trio.SocketStream) -> None:
    out = trio.wrap_file(sys.stdout)
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        await out.write(data.decode("utf-8", "replace").replace("\r\n", "\n"))
        await out.flush()


async def _chat(server: str, user: str | None) -> None:
    host, port = _split(server)
    stream = await trio.open_tcp_stream(host, port)
    async with stream, trio.open_nursery() as nursery:
        if user:
            await stream.send_all(f"/login {user}\n".encode())
        else:
            print("connected; log in with /login NAME (or /register NAME PASSWORD)", flush=True)
        nursery.start_soon(_pump_stdin, stream)
        await _pump_server(stream)
        nursery.cancel_scope.cancel()


def run_client(server: str, user: str | None) -> int:
    """Run until the server closes the connection or stdin ends; the exit status."""
    try:
        trio.run(_chat, server, user)
    except OSError as exc:
        print(f"trichat client: can't reach {server}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, ValueError):
        return 0
    print("disconnected", file=sys.stderr)
    return 0
