"""The server mesh end to end: real ``trichat serve`` processes linked on 127.0.0.1.

Every server is started through the ``serve`` fixture (so it is killed by pid when the test
ends, passed or not); a thread follows its stdout for the ``ready`` and ``linked peers=``
lines. Every wait is bounded. Partitions go through :mod:`tests.e2e.tcpproxy`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Serve
from tests.e2e.proc import SOCKET_TIMEOUT_S, LineClient, ServerProcess
from tests.e2e.tcpproxy import SILENT, TcpProxy
from trichat.peerproto import HANDSHAKE_TIMEOUT_S, PEER_PROTOCOL_VERSION, PEER_TIMEOUT_S

pytestmark = pytest.mark.e2e

SECRET = "mesh-e2e-secret"
WAIT_S = 10.0  # one expected event
LINK_WAIT_S = 15.0  # a mesh converging (dial backoff reaches 5 s, with jitter)
DEAD_WITHIN_S = PEER_TIMEOUT_S + 4.0  # a dead server's users are offline everywhere by then


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- servers ----------------------------------------------------------------------------


class Node:
    """A server process and what it printed on stdout, read by a thread."""

    def __init__(self, name: str, server: ServerProcess) -> None:
        self.name = name
        self.server = server
        self.lines: list[str] = []
        self.linked_history: list[frozenset[str]] = []
        self.eof = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        stdout = self.server.proc.stdout
        assert stdout is not None
        try:
            for raw in iter(stdout.readline, b""):
                line = raw.decode(errors="replace").rstrip("\r\n")
                with self._cond:
                    self.lines.append(line)
                    if line.startswith("ready ") and not self.server.ready:
                        self.server.ready = line
                        self.server.fields = dict(p.split("=", 1) for p in line.split()[1:])
                    elif line.startswith("linked peers="):
                        peers = line.removeprefix("linked peers=")
                        self.linked_history.append(frozenset(p for p in peers.split(",") if p))
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass  # stdout closed by the kill in the fixture's finalizer
        finally:
            with self._cond:
                self.eof = True
                self._cond.notify_all()

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def peer_port(self) -> int:
        return self.server.peer_port

    @property
    def peer_addr(self) -> str:
        return f"127.0.0.1:{self.peer_port}"

    @property
    def linked(self) -> frozenset[str]:
        with self._cond:
            return self.linked_history[-1] if self.linked_history else frozenset()

    def stderr(self) -> str:
        return self.server.stderr()

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: ready() or self.eof, timeout):
                raise AssertionError(
                    f"{self.name}: no {what} within {timeout} s; stdout {self.lines}; "
                    f"stderr:\n{self.stderr()[-3000:]}"
                )
            if not ready():
                code = self.server.proc.wait(5)
                raise AssertionError(
                    f"{self.name} exited ({code}) waiting for {what}; stdout {self.lines}; "
                    f"stderr:\n{self.stderr()[-3000:]}"
                )

    def wait_ready(self, timeout: float = 20.0) -> None:
        self._wait(lambda: bool(self.server.ready), timeout, "ready line")

    def wait_linked(self, *peers: str, timeout: float = LINK_WAIT_S) -> float:
        """Wait for a ``linked peers=`` line listing exactly ``peers``; seconds waited."""
        want = frozenset(peers)
        start = time.monotonic()
        self._wait(
            lambda: bool(self.linked_history) and self.linked_history[-1] == want,
            timeout,
            f"`linked peers={','.join(sorted(want))}`",
        )
        return time.monotonic() - start

    def wait_log(self, pattern: str, timeout: float = WAIT_S) -> str:
        """Wait for a stderr line matching the regex ``pattern``; that line."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.stderr().splitlines():
                if re.search(pattern, line):
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: no log line /{pattern}/ in {timeout} s:\n{self.stderr()[-3000:]}"
                )
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.server.proc.poll() is None


# --- clients ----------------------------------------------------------------------------


class Chat(LineClient):
    """A line-protocol client that keeps every event it reads: waits look through the ones
    not consumed yet before reading more, so events of other kinds are never lost."""

    def __init__(self, node: Node) -> None:
        super().__init__(node.port)
        self.node = node
        self.user = "?"
        self.pending: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []
        self.presence: dict[str, dict[str, Any]] = {}  # user (lower case) -> latest state
        self.eof = False
        self._ids = itertools.count(1)

    def __repr__(self) -> str:
        return f"<{self.user}@{self.node.name}>"

    def _read_one(self, deadline: float) -> dict[str, Any] | None:
        left = deadline - time.monotonic()
        if left <= 0 or self.eof:
            return None
        self.sock.settimeout(left)
        try:
            line = self.line()
        except TimeoutError:
            return None
        except OSError:
            line = None
        finally:
            self.sock.settimeout(SOCKET_TIMEOUT_S)
        if line is None:
            self.eof = True
            return None
        event: dict[str, Any] = json.loads(line)
        self.history.append(event)
        self.pending.append(event)
        if event["type"] == "welcome":
            for entry in event["users"]:
                self.presence[entry["user"].lower()] = {"online": True, **entry}
        elif event["type"] == "presence":
            self.presence[event["user"].lower()] = event
        return event

    def wait(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = WAIT_S, what: str = "?"
    ) -> dict[str, Any]:
        """The first event (read or not yet read) for which ``pred`` is true; consumed."""
        deadline = time.monotonic() + timeout
        checked = 0
        while True:
            for i in range(checked, len(self.pending)):
                if pred(self.pending[i]):
                    return self.pending.pop(i)
            checked = len(self.pending)
            if self._read_one(deadline) is None and (self.eof or time.monotonic() >= deadline):
                raise AssertionError(
                    f"{self!r}: no {what} within {timeout} s (eof={self.eof}); "
                    f"last events {self.history[-8:]}"
                )

    def wait_type(self, type: str, *, timeout: float = WAIT_S, **match: Any) -> dict[str, Any]:
        return self.wait(
            lambda e: e["type"] == type and all(e.get(k) == v for k, v in match.items()),
            timeout,
            f"{type} {match}",
        )

    def wait_message(self, sender: str, *, timeout: float = WAIT_S) -> dict[str, Any]:
        """The next message from ``sender``."""
        return self.wait(
            lambda e: e["type"] == "message" and e["from"] == sender,
            timeout,
            f"message from {sender}",
        )

    def request(self, type: str, *, timeout: float = WAIT_S, **fields: Any) -> dict[str, Any]:
        """Send a request with a fresh id; its direct reply (whatever its type)."""
        rid = f"{type}-{next(self._ids)}"
        self.send(type, id=rid, **fields)
        return self.wait(lambda e: e.get("id") == rid, timeout, f"reply to {type} {fields}")

    def try_login(self, user: str) -> dict[str, Any]:
        reply = self.request("login", user=user)
        if reply["type"] == "welcome":
            self.user = reply["user"]
        return reply

    def login_as(self, user: str) -> dict[str, Any]:
        reply = self.try_login(user)
        assert reply["type"] == "welcome", (self.node.name, user, reply)
        assert reply["server"] == self.node.name
        return reply

    def users(self) -> dict[str, str]:
        """``users`` as {user: server}, every page."""
        out: dict[str, str] = {}
        after: str | None = None
        while True:
            fields: dict[str, Any] = {"after": after} if after is not None else {}
            reply = self.request("users", **fields)
            assert reply["type"] == "users", reply
            for entry in reply["users"]:
                assert entry["online"] is True, entry
                out[entry["user"]] = entry["server"]
            after = reply.get("next")
            if after is None:
                return out

    def online(self, user: str) -> str | None:
        """Where ``user`` is online as far as the events read so far say, or None."""
        state = self.presence.get(user.lower())
        if state is None or not state["online"]:
            return None
        server: str = state["server"]
        return server

    def wait_presence(self, user: str, server: str | None, timeout: float = WAIT_S) -> float:
        """Wait until the events say ``user`` is online on ``server`` (None: offline);
        the seconds waited."""
        start = time.monotonic()
        deadline = start + timeout
        while self.online(user) != server:
            if self._read_one(deadline) is None and (self.eof or time.monotonic() >= deadline):
                raise AssertionError(
                    f"{self!r}: {user} not {'on ' + server if server else 'offline'} within "
                    f"{timeout} s (now {self.presence.get(user.lower())}); "
                    f"last events {self.history[-8:]}"
                )
        return time.monotonic() - start

    def drain(self, quiet: float = 0.4, limit: float = 3.0) -> None:
        """Read until nothing came for ``quiet`` seconds (at most ``limit`` in all)."""
        end = time.monotonic() + limit
        while time.monotonic() < end:
            if self._read_one(min(end, time.monotonic() + quiet)) is None:
                return

    def take(self, pred: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """Consume and return every pending event for which ``pred`` is true."""
        taken = [e for e in self.pending if pred(e)]
        self.pending = [e for e in self.pending if not pred(e)]
        return taken

    def went_offline(self, user: str) -> bool:
        """Whether any presence event read so far said ``user`` went offline."""
        return any(
            e["type"] == "presence" and e["user"].lower() == user.lower() and not e["online"]
            for e in self.history
        )


class Mesh:
    """Starts servers and clients for one test; the fixtures kill and close them all."""

    def __init__(self, serve: Serve, tmp_path: Path) -> None:
        self._serve = serve
        self._tmp = tmp_path
        self.nodes: list[Node] = []
        self.clients: list[Chat] = []
        self.proxies: list[TcpProxy] = []

    def start(
        self,
        name: str,
        *peers: str,
        secret: str = SECRET,
        port: int = 0,
        peer_port: int = 0,
        advertise: str | None = None,
        wait: bool = True,
    ) -> Node:
        """``trichat serve --name NAME --peer P...`` with data in ``tmp_path/NAME``."""
        flags = ["--name", name, "--cluster-secret", secret]
        flags += ["--port", str(port), "--peer-port", str(peer_port)]
        for peer in peers:
            flags += ["--peer", peer]
        if advertise is not None:
            flags += ["--advertise", advertise]
        server = self._serve(*flags, data=self._tmp / name, wait=False)
        node = Node(name, server)
        self.nodes.append(node)
        if wait:
            node.wait_ready()
        return node

    def start_linked(self, count: int) -> list[Node]:
        """s0, then s1.. joining through s0 only; returns once all are linked to all."""
        first = self.start("s0")
        rest = [self.start(f"s{i}", first.peer_addr, wait=False) for i in range(1, count)]
        nodes = [first, *rest]
        for node in rest:
            node.wait_ready()
        wait_full_mesh(nodes)
        return nodes

    def client(self, node: Node, user: str | None = None) -> Chat:
        chat = Chat(node)
        self.clients.append(chat)
        if user is not None:
            chat.login_as(user)
        return chat

    def proxy(self, target: tuple[str, int] | None = None) -> TcpProxy:
        proxy = TcpProxy(target)
        self.proxies.append(proxy)
        return proxy

    def close(self) -> None:
        for chat in self.clients:
            chat.close()
        for proxy in self.proxies:
            proxy.close()


@pytest.fixture
def mesh(serve: Serve, tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(serve, tmp_path)
    try:
        yield m
    finally:
        m.close()  # then `serve` kills every server by pid


def wait_full_mesh(nodes: list[Node], timeout: float = LINK_WAIT_S) -> None:
    names = {n.name for n in nodes}
    deadline = time.monotonic() + timeout
    for node in nodes:
        node.wait_linked(*(names - {node.name}), timeout=max(0.1, deadline - time.monotonic()))


def wait_everyone_sees(
    clients: Iterable[Chat], where: Mapping[str, str | None], timeout: float = WAIT_S
) -> None:
    """Each client's presence view agrees with ``where`` ({user: server or None})."""
    deadline = time.monotonic() + timeout
    for chat in clients:
        for user, server in where.items():
            if user.lower() != chat.user.lower():
                chat.wait_presence(user, server, timeout=max(0.1, deadline - time.monotonic()))


def assert_users_everywhere(clients: Iterable[Chat], expected: dict[str, str]) -> None:
    for chat in clients:
        assert chat.users() == expected, f"`users` on {chat.node.name}"


def no_tracebacks(*nodes: Node) -> None:
    for node in nodes:
        assert "Traceback" not in node.stderr(), f"{node.name}:\n{node.stderr()[-3000:]}"


# --- 1. a three-server mesh -------------------------------------------------------------


def test_three_servers_learn_each_other_and_route_everything(mesh: Mesh) -> None:
    s0, s1, s2 = mesh.start_linked(3)
    # s1 and s2 were only told s0: they found each other through it, by its address.
    assert s1.peer_addr in s2.wait_log(r"linked to peer s1 ")
    assert s2.peer_addr in s1.wait_log(r"linked to peer s2 ")

    alice = mesh.client(s0, "alice")
    bob = mesh.client(s1, "bob")
    dave = mesh.client(s1, "dave")
    carol = mesh.client(s2, "carol")
    everyone = [alice, bob, dave, carol]
    where = {"alice": "s0", "bob": "s1", "dave": "s1", "carol": "s2"}
    wait_everyone_sees(everyone, where)
    assert_users_everywhere([alice, bob, carol], where)

    # A guest name in use on s0 is taken on s2 too (ignoring case).
    for name in ("alice", "ALICE"):
        intruder = mesh.client(s2)
        reply = intruder.try_login(name)
        assert (reply["type"], reply.get("code")) == ("error", "name_taken"), reply
        intruder.close()

    # Private messages across servers: sent, then message with the same id, in order.
    count = 50
    for i in range(count):
        alice.send("send", to="carol", text=f"a->c {i}", id=f"m{i}")
    sent = [alice.wait_type("sent", id=f"m{i}") for i in range(count)]
    assert len({s["msg"] for s in sent}) == count
    got = [carol.wait_message("alice") for _ in range(count)]
    assert [m["text"] for m in got] == [f"a->c {i}" for i in range(count)]
    assert [m["msg"] for m in got] == [s["msg"] for s in sent]
    assert all(m["to"] == "carol" for m in got)

    # And the other way round between another pair of servers.
    carol.send("send", to="bob", text="c->b", id="cb")
    cb = carol.wait_type("sent", id="cb")
    message = bob.wait_type("message", msg=cb["msg"])
    assert (message["from"], message["to"], message["text"]) == ("carol", "bob", "c->b")

    # Receipts: bob on s1 received alice's message: alice on s0 hears it was delivered.
    ab = alice.request("send", to="bob", text="tell me you got it")
    assert ab["type"] == "sent", ab
    message = bob.wait_type("message", msg=ab["msg"])
    bob.send("received", msg=message["msg"])
    receipt = alice.wait_type("receipt", msg=ab["msg"])
    assert (receipt["status"], receipt["by"]) == ("delivered", "bob")

    # Broadcasts reach every other connection exactly once, whichever server sent them.
    b0 = alice.request("broadcast", text="hello from s0")
    b2 = carol.request("broadcast", text="hello from s2")
    assert b0["type"] == b2["type"] == "sent"
    for chat in everyone:
        for b, sender in ((b0, alice), (b2, carol)):
            if chat is not sender:
                chat.wait_type("message", msg=b["msg"])
    for chat in everyone:
        chat.drain()
        again = chat.take(lambda e: e["type"] == "message" and e["msg"] in {b0["msg"], b2["msg"]})
        assert again == [], f"{chat!r} got a broadcast twice (or its own): {again}"
    for chat in everyone:
        seen = [e for e in chat.history if e["type"] == "message" and e["to"] == "*"]
        assert sorted(e["text"] for e in seen) == sorted(
            t for t, s in (("hello from s0", "alice"), ("hello from s2", "carol")) if s != chat.user
        )

    # Presence across servers: erin comes and goes on s2; s0 and s1 are told both ways.
    erin = mesh.client(s2, "erin")
    wait_everyone_sees([alice, bob, dave, carol], {"erin": "s2"})
    erin.send("logout")
    assert json.loads(erin.rest()[-1])["type"] == "bye"
    for chat in (alice, bob, dave, carol):
        chat.wait_presence("erin", None)
        offline = [e for e in chat.history if e["type"] == "presence" and e["user"] == "erin"][-1]
        assert isinstance(offline["last_seen"], int), offline
    assert_users_everywhere([alice, bob, carol], where)
    no_tracebacks(s0, s1, s2)


# --- 2. joining by hand -----------------------------------------------------------------


def test_a_fourth_server_joins_through_one_member(mesh: Mesh) -> None:
    s0, s1, s2 = mesh.start_linked(3)
    alice, bob, carol = mesh.client(s0, "alice"), mesh.client(s1, "bob"), mesh.client(s2, "carol")
    old = [alice, bob, carol]
    wait_everyone_sees(old, {"alice": "s0", "bob": "s1", "carol": "s2"})
    before = {n.name: len(n.linked_history) for n in (s0, s1, s2)}

    s3 = mesh.start("s3", s2.peer_addr)  # told about s2 only
    wait_full_mesh([s0, s1, s2, s3])
    assert s0.peer_addr in s3.wait_log(r"linked to peer s0 ")

    dave = mesh.client(s3, "dave")
    where = {"alice": "s0", "bob": "s1", "carol": "s2", "dave": "s3"}
    wait_everyone_sees([*old, dave], where)
    assert_users_everywhere([*old, dave], where)

    # Nobody already linked lost a link while s3 joined: every later line only adds s3.
    for node in (s0, s1, s2):
        later = node.linked_history[before[node.name] :]
        assert later and all(peers >= {"s0", "s1", "s2"} - {node.name} for peers in later), (
            node.name,
            node.linked_history,
        )

    # Old clients keep working, with each other and with the newcomer.
    for sender, to in (
        (alice, "bob"),
        (bob, "carol"),
        (carol, "alice"),
        (dave, "alice"),
        (alice, "dave"),
    ):
        reply = sender.request("send", to=to, text=f"{sender.user}->{to}")
        assert reply["type"] == "sent", reply
    for chat, author in (
        (bob, "alice"),
        (carol, "bob"),
        (alice, "carol"),
        (alice, "dave"),
        (dave, "alice"),
    ):
        message = chat.wait_message(author)
        assert message["text"] == f"{author}->{chat.user}"
    for chat in (*old, dave):
        chat.drain(quiet=0.3)
        for user in ("alice", "bob", "carol"):
            assert not chat.went_offline(user), f"{chat!r} saw {user} go offline"
    no_tracebacks(s0, s1, s2, s3)


# --- 3. a server killed and restarted ---------------------------------------------------


def test_sigkill_takes_users_offline_and_a_restart_brings_them_back(mesh: Mesh) -> None:
    s0, s1, s2 = mesh.start_linked(3)
    alice, bob = mesh.client(s0, "alice"), mesh.client(s1, "bob")
    carol, cora = mesh.client(s2, "carol"), mesh.client(s2, "cora")
    where: dict[str, str | None] = {"alice": "s0", "bob": "s1", "carol": "s2", "cora": "s2"}
    wait_everyone_sees([alice, bob, carol], where)
    port, peer_port = s2.port, s2.peer_port

    killed_at = time.monotonic()
    s2.server.signal(signal.SIGKILL)
    assert s2.server.wait(10) == -signal.SIGKILL
    for chat in (alice, bob):
        for user in ("carol", "cora"):
            chat.wait_presence(user, None, timeout=DEAD_WITHIN_S)
    took = time.monotonic() - killed_at
    assert took < DEAD_WITHIN_S, f"offline after {took:.1f} s"
    s0.wait_linked("s1")
    s1.wait_linked("s0")
    assert_users_everywhere([alice, bob], {"alice": "s0", "bob": "s1"})
    carol.close()
    cora.close()

    # The same ports and data, the same command line: it relinks without anyone's help.
    again = mesh.start("s2", s0.peer_addr, port=port, peer_port=peer_port)
    wait_full_mesh([s0, s1, again])
    carol = mesh.client(again, "carol")
    where = {"alice": "s0", "bob": "s1", "carol": "s2"}
    wait_everyone_sees([alice, bob, carol], where)
    for chat in (alice, bob):
        assert chat.online("cora") is None  # only the user who came back is back
    assert_users_everywhere([alice, bob, carol], {u: s for u, s in where.items() if s})

    reply = alice.request("send", to="carol", text="welcome back")
    assert reply["type"] == "sent", reply
    assert carol.wait_type("message", msg=reply["msg"])["text"] == "welcome back"
    no_tracebacks(s0, s1, again)


# --- 4. partitions ----------------------------------------------------------------------


def partitioned_pair(mesh: Mesh) -> tuple[Node, Node, TcpProxy, TcpProxy]:
    """Servers pa and pb whose only path to each other is a proxy each way: pa joins pb
    through ``to_b`` and tells it to dial back through ``to_a``."""
    to_a, to_b = mesh.proxy(), mesh.proxy()
    pb = mesh.start("pb", advertise=to_b.addr)
    to_b.target = ("127.0.0.1", pb.peer_port)
    a_peer_port = free_port()
    to_a.target = ("127.0.0.1", a_peer_port)
    pa = mesh.start("pa", to_b.addr, peer_port=a_peer_port, advertise=to_a.addr)
    wait_full_mesh([pa, pb])
    # Each one knows the other only by its proxy.
    assert to_b.addr in pa.wait_log(r"linked to peer pb ")
    assert to_a.addr in pb.wait_log(r"linked to peer pa ")
    assert pb.peer_addr not in pa.stderr()
    assert pa.peer_addr not in pb.stderr()
    assert to_a.connections() + to_b.connections() >= 1
    return pa, pb, to_a, to_b


def test_partition_and_heal_settle_a_name_taken_on_both_sides(mesh: Mesh) -> None:
    pa, pb, to_a, to_b = partitioned_pair(mesh)
    ann, ben = mesh.client(pa, "ann"), mesh.client(pb, "ben")
    wait_everyone_sees([ann, ben], {"ann": "pa", "ben": "pb"})

    to_a.cut()
    to_b.cut()
    ann.wait_presence("ben", None, timeout=DEAD_WITHIN_S)
    ben.wait_presence("ann", None, timeout=DEAD_WITHIN_S)
    pa.wait_linked()
    pb.wait_linked()
    assert ann.users() == {"ann": "pa"}
    assert ben.users() == {"ben": "pb"}
    reply = ann.request("send", to="ben", text="are you there?")
    assert (reply["type"], reply.get("code")) == ("error", "offline"), reply

    # The same guest name on both sides: pb's login is the earlier one and keeps it.
    first = mesh.client(pb, "dup")
    time.sleep(0.05)  # logins are compared by their millisecond time
    second = mesh.client(pa, "dup")

    to_a.heal()
    to_b.heal()
    wait_full_mesh([pa, pb])
    error = second.wait_type("error", code="name_taken")
    assert "dup" in error["message"]
    second.wait_type("bye", reason="name_taken")
    second.drain()
    assert second.eof, "the server did not close the connection that lost its name"

    wait_everyone_sees([ann, ben], {"ann": "pa", "ben": "pb", "dup": "pb"})
    first.drain(quiet=0.3)
    assert not first.eof
    assert not [e for e in first.history if e["type"] in ("error", "bye")], first.history
    pong = first.request("ping")
    assert pong["type"] == "pong"
    assert_users_everywhere([ann, ben, first], {"ann": "pa", "ben": "pb", "dup": "pb"})
    reply = ann.request("send", to="dup", text="the one who kept the name")
    assert reply["type"] == "sent", reply
    assert first.wait_type("message", msg=reply["msg"])["from"] == "ann"
    no_tracebacks(pa, pb)


def test_silent_partition_is_noticed_by_heartbeats_and_heals(mesh: Mesh) -> None:
    pa, pb, to_a, to_b = partitioned_pair(mesh)
    ann, ben = mesh.client(pa, "ann"), mesh.client(pb, "ben")
    wait_everyone_sees([ann, ben], {"ann": "pa", "ben": "pb"})

    # Packets vanish but no connection closes: only the missing heartbeats can tell.
    cut_at = time.monotonic()
    to_a.cut(SILENT)
    to_b.cut(SILENT)
    # Sent into the void before anyone noticed: it is on disk, so it arrives after the heal.
    lost = ann.request("send", to="ben", text="sent during the silence")
    assert lost["type"] == "sent", lost
    ann.wait_presence("ben", None, timeout=DEAD_WITHIN_S)
    ben.wait_presence("ann", None, timeout=DEAD_WITHIN_S)
    took = time.monotonic() - cut_at
    assert took < DEAD_WITHIN_S, f"noticed after {took:.1f} s"
    pa.wait_linked(timeout=2)
    pb.wait_linked(timeout=2)
    assert not [e for e in ben.history if e["type"] == "message"]

    to_a.heal()
    to_b.heal()
    wait_full_mesh([pa, pb])
    wait_everyone_sees([ann, ben], {"ann": "pa", "ben": "pb"})
    assert_users_everywhere([ann, ben], {"ann": "pa", "ben": "pb"})
    message = ben.wait_type("message", msg=lost["msg"])
    assert (message["from"], message["text"]) == ("ann", "sent during the silence")
    reply = ben.request("send", to="ann", text="back together")
    assert reply["type"] == "sent", reply
    assert ann.wait_type("message", msg=reply["msg"])["text"] == "back together"
    ben.drain(quiet=0.3)
    assert ben.take(lambda e: e.get("msg") == lost["msg"]) == []  # not twice
    no_tracebacks(pa, pb)


def test_an_account_registered_on_one_server_logs_in_on_another(mesh: Mesh) -> None:
    """contract.md: a registered name needs its password and may be logged in from several
    connections; a message for it while offline is delivered when it next logs in, "on any
    server"."""
    s0, s1 = mesh.start_linked(2)
    phone = mesh.client(s0)
    assert phone.request("register", user="erin", password="erin-password")["type"] == "welcome"
    laptop = mesh.client(s1)
    reply = laptop.request("login", user="erin", password="erin-password")
    assert reply["type"] == "welcome", reply
    phone.wait(
        lambda e: e["type"] == "presence" and e.get("servers") == ["s0", "s1"],
        what="erin online on both servers",
    )


# --- 5. intruders ---------------------------------------------------------------------


def peer_socket(node: Node) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", node.peer_port), timeout=WAIT_S)
    sock.settimeout(WAIT_S)
    return sock


def read_to_end(sock: socket.socket, timeout: float = WAIT_S) -> bytes:
    """Everything until the server closes the connection (which it must, in time)."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"the connection is still open after {timeout} s; got {data[:300]!r}"
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def read_line(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    """The first line the server sends (bounded by the socket's timeout), and what follows."""
    buf = b""
    while b"\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a whole line: {buf[:300]!r}"
        buf += chunk
    line, rest = buf.split(b"\n", 1)
    return json.loads(line), rest


def send_junk(node: Node, payload: bytes) -> bytes:
    """Send ``payload`` to the peer port; everything the server answers before it hangs up."""
    with peer_socket(node) as sock:
        # Refused before it all went through? What it answered is still readable.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
        return read_to_end(sock)


def refusal(data: bytes) -> dict[str, Any]:
    lines: list[dict[str, Any]] = [json.loads(line) for line in data.splitlines() if line.strip()]
    assert lines and lines[-1]["type"] == "refuse", data[:500]
    return lines[-1]


def test_junk_on_the_peer_port_is_refused_and_disturbs_nobody(mesh: Mesh) -> None:
    s0, s1 = mesh.start_linked(2)
    alice, bob = mesh.client(s0, "alice"), mesh.client(s1, "bob")
    wait_everyone_sees([alice, bob], {"alice": "s0", "bob": "s1"})
    history = {n.name: list(n.linked_history) for n in (s0, s1)}

    # A connection that never says anything is closed when the handshake times out.
    mute = peer_socket(s1)
    mute_at = time.monotonic()

    # Junk of every kind, straight to s1's peer port: each connection gets a refuse, then
    # is closed.
    assert "JSON" in refusal(send_junk(s1, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))["reason"]
    refusal(send_junk(s1, bytes(range(256)) * 64 + b"\n"))
    members = b'{"type":"members","members":[{"server":"evil","addr":"127.0.0.1:1"}]}\n'
    assert "hello" in refusal(send_junk(s1, members))["reason"]
    too_long = b"x" * (5 * 1024 * 1024)  # over the peer line limit, without a newline
    assert "limit" in refusal(send_junk(s1, too_long))["reason"]

    # Posing as s0, a real member, without the secret: s1 answers with its hello, refuses
    # the forged proof (and says so in its log), and the real s0 link is untouched.
    with peer_socket(s1) as fake:
        hello = {
            "type": "hello",
            "version": PEER_PROTOCOL_VERSION,
            "server": "s0",
            "addr": "127.0.0.1:1",
        }
        fake.sendall(json.dumps({**hello, "nonce": "ab"}).encode() + b"\n")
        answer, rest = read_line(fake)
        assert (answer["type"], answer["server"]) == ("hello", "s1"), answer
        assert answer["proof"]
        time.sleep(0.3)  # not at once: see test_acceptor_refuses_a_quick_refusal_cleanly
        fake.sendall(b'{"type":"auth","proof":"' + b"0" * 64 + b'"}\n')
        assert "secret" in refusal(rest + read_to_end(fake))["reason"]
    s1.wait_log(r"peer link refused \(incoming\): the peer does not know the cluster secret")

    rest = read_to_end(mute, timeout=HANDSHAKE_TIMEOUT_S + 4)
    assert time.monotonic() - mute_at >= HANDSHAKE_TIMEOUT_S - 1, rest
    mute.close()

    # Nothing changed for the mesh: the same links, the same users, chat still works.
    assert {n.name: n.linked_history for n in (s0, s1)} == history
    assert "evil" not in s1.stderr()
    assert s0.alive() and s1.alive()
    assert_users_everywhere([alice, bob], {"alice": "s0", "bob": "s1"})
    reply = alice.request("send", to="bob", text="still here")
    assert reply["type"] == "sent", reply
    assert bob.wait_type("message", msg=reply["msg"])["text"] == "still here"
    for chat in (alice, bob):
        assert not [e for e in chat.history if e["type"] in ("error", "bye")], chat.history
    no_tracebacks(s0, s1)


def assert_alive(node: Node) -> None:
    """A refused handshake once could kill the refused server (see REFUSE_RACE)."""
    assert node.alive(), f"{node.name} died: {REFUSE_RACE}\n{node.stderr()[-2000:]}"


def test_a_server_with_another_secret_is_refused(mesh: Mesh) -> None:
    s0, s1 = mesh.start_linked(2)
    alice, bob = mesh.client(s0, "alice"), mesh.client(s1, "bob")
    wait_everyone_sees([alice, bob], {"alice": "s0", "bob": "s1"})
    history = {n.name: list(n.linked_history) for n in (s0, s1)}

    # It dials s0 (again and again, with backoff) and is refused each time; both say so.
    bad = mesh.start("bad", s0.peer_addr, secret="not-the-secret")
    mallory = mesh.client(bad, "mallory")
    refused = r"peer link refused .*the peer does not know the cluster secret"
    deadline = time.monotonic() + LINK_WAIT_S
    while not (re.search(refused, s0.stderr()) and len(re.findall(refused, bad.stderr())) >= 2):
        assert_alive(bad)
        assert time.monotonic() < deadline, (s0.stderr()[-2000:], bad.stderr()[-2000:])
        time.sleep(0.05)

    # It never linked, nobody saw mallory, and the mesh did not notice a thing.
    assert_alive(bad)
    assert bad.linked_history == [], bad.linked_history
    assert {n.name: n.linked_history for n in (s0, s1)} == history
    for chat in (alice, bob):
        chat.drain(quiet=0.3)
        assert chat.online("mallory") is None
        assert not [e for e in chat.history if e.get("user") == "mallory"], chat.history
        assert chat.users() == {"alice": "s0", "bob": "s1"}
        reply = chat.request("status", user="mallory")
        assert (reply["type"], reply.get("code")) == ("error", "no_such_user"), reply
    assert mallory.users() == {"mallory": "bad"}
    reply = mallory.request("send", to="alice", text="let me in")
    assert (reply["type"], reply.get("code")) == ("error", "no_such_user"), reply
    reply = alice.request("send", to="bob", text="still here")
    assert reply["type"] == "sent", reply
    assert bob.wait_type("message", msg=reply["msg"])["text"] == "still here"
    assert s0.alive() and s1.alive()


# --- the refusal race (peers.py: _read_loop's _flush_refusal vs _write_loop) -------------

REFUSE_RACE = (
    "regression: peers.PeerManager._read_loop, on LinkDown, once called _flush_refusal -> "
    "stream.send_all while _write_loop may still be inside its own send_all on the same "
    "trio SocketStream: trio.BusyResourceError escapes _run_link"
)


def fake_hello(port: int) -> bytes:
    """An acceptor's hello with a proof that can't be right."""
    hello = {
        "type": "hello",
        "version": PEER_PROTOCOL_VERSION,
        "server": "impostor",
        "addr": f"127.0.0.1:{port}",
        "nonce": "00",
        "proof": "0" * 64,
    }
    return json.dumps(hello).encode() + b"\n"


def test_dialer_survives_a_refused_handshake(mesh: Mesh) -> None:
    """A --peer address whose listener answers the hello with a wrong proof (a member with
    another secret, say) is refused, retried with backoff, and never takes us down."""
    stop = threading.Event()
    attempts: list[int] = []
    listeners: list[socket.socket] = []

    def answer(listener: socket.socket) -> None:
        line = fake_hello(listener.getsockname()[1])
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(3)
                with contextlib.suppress(OSError):
                    if conn.recv(65536):  # the dialer's hello: answer at once
                        conn.sendall(line)
                        attempts.append(1)
                        conn.recv(65536)

    threads = []
    for _ in range(16):  # sixteen addresses: sixteen dial loops retrying side by side
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listeners.append(listener)
        threads.append(threading.Thread(target=answer, args=(listener,), daemon=True))
    for thread in threads:
        thread.start()
    try:
        node = mesh.start("dialer", *(f"127.0.0.1:{ls.getsockname()[1]}" for ls in listeners))
        deadline = time.monotonic() + 15
        while len(attempts) < 96 and node.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert node.alive(), (
            f"the server died after {len(attempts)} refused handshakes:\n" + (node.stderr()[-2000:])
        )
        assert len(attempts) >= 32, len(attempts)
        node.wait_log(r"peer link refused .*secret")
        no_tracebacks(node)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=2)
        for listener in listeners:
            listener.close()


def test_acceptor_refuses_a_quick_refusal_cleanly(mesh: Mesh) -> None:
    """Dialers that refuse the acceptor's hello the moment it arrives (as a server with
    another secret does) are logged as refusals, never as a crashed handler."""
    node = mesh.start("acceptor")

    def dial_and_refuse() -> None:
        with contextlib.suppress(OSError), peer_socket(node) as sock:
            hello = {
                "type": "hello",
                "version": PEER_PROTOCOL_VERSION,
                "server": "other",
                "addr": "127.0.0.1:1",
            }
            sock.sendall(json.dumps({**hello, "nonce": "00"}).encode() + b"\n")
            if sock.recv(65536):
                sock.sendall(b'{"type":"refuse","reason":"the peer does not know the secret"}\n')
                read_to_end(sock, timeout=3)

    for _ in range(25):  # a race: try it up to 200 times
        threads = [threading.Thread(target=dial_and_refuse, daemon=True) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=5)
        if "Traceback" in node.stderr():
            break
    assert node.alive()
    node.wait_log(r"peer link refused \(incoming\): refused")
    no_tracebacks(node)
