"""A trichat echo bot: answers every private message with the same text.

Standard library only (socket, json): a bot in any language needs no more than this.

    python examples/echo_bot.py [NAME] [HOST:PORT]

NAME defaults to ``echo-bot``; HOST:PORT to env ``TRICHAT_SERVER`` or ``127.0.0.1:7000``.
It logs in as a guest, echoes each private message back to its sender, acknowledges it
with ``received``, reconnects with a growing delay when the server goes away, and exits
cleanly on Ctrl-C. Section names in comments refer to protocol.md.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import socket
import sys
import time
from typing import Any

PING_AFTER_S = 30.0  # silence after which we ping, to notice a dead server sooner
PONG_TIMEOUT_S = 10.0  # no answer this long after a ping: the connection is dead
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 15.0
# Flood control counts every line we send, our `received` acknowledgements included, and closes
# the connection after enough refusals (protocol.md "Flood control": 20/s, bursts of 100 by
# default). Each message costs us two lines (the echo and the ack), so we pace ourselves well
# under the server's limit instead of finding it.
REQUESTS_PER_S = 10.0
REQUEST_BURST = 20.0
SEEN_MAX = 10_000  # message ids remembered to drop repeats (protocol.md "Delivery guarantee")


class Fatal(Exception):
    """Retrying can't help (a bad name, or a name that is a registered account)."""


class Pacer:
    """A token bucket on our side: wait before a request rather than be refused."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = burst, time.monotonic()

    def wait(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            time.sleep((1 - self.tokens) / self.rate)
            self.tokens, self.stamp = 1.0, time.monotonic()
        self.tokens -= 1


class Connection:
    """One TCP connection speaking JSON lines (protocol.md "Framing")."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.buf = b""
        self.pacer = Pacer(REQUESTS_PER_S, REQUEST_BURST)

    def send(self, **request: object) -> None:
        self.pacer.wait()
        # ensure_ascii (json's default) keeps the line pure ASCII; compact separators keep it short.
        line = json.dumps(request, separators=(",", ":")) + "\n"
        self.sock.sendall(line.encode())

    def receive(self, timeout: float) -> dict[str, Any] | None:
        """The next object from the server; None after ``timeout`` seconds of silence."""
        while b"\n" not in self.buf:
            self.sock.settimeout(timeout)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not data:
                raise ConnectionError("the server closed the connection")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        event = json.loads(line)
        if not isinstance(event, dict):
            raise ValueError("the server sent something that is not a JSON object")
        return event

    def close(self) -> None:
        self.sock.close()


def log(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)


class EchoBot:
    def __init__(self, name: str, host: str, port: int) -> None:
        self.name, self.host, self.port = name, host, port
        self.conn: Connection | None = None
        self.logged_in = False
        self.next_id = 0
        self.id_prefix = os.urandom(4).hex()
        # A message can arrive twice, always with the same msg id: remember recent ids so each
        # is echoed once, across reconnects too.
        self.seen: collections.OrderedDict[str, None] = collections.OrderedDict()

    def request_id(self) -> str:
        # The server takes a send with the same user, id, recipient and text as a resend for a
        # day (protocol.md "Resending a send"), across connections. A counter alone would
        # repeat after a restart of the bot and swallow an echo of the same words, so every
        # process gets its own random prefix.
        self.next_id += 1
        return f"echo-{self.id_prefix}-{self.next_id}"

    def run_forever(self) -> None:
        """Connect, serve, and on any connection failure wait and connect again."""
        delay = BACKOFF_FIRST_S
        while True:
            self.logged_in = False
            try:
                self.session()
            except OSError as exc:
                # Refused, reset, unreachable, timed out, or closed by the server
                # (ConnectionError is an OSError too).
                log(f"connection problem: {exc}")
            except ValueError as exc:
                log(f"garbled line from the server: {exc}")  # json.JSONDecodeError
            # Not in a `finally`: on Ctrl-C the connection must stay open for goodbye().
            self.drop()
            if self.logged_in:
                delay = BACKOFF_FIRST_S  # it worked for a while: start the backoff over
            # Exponential backoff with jitter: a restarting server is not hammered by all its
            # bots at once, and a long outage costs one attempt every BACKOFF_MAX_S.
            pause = delay * random.uniform(0.5, 1.0)
            log(f"reconnecting in {pause:.1f} s")
            time.sleep(pause)
            delay = min(BACKOFF_MAX_S, delay * 2)

    def drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def session(self) -> None:
        """One connection: log in, then echo until the connection ends."""
        self.conn = Connection(self.host, self.port)
        self.login()
        self.logged_in = True
        log(f"logged in as {self.name} on {self.host}:{self.port}")
        pinged_at: float | None = None
        while True:
            event = self.conn.receive(PONG_TIMEOUT_S if pinged_at else PING_AFTER_S)
            if event is None:
                if pinged_at is not None:
                    # The kernel may not notice a vanished server for a long time; a missing
                    # pong tells us now.
                    raise ConnectionError("no pong: the server is not answering")
                self.conn.send(type="ping")
                pinged_at = time.monotonic()
                continue
            pinged_at = None  # anything from the server proves it is alive
            if not self.handle(event):
                return

    def login(self) -> None:
        assert self.conn is not None
        # No password: a guest (protocol.md "login"). Sending a password for a name that is not
        # an account would be auth_failed.
        self.conn.send(type="login", user=self.name, id="login")
        while True:
            event = self.conn.receive(PING_AFTER_S)
            if event is None:
                raise ConnectionError("no reply to login")
            if event.get("type") == "welcome":
                self.name = event["user"]
                return
            if event.get("type") == "error" and event.get("id") == "login":
                code = event.get("code")
                if code == "name_taken":
                    # Usually our own previous connection, not yet noticed as gone by the
                    # server (half-open: dropped after about 40 s). Retry with backoff.
                    raise ConnectionError(f"{self.name} is in use: {event.get('message')}")
                if code in ("bad_name", "auth_failed"):
                    raise Fatal(f"can't log in as {self.name}: {event.get('message')}")
                raise ConnectionError(f"login failed: {code}: {event.get('message')}")
            if event.get("type") == "bye":
                raise ConnectionError(f"closed by the server: {event.get('message')}")
            # Anything else before the welcome (there should be nothing) is ignored.

    def handle(self, event: dict[str, Any]) -> bool:
        """Act on one event; False when the server said goodbye."""
        kind = event.get("type")
        if kind == "message":
            self.on_message(event)
        elif kind == "bye":
            # shutdown: the server is probably restarting; rate_limited: we were too fast (the
            # backoff slows us). Either way, reconnect.
            log(f"server says bye ({event.get('reason')}): {event.get('message')}")
            return False
        elif kind == "error":
            # Replies to our echoes: e.g. offline (a guest left before we answered) or
            # rate_limited. Nothing to retry: log it and carry on.
            log(f"error {event.get('code')}: {event.get('message')}")
        return True

    def on_message(self, event: dict[str, Any]) -> None:
        assert self.conn is not None
        msg, sender, text = event["msg"], event["from"], event["text"]
        if event.get("to") == "*":
            return  # a broadcast: not for us in particular, and answering all would be spam
        if msg not in self.seen and sender.lower() != self.name.lower():
            # Never echo to ourselves: a message we sent ourselves would loop forever.
            # (Two echo bots talking to each other would loop too; the pacer keeps that slow.)
            # With an id, a resend (same id, recipient and text) would not make a second message.
            self.conn.send(type="send", to=sender, text=text, id=self.request_id())
            log(f"echoed {len(text)} characters to {sender}")
        self.remember(msg)
        # Acknowledge after acting on it: if we crash before this line, an account's message
        # would be offered again rather than lost (protocol.md "Delivery guarantee").
        self.conn.send(type="received", msg=msg)

    def remember(self, msg: str) -> None:
        self.seen[msg] = None
        self.seen.move_to_end(msg)
        while len(self.seen) > SEEN_MAX:
            self.seen.popitem(last=False)

    def goodbye(self) -> None:
        """Log out politely if we can (the server then tells others we left at once)."""
        if self.conn is None:
            return
        try:
            self.conn.sock.settimeout(1)
            self.conn.sock.sendall(b'{"type":"logout"}\n')
        except OSError:
            pass
        self.drop()


def parse_server(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    name = argv[1] if len(argv) > 1 else "echo-bot"
    server = argv[2] if len(argv) > 2 else os.environ.get("TRICHAT_SERVER", "127.0.0.1:7000")
    host, port = parse_server(server)
    bot = EchoBot(name, host, port)
    # SIGTERM (kill, systemd, docker stop) stops the bot as cleanly as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        bot.run_forever()
    except KeyboardInterrupt:
        # Ctrl-C (or SIGTERM): the way to stop the bot. Say goodbye, exit without a traceback.
        bot.goodbye()
        log("stopped")
        return 0
    except Fatal as exc:
        log(str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
