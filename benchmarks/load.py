#!/usr/bin/env python3
"""Load generator for trichat's line protocol (JSON lines over TCP).

Modes (benchmarks/README.md explains the figures):
  pairs      N sender->receiver pairs, private messages at full speed, a window of unacked sends
  rate       the same pairs at a fixed total rate, spread evenly: latency at a known load
  broadcast  one sender broadcasting with a window to N logged-in receivers
  idle       N idle logged-in connections: the server's RSS growth per connection

With --servers 2 (pairs, rate, broadcast) the tool starts two linked servers (a mesh of two)
and puts every sender on server 0 and every receiver on server 1, so each message crosses the
peer link; CPU is summed over both servers and each one's share is shown.

Shape: the parent process owns the server(s) (starts and stops them, samples their CPU time
and RSS with psutil) and the measuring window; --procs worker processes own the client sockets
(asyncio protocols, orjson, one write per batch), so the generator and the server run on
different cores. Every clock here is time.monotonic_ns(): on Linux it is CLOCK_MONOTONIC,
shared by all processes, so the parent's window and the workers' timestamps agree.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import ipaddress
import math
import multiprocessing
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections import Counter, deque
from collections.abc import Iterator
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import orjson
import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
NS = 1_000_000_000
READY_TIMEOUT_S = 30.0  # how long a fresh server may take to print `ready`
STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this
GO_DELAY_S = 0.2  # lets every worker receive `go` before the common start time
LOGIN_CONCURRENCY = 64  # per worker: stays under the server's listen backlog
QUIET_S = 0.5  # no bytes for this long = the server has nothing more for us
IDLE_SETTLE_S = 1.0  # after the last login, let presence fan-out finish before reading RSS
RATE_TICK_S = 0.001  # the paced sender's clock tick
RATE_MAX_INFLIGHT = 4096  # per sender in rate mode: bounds memory if the server stalls
RESULT_SLACK_S = 60.0  # extra time allowed for workers to report after their own deadlines
LINK_TIMEOUT_S = 30.0  # how long two fresh servers may take to print their `linked` lines
PROBE_RETRY_S = 0.05  # --servers 2: pause between `status` probes of a not-yet-known receiver
MAX_ERROR_SAMPLES = 5
MODE_DEFAULTS = {  # mode: (clients, window)
    "pairs": (50, 32),
    "rate": (50, 32),
    "broadcast": (1000, 8),
    "idle": (1000, 0),
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a worker needs to know; pickled to each worker process."""

    mode: str
    host: str
    port: int
    clients: int  # pairs (pairs, rate), receivers (broadcast) or connections (idle)
    window: int
    rate: float
    warmup_s: float
    duration_s: float
    text_size: int
    procs: int
    prefix: str
    login_timeout_s: float
    drain_s: float
    servers: int = 1  # 2: senders log in at host:port (server 0), receivers at recv_host:recv_port
    recv_host: str = ""  # where receivers log in; "" = host
    recv_port: int = 0  # 0 = port

    def receiver_address(self) -> tuple[str, int]:
        return (self.recv_host or self.host, self.recv_port or self.port)


# --------------------------------------------------------------------------- worker side


class Stats:
    """One worker's counters. The measuring window is [w0, w1) in monotonic ns."""

    def __init__(self) -> None:
        self.w0 = self.w1 = 0  # empty until `go`: warm-up traffic is never recorded
        self.requests = self.requests_win = self.acked = 0
        self.delivered = self.delivered_win = 0
        self.latencies = array("q")  # ns, send -> delivery, deliveries inside the window only
        self.ack_latencies = array("q")  # ns, send -> `sent` (stored durably), same window
        self.reordered = self.gaps = self.foreign = 0
        self.presence = self.disconnected = self.skipped = self.echoes = 0
        self.errors: Counter[str] = Counter()
        self.error_samples: list[str] = []
        self.last_rx_ns = 0
        self.cpu_win_s = 0.0
        self.logins = 0
        self.login_s = 0.0

    def note_request(self, now: int) -> None:
        self.requests += 1
        if self.w0 <= now < self.w1:
            self.requests_win += 1

    def note_delivery(self, now: int, latency_ns: int) -> None:
        self.delivered += 1
        if self.w0 <= now < self.w1:
            self.delivered_win += 1
            self.latencies.append(latency_ns)

    def note_ack(self, now: int, sent_at: int) -> None:
        self.acked += 1
        if self.w0 <= now < self.w1:
            self.ack_latencies.append(now - sent_at)

    def note_error(self, who: str, event: dict[str, Any]) -> None:
        self.errors[str(event.get("code"))] += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(f"{who} got {orjson.dumps(event).decode()}")

    def export(self) -> dict[str, Any]:
        """A picklable snapshot; the latency array travels as raw bytes (cheap to pickle)."""
        out = dict(vars(self))
        out["latencies"] = self.latencies.tobytes()
        out["ack_latencies"] = self.ack_latencies.tobytes()
        out["errors"] = dict(self.errors)
        return out


class LoginError(Exception):
    """The server refused a login (name taken, bad name...) or dropped the connection."""


class Client(asyncio.Protocol):
    """One connection. Receivers ack private messages; a client with `target` also sends.

    The hot path is data_received: split lines, orjson-parse, react, and write everything the
    reactions produced (acks, new sends) in one transport.write, as a real client would.
    """

    def __init__(self, name: str, stats: Stats, target: str | None = None) -> None:
        self.name = name
        self.stats = stats
        self.welcomed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.closing = False
        self._tail = b""
        self._out: list[bytes] = []
        self.last_seq = 0  # highest sequence number seen from our (single) sender
        # Sender role, used only when target is set ("*" means broadcast).
        self.target = target
        self.window = 0
        self.refill = False  # True while the windowed sender should top up on every `sent`
        self.seq = 0
        self.pending: dict[int, int] = {}  # request id -> when sent (ns): the window
        self.pad = ""
        self.probe: asyncio.Future[bool] | None = None  # --servers 2: a `status` in flight

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing:
            self.stats.disconnected += 1
        if not self.welcomed.done():
            self.welcomed.set_exception(LoginError(f"{self.name}: connection closed ({exc})"))

    def data_received(self, data: bytes) -> None:
        self.stats.last_rx_ns = time.monotonic_ns()
        lines = (self._tail + data).split(b"\n")
        self._tail = lines.pop()
        for line in lines:
            if line.strip():
                try:
                    event = orjson.loads(line)
                except orjson.JSONDecodeError:
                    self.stats.note_error(self.name, {"code": "reply_not_json", "line": str(line)})
                    continue
                self.on_event(event)
        self.flush()

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "message":
            self.on_message(event)
        elif kind == "sent":
            self.on_sent(event)
        elif kind == "presence":
            self.stats.presence += 1
        elif kind == "welcome":
            if not self.welcomed.done():
                self.welcomed.set_result(None)
        elif kind == "error":
            self.on_error(event)
        elif kind == "status" and event.get("id") == "probe":
            self.answer_probe(event.get("online") is True)
        # receipt, users, typing...: read and dropped, as a client that ignores them would.

    def on_message(self, event: dict[str, Any]) -> None:
        if self.target is not None:
            # Our own broadcast: the protocol sends it only to the sender's *other*
            # connections, so count any copy apart from what receivers got.
            self.stats.echoes += 1
            return
        now = time.monotonic_ns()
        try:
            seq_text, stamp, _ = event["text"].split(" ", 2)
            seq, sent_at = int(seq_text), int(stamp)
        except (KeyError, ValueError, AttributeError):
            self.stats.foreign += 1  # not one of ours (someone else on a shared server)
            return
        self.stats.note_delivery(now, now - sent_at)
        self.check_order(seq)
        if event.get("to") != "*":
            # Acks cost the server work too (protocol: `received` -> `delivered` receipt).
            self._out.append(orjson.dumps({"type": "received", "msg": event.get("msg")}) + b"\n")

    def check_order(self, seq: int) -> None:
        """One sender per receiver, so sequence numbers must arrive as 1, 2, 3..."""
        if seq <= self.last_seq:
            self.stats.reordered += 1  # a duplicate or an overtaken message
            return
        self.stats.gaps += seq - self.last_seq - 1
        self.last_seq = seq

    def on_sent(self, event: dict[str, Any]) -> None:
        sent_at = self.pending.pop(event.get("id", 0), None)  # ids are ints from 1
        if sent_at is not None:
            self.stats.note_ack(time.monotonic_ns(), sent_at)
        if self.refill:
            self.fill()

    def answer_probe(self, online: bool) -> None:
        if self.probe is not None and not self.probe.done():
            self.probe.set_result(online)

    def on_error(self, event: dict[str, Any]) -> None:
        if event.get("id") == "probe" and event.get("code") == "no_such_user":
            self.answer_probe(False)  # the user's presence has not reached this server yet
            return
        self.stats.note_error(self.name, event)
        if event.get("id") == "login" and not self.welcomed.done():
            self.welcomed.set_exception(LoginError(f"{self.name}: {event}"))
        else:
            self.pending.pop(event.get("id", 0), None)  # a refused request frees its slot

    def send_one(self, now: int) -> None:
        """Queue one request; `now` is embedded so the receiver can compute the latency."""
        self.seq += 1
        self.pending[self.seq] = now
        request: dict[str, Any] = {"text": f"{self.seq} {now} {self.pad}", "id": self.seq}
        if self.target == "*":
            request["type"] = "broadcast"
        else:
            request["type"] = "send"
            request["to"] = self.target
        self._out.append(orjson.dumps(request) + b"\n")
        self.stats.note_request(now)

    def fill(self) -> None:
        now = time.monotonic_ns()
        while len(self.pending) < self.window:
            self.send_one(now)

    def write(self, obj: dict[str, Any]) -> None:
        self._out.append(orjson.dumps(obj) + b"\n")
        self.flush()

    def flush(self) -> None:
        if self._out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()


class Fleet:
    """A worker's clients: its share of the pairs, receivers or idle connections."""

    def __init__(self, plan: Plan, index: int) -> None:
        self.plan = plan
        self.index = index
        self.stats = Stats()
        self.clients: list[Client] = []  # everything opened, so close() misses nothing
        self.senders: list[Client] = []

    def my_numbers(self) -> range:
        """Client numbers this worker owns: every procs-th one, starting at its index."""
        return range(self.index, self.plan.clients, self.plan.procs)

    async def connect(self, name: str, target: str | None = None) -> Client:
        """Senders log in on server 0 (plan.host), receivers on the receivers' server."""
        loop = asyncio.get_running_loop()
        stats = self.stats
        host, port = (self.plan.host, self.plan.port) if target else self.plan.receiver_address()
        _, client = await loop.create_connection(lambda: Client(name, stats, target), host, port)
        self.clients.append(client)
        client.write({"type": "login", "user": name, "id": "login"})
        await client.welcomed
        self.stats.logins += 1
        return client

    async def connect_all(self, names: list[str], targets: dict[str, str] | None = None) -> None:
        """Log in `names` (senders if `targets` maps them to a target), concurrency bounded."""
        gate = asyncio.Semaphore(LOGIN_CONCURRENCY)
        targets = targets or {}

        async def one(name: str) -> None:
            async with gate:
                client = await self.connect(name, targets.get(name))
            if client.target is not None:
                self.senders.append(client)

        async with asyncio.timeout(self.plan.login_timeout_s), asyncio.TaskGroup() as group:
            for name in names:
                group.create_task(one(name))

    async def setup(self) -> None:
        """Log in before `go`: receivers first, so no send ever finds its target offline."""
        plan, mine = self.plan, self.my_numbers()
        if plan.mode == "idle":
            return  # idle logins are the measured work; they happen after `go`
        await self.connect_all([f"{plan.prefix}r{i}" for i in mine])
        if plan.mode == "broadcast":
            if self.index == 0:  # one broadcaster in the whole run
                await self.connect_all([f"{plan.prefix}b"], {f"{plan.prefix}b": "*"})
        else:
            names = {f"{plan.prefix}s{i}": f"{plan.prefix}r{i}" for i in mine}
            await self.connect_all(list(names), names)
        stamp_chars = len(f"{10**6} {time.monotonic_ns()} ")  # the "seq ns " prefix of a text
        pad = "x" * max(0, plan.text_size - stamp_chars)
        for sender in self.senders:
            sender.window, sender.pad = plan.window, pad
        if plan.servers > 1:
            await self.wait_receivers_known()

    async def wait_receivers_known(self) -> None:
        """Two servers: receivers are on server 1, and server 0 learns of them through the
        peer link. A send to a name server 0 does not know yet is `no_such_user`, so each
        sender asks `status` of its receiver(s) until server 0 says online (bounded)."""
        plan = self.plan
        if plan.mode == "broadcast":  # the broadcaster waits for every receiver of the run
            names = [f"{plan.prefix}r{i}" for i in range(plan.clients)]
        else:
            names = []
        deadline = asyncio.get_running_loop().time() + plan.login_timeout_s

        async def probe_all(sender: Client) -> None:
            for name in names or [sender.target or ""]:
                await self.until_online(sender, name, deadline)

        async with asyncio.TaskGroup() as group:
            for sender in self.senders:
                group.create_task(probe_all(sender))

    async def until_online(self, client: Client, name: str, deadline: float) -> None:
        """Ask `status` of `name` on the client's connection until it says online."""
        loop = asyncio.get_running_loop()
        while True:
            if loop.time() >= deadline:
                raise TimeoutError(f"server 0 still does not see {name} online (link down?)")
            client.probe = loop.create_future()
            client.write({"type": "status", "user": name, "id": "probe"})
            try:
                async with asyncio.timeout_at(deadline):
                    if await client.probe:
                        return
            except TimeoutError:
                raise TimeoutError(f"no answer to `status` of {name} from server 0") from None
            await asyncio.sleep(PROBE_RETRY_S)

    async def run(self, t0_ns: int) -> None:
        """Traffic from t0; record [t0+warmup, +duration); stop sending; drain."""
        plan, stats = self.plan, self.stats
        stats.w0 = t0_ns + int(plan.warmup_s * NS)
        stats.w1 = stats.w0 + int(plan.duration_s * NS)
        self.time_cpu_window()
        await sleep_until(t0_ns)
        if plan.mode == "idle":
            await self.run_idle()
            return
        if plan.mode == "rate":
            await self.run_paced(t0_ns)
        else:
            await self.run_windowed()
        await self.drain()

    def time_cpu_window(self) -> None:
        """Our own CPU use in the window shows whether the generator was the bottleneck."""
        loop = asyncio.get_running_loop()
        start = time.process_time()

        def at_start() -> None:
            nonlocal start
            start = time.process_time()

        def at_end() -> None:
            self.stats.cpu_win_s = time.process_time() - start

        loop.call_at(self.stats.w0 / NS, at_start)  # loop.time() is time.monotonic()
        loop.call_at(self.stats.w1 / NS, at_end)

    async def run_windowed(self) -> None:
        for sender in self.senders:
            sender.refill = True
            sender.fill()
            sender.flush()
        await sleep_until(self.stats.w1)
        for sender in self.senders:
            sender.refill = False

    async def run_paced(self, t0_ns: int) -> None:
        """Open loop: each tick sends what the rate says is due, round-robin over senders.

        Sends never wait for `sent`, so a slow server shows up as latency (no coordinated
        omission); RATE_MAX_INFLIGHT per sender only bounds memory, overflow is `skipped`.
        """
        senders, stats = self.senders, self.stats
        rate = self.plan.rate / self.plan.procs
        issued = turn = 0
        while senders and (now := time.monotonic_ns()) < stats.w1:
            due = int((now - t0_ns) * rate / NS) - issued
            for _ in range(due):
                sender = senders[turn]
                turn = (turn + 1) % len(senders)
                if len(sender.pending) < RATE_MAX_INFLIGHT:
                    sender.send_one(now)
                else:
                    stats.skipped += 1
            issued += due
            for sender in senders:
                sender.flush()
            await asyncio.sleep(RATE_TICK_S)

    async def drain(self) -> None:
        """Wait (bounded) until every send is answered and the server has gone quiet."""
        await self.wait_quiet(self.plan.drain_s, QUIET_S)

    async def wait_quiet(self, timeout_s: float, quiet_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        quiet_ns = int(quiet_s * NS)
        while time.monotonic() < deadline:
            busy = any(s.pending for s in self.senders)
            if not busy and time.monotonic_ns() - self.stats.last_rx_ns > quiet_ns:
                return
            await asyncio.sleep(0.05)

    async def run_idle(self) -> None:
        started = time.monotonic()
        await self.connect_all([f"{self.plan.prefix}i{i}" for i in self.my_numbers()])
        self.stats.login_s = time.monotonic() - started
        # Each login sends `presence` to everyone: wait until that fan-out has finished.
        await self.wait_quiet(self.plan.login_timeout_s, IDLE_SETTLE_S)

    def close(self) -> None:
        for client in self.clients:
            client.close()


async def sleep_until(deadline_ns: int) -> None:
    await asyncio.sleep(max(0.0, (deadline_ns - time.monotonic_ns()) / NS))


async def expect(ctl: Connection, kind: str, timeout_s: float) -> Any:
    """Wait for the parent's next message in a thread, so our sockets keep being read."""
    ready = await asyncio.to_thread(ctl.poll, timeout_s)
    if not ready:
        raise TimeoutError(f"no {kind!r} from the parent within {timeout_s:.0f} s")
    got, value = ctl.recv()
    if got != kind:
        raise RuntimeError(f"expected {kind!r} from the parent, got {got!r}")
    return value


async def work(plan: Plan, index: int, ctl: Connection) -> None:
    fleet = Fleet(plan, index)
    try:
        await fleet.setup()
        ctl.send(("ready", None))
        t0_ns = await expect(ctl, "go", plan.login_timeout_s * 2 + RESULT_SLACK_S)
        await fleet.run(t0_ns)
        ctl.send(("result", fleet.stats.export()))
        await expect(ctl, "close", RESULT_SLACK_S * 2)
    finally:
        fleet.close()


def worker_main(plan: Plan, index: int, ctl: Connection) -> None:
    """Entry point of a worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    die_with_parent()  # a killed parent (SIGKILL) must not leave us running to our deadlines
    try:
        asyncio.run(work(plan, index, ctl))
    except Exception as exc:  # the parent is blocked waiting on us: tell it why we stopped
        ctl.send(("fail", f"worker {index}: {exc!r}"))


# --------------------------------------------------------------------------- parent side


@dataclasses.dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    pid: int | None  # None: an external server we cannot sample
    output: ServerOutput | None = None  # None: an external server whose output we cannot see


@dataclasses.dataclass(frozen=True)
class Sample:
    t_ns: int
    cpu_s: float  # user + system, all threads of the server process
    rss: int


class ServerOutput(threading.Thread):
    """Reads the server's output so its pipe never fills; spots `ready` and `linked`; keeps a
    tail and the log lines of level WARNING and above."""

    READY = re.compile(r"\bready\b.*\bline=(\S+):(\d+).*\bpeer=(\S+):(\d+)")
    LINKED = re.compile(r"^linked peers=(\S*)$")
    PROBLEM = re.compile(r" (WARNING|ERROR|CRITICAL) ")

    def __init__(self, stream: Any) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.tail: deque[str] = deque(maxlen=40)
        self.address: tuple[str, int] | None = None
        self.peer_address = ""  # HOST:PORT of its peer listener
        self.ready = threading.Event()  # set on `ready` or at EOF
        self.eof = False
        self.peers: frozenset[str] = frozenset()  # from the latest `linked peers=...` line
        self.link_lines = 0  # `linked` lines so far: one per change of the set of peers
        self.problems = 0  # log lines of level WARNING or above
        self.problem_samples: list[str] = []  # the first few of them

    def run(self) -> None:
        for raw in self.stream:
            line = raw.decode(errors="replace").rstrip()
            self.tail.append(line)
            if self.PROBLEM.search(line):
                self.problems += 1
                if len(self.problem_samples) < MAX_ERROR_SAMPLES:
                    self.problem_samples.append(line)
            if linked := self.LINKED.match(line):
                self.peers = frozenset(p for p in linked[1].split(",") if p)
                self.link_lines += 1
            match = self.READY.search(line)
            if match and not self.ready.is_set():
                self.address = (match[1].strip("[]"), int(match[2]))
                self.peer_address = f"{match[3]}:{match[4]}"
                self.ready.set()
        self.eof = True
        self.ready.set()


def die_with_parent() -> None:
    """In the server child: ask Linux to SIGTERM it if we are killed without cleaning up."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


@contextlib.contextmanager
def own_server(
    extra: list[str], name: str = "bench", peer: str = "", env: dict[str, str] | None = None
) -> Iterator[Endpoint]:
    """Start `trichat serve` on free loopback ports and a temp dir; always stop it by pid.

    `peer`: HOST:PORT of another server's peer port to link to. `env`: the environment, which
    carries the cluster secret (never on a command line, where `ps` would show it)."""
    data = tempfile.mkdtemp(prefix="trichat-bench-")
    cmd = [sys.executable, "-m", "trichat", "serve", "--name", name, "--host", "127.0.0.1"]
    cmd += ["--port", "0", "--web-port", "0", "--peer-port", "0", "--data", data]
    cmd += ["--rate-limit", "0"]  # flood control off: we are the flood
    cmd += ["--peer", peer] if peer else []
    proc = subprocess.Popen(
        [*cmd, *extra],
        cwd=REPO_ROOT,  # so `-m trichat` finds the package even when it is not installed
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # `ready` may come on either stream
        start_new_session=True,  # Ctrl-C reaches us, and we stop the server ourselves
        preexec_fn=die_with_parent,
    )
    output = ServerOutput(proc.stdout)
    output.start()
    try:
        yield Endpoint(*wait_ready(proc, output), proc.pid, output)
    finally:
        stop_server(proc, output)
        shutil.rmtree(data, ignore_errors=True)


@contextlib.contextmanager
def own_servers(count: int, extra: list[str]) -> Iterator[list[Endpoint]]:
    """One server named `bench`, or `count` servers bench0, bench1... each linked to bench0
    with a fresh random cluster secret; returns once every server reports all the others
    linked. Every server started is stopped by pid on the way out, whatever happens."""
    if count == 1:
        with own_server(extra) as endpoint:
            yield [endpoint]
        return
    env = dict(os.environ, TRICHAT_CLUSTER_SECRET=secrets.token_hex(16))
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(own_server(extra, "bench0", env=env))
        assert first.output is not None
        seed = first.output.peer_address
        endpoints = [first]
        for index in range(1, count):
            server = own_server(extra, f"bench{index}", peer=seed, env=env)
            endpoints.append(stack.enter_context(server))
        wait_linked(endpoints)
        yield endpoints


def wait_linked(endpoints: list[Endpoint]) -> None:
    """Wait (at most LINK_TIMEOUT_S) until each server's last `linked` line names all the
    others."""
    names = [f"bench{i}" for i in range(len(endpoints))]
    deadline = time.monotonic() + LINK_TIMEOUT_S
    while True:
        missing = [
            f"{name} sees {sorted(e.output.peers)}, wants {sorted(set(names) - {name})}"
            for name, e in zip(names, endpoints, strict=True)
            if e.output is not None and e.output.peers != set(names) - {name}
        ]
        if not missing:
            return
        exited = [n for n, e in zip(names, endpoints, strict=True) if e.output and e.output.eof]
        if exited or time.monotonic() > deadline:
            why = f"{', '.join(exited)} exited" if exited else f"not within {LINK_TIMEOUT_S} s"
            tails = "\n".join(
                f"--- {name}:\n" + "\n".join(list(e.output.tail)[-10:])
                for name, e in zip(names, endpoints, strict=True)
                if e.output is not None
            )
            raise RuntimeError(f"servers not linked ({why}): {'; '.join(missing)}\n{tails}")
        time.sleep(0.05)


def wait_ready(proc: subprocess.Popen[bytes], output: ServerOutput) -> tuple[str, int]:
    if not output.ready.wait(READY_TIMEOUT_S) or output.address is None:
        tail = "\n".join(output.tail)
        raise RuntimeError(f"server not ready (exit code {proc.poll()}); its output:\n{tail}")
    return output.address


def stop_server(proc: subprocess.Popen[bytes], output: ServerOutput) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            print(f"server ignored SIGTERM for {STOP_GRACE_S} s; killing it", file=sys.stderr)
            proc.kill()
            proc.wait(STOP_GRACE_S)
    output.join(1.0)
    if proc.returncode not in (0, -signal.SIGTERM):
        tail = "\n".join(list(output.tail)[-10:])
        print(f"server exited with code {proc.returncode}; last output:\n{tail}", file=sys.stderr)


def sample(process: psutil.Process | None) -> Sample | None:
    if process is None:
        return None
    with process.oneshot():
        times, rss = process.cpu_times(), process.memory_info().rss
    return Sample(time.monotonic_ns(), times.user + times.system, rss)


def sample_all(processes: list[psutil.Process | None]) -> list[Sample | None]:
    return [sample(process) for process in processes]


def combined(samples: list[Sample | None]) -> Sample | None:
    """All servers as one: CPU and RSS summed, at the first one's time (they are read
    back to back, microseconds apart). None if any server cannot be sampled."""
    if not samples or any(s is None for s in samples):
        return None
    present = [s for s in samples if s is not None]
    return Sample(present[0].t_ns, sum(s.cpu_s for s in present), sum(s.rss for s in present))


@dataclasses.dataclass
class Worker:
    process: Any  # multiprocessing's SpawnProcess
    ctl: Connection


def start_workers(plan: Plan) -> list[Worker]:
    # spawn, not fork: the parent has a reader thread, and fork copies only one thread.
    ctx = multiprocessing.get_context("spawn")
    workers = []
    for index in range(plan.procs):
        mine, theirs = ctx.Pipe()
        process = ctx.Process(target=worker_main, args=(plan, index, theirs), daemon=True)
        process.start()
        theirs.close()  # only the child holds it now, so its death reads as EOF here
        workers.append(Worker(process, mine))
    return workers


def collect(workers: list[Worker], kind: str, timeout_s: float) -> list[Any]:
    """One `kind` message from every worker within the timeout; a worker failure raises."""
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    while len(results) < len(workers):
        left = deadline - time.monotonic()
        pending = [w for i, w in enumerate(workers) if i not in results]
        if left <= 0 or not wait([w.ctl for w in pending], left):
            raise TimeoutError(f"workers did not report {kind!r} within {timeout_s:.0f} s")
        for index, worker in enumerate(workers):
            if index not in results and worker.ctl.poll():
                got, value = recv_from(worker)
                if got == "fail":
                    raise RuntimeError(value)
                results[index] = value
    return [results[i] for i in range(len(workers))]


def recv_from(worker: Worker) -> tuple[str, Any]:
    try:
        message: tuple[str, Any] = worker.ctl.recv()
    except EOFError:
        return "fail", f"worker died (exit code {worker.process.exitcode})"
    return message


def stop_workers(workers: list[Worker]) -> None:
    for worker in workers:
        with contextlib.suppress(OSError):
            worker.ctl.send(("close", None))
    for worker in workers:
        worker.process.join(5.0)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(5.0)


def sleep_until_ns(deadline_ns: int) -> None:
    time.sleep(max(0.0, (deadline_ns - time.monotonic_ns()) / NS))


def measure(plan: Plan, endpoints: list[Endpoint]) -> dict[str, Any]:
    """Run the workers through login, go, the window and the drain; return the summary."""
    processes = [psutil.Process(e.pid) if e.pid else None for e in endpoints]
    outputs = [e.output for e in endpoints]
    links_before = [o.link_lines if o else 0 for o in outputs]
    workers = start_workers(plan)
    try:
        collect(workers, "ready", plan.login_timeout_s + RESULT_SLACK_S)
        before = combined(sample_all(processes))
        t0_ns = time.monotonic_ns() + int(GO_DELAY_S * NS)
        for worker in workers:
            worker.ctl.send(("go", t0_ns))
        if plan.mode == "idle":
            results = collect(workers, "result", plan.login_timeout_s * 2 + RESULT_SLACK_S)
            after = combined(sample_all(processes))  # connections still open: workers await
            summary = summarize(plan, results, before, after)
        else:
            w0 = t0_ns + int(plan.warmup_s * NS)
            sleep_until_ns(w0)
            starts = sample_all(processes)
            sleep_until_ns(w0 + int(plan.duration_s * NS))
            ends = sample_all(processes)
            results = collect(workers, "result", plan.drain_s + RESULT_SLACK_S)
            start, end = combined(starts), combined(ends)
            summary = summarize(plan, results, start, end)
            summary["server_rss_mib"] = None if end is None else round(end.rss / 2**20, 1)
            if len(endpoints) > 1:
                summary.update(per_server_figures(starts, ends, summary["delivered"]))
        summary.update(server_health(endpoints, links_before))
        return summary
    finally:
        stop_workers(workers)


def server_health(endpoints: list[Endpoint], links_before: list[int]) -> dict[str, Any]:
    """What the servers' own output said, read after the drain and before they are stopped
    (stopping logs warnings of its own): log lines of level WARNING and above since each
    server started, and (several servers) `linked` lines since the workers started, i.e.
    peer links that dropped or came back during the run."""
    health: dict[str, Any] = {}
    named = [(f"server{i}", e.output) for i, e in enumerate(endpoints)]
    if len(endpoints) > 1:
        health["peer_link_changes"] = sum(
            o.link_lines - n for (_, o), n in zip(named, links_before, strict=True) if o
        )
    health["server_log_warnings"] = {name: o.problems for name, o in named if o and o.problems}
    health["server_log_samples"] = [
        f"{name}: {line}" for name, o in named if o for line in o.problem_samples
    ]
    return health


def per_server_figures(
    starts: list[Sample | None], ends: list[Sample | None], delivered: int
) -> dict[str, Any]:
    """Each server's CPU (per delivered message, % of a core, share of the total) and RSS."""
    figures: dict[str, Any] = {}
    pairs = list(zip(starts, ends, strict=True))
    total = sum(e.cpu_s - s.cpu_s for s, e in pairs if s is not None and e is not None)
    for index, (first, last) in enumerate(pairs):
        name = f"server{index}"
        if first is None or last is None:
            figures[f"{name}_cpu_pct"] = None
            continue
        used = last.cpu_s - first.cpu_s
        figures[f"{name}_cpu_us_per_delivered"] = per_item_us(first, last, delivered)
        figures[f"{name}_cpu_pct"] = cpu_pct(first, last)
        figures[f"{name}_cpu_share_pct"] = round(100 * used / total, 1) if total else None
        figures[f"{name}_rss_mib"] = round(last.rss / 2**20, 1)
    return figures


# --------------------------------------------------------------------------- figures


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"errors": Counter(), "error_samples": []}
    total.update(latencies=array("q"), ack_latencies=array("q"))
    for result in results:
        for key, value in result.items():
            if key in ("latencies", "ack_latencies"):
                total[key].frombytes(value)
            elif key == "errors":
                total[key].update(value)
            elif key == "error_samples":
                total[key].extend(value)
            elif key in ("cpu_win_s", "login_s"):
                total[key] = max(total.get(key, 0.0), value)  # busiest worker / slowest
            elif key not in ("w0", "w1", "last_rx_ns"):
                total[key] = total.get(key, 0) + value
    return total


def percentile_ms(ordered: list[int], fraction: float) -> float | None:
    """Nearest-rank percentile of sorted ns values, in ms."""
    if not ordered:
        return None
    rank = max(0, math.ceil(fraction * len(ordered)) - 1)
    return round(ordered[rank] / 1e6, 3)


def per_item_us(first: Sample | None, last: Sample | None, items: int) -> float | None:
    if first is None or last is None or items == 0:
        return None
    return round((last.cpu_s - first.cpu_s) * 1e6 / items, 1)


def summarize(
    plan: Plan, results: list[dict[str, Any]], first: Sample | None, last: Sample | None
) -> dict[str, Any]:
    total = merge(results)
    summary: dict[str, Any] = {"mode": plan.mode, "clients": plan.clients, "procs": plan.procs}
    if plan.servers > 1:
        summary["servers"] = plan.servers
    if plan.mode == "idle":
        summary.update(idle_figures(plan, total, first, last))
    else:
        summary.update(traffic_figures(plan, total, first, last))
    summary["errors"] = dict(total["errors"])
    summary["error_samples"] = total["error_samples"]
    summary["disconnected_by_server"] = total["disconnected"]
    return summary


def traffic_figures(
    plan: Plan, total: dict[str, Any], first: Sample | None, last: Sample | None
) -> dict[str, Any]:
    ordered = sorted(total["latencies"])
    acks = sorted(total["ack_latencies"])
    delivered = total["delivered_win"]
    seconds = plan.duration_s if first is None or last is None else (last.t_ns - first.t_ns) / NS
    return {
        "sent": total["requests_win"],
        "delivered": delivered,
        "delivered_per_s": round(delivered / seconds, 1),
        "p50_ms": percentile_ms(ordered, 0.50),
        "p99_ms": percentile_ms(ordered, 0.99),
        "max_ms": percentile_ms(ordered, 1.0),
        "sent_p50_ms": percentile_ms(acks, 0.50),
        "sent_p99_ms": percentile_ms(acks, 0.99),
        "server_cpu_us_per_delivered": per_item_us(first, last, delivered),
        "server_cpu_pct": None if last is None or first is None else cpu_pct(first, last),
        "generator_cpu_pct": round(100 * total["cpu_win_s"] / plan.duration_s, 1),
        # Whole run (warm-up + window + drain): correctness rather than speed.
        "run_requests": total["requests"],
        "run_acked": total["acked"],
        "run_missing": total["acked"] * receivers_per_message(plan) - total["delivered"],
        "run_reordered": total["reordered"],
        "run_gaps": total["gaps"],
        "run_skipped": total["skipped"],
        "run_sender_echoes": total["echoes"],
        "run_foreign": total["foreign"],
    }


def receivers_per_message(plan: Plan) -> int:
    return plan.clients if plan.mode == "broadcast" else 1


def cpu_pct(first: Sample, last: Sample) -> float:
    return round(100 * (last.cpu_s - first.cpu_s) / ((last.t_ns - first.t_ns) / NS), 1)


def idle_figures(
    plan: Plan, total: dict[str, Any], first: Sample | None, last: Sample | None
) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "logged_in": total["logins"],
        "login_s": round(total["login_s"], 2),
        "presence_events": total["presence"],
    }
    if first is not None and last is not None:
        figures["rss_before_mib"] = round(first.rss / 2**20, 1)
        figures["rss_after_mib"] = round(last.rss / 2**20, 1)
        figures["rss_kib_per_conn"] = round((last.rss - first.rss) / 1024 / plan.clients, 1)
        figures["server_cpu_us_per_login"] = per_item_us(first, last, total["logins"])
    return figures


def show(summary: dict[str, Any]) -> None:
    """Print the summary as aligned `name: value` lines, skipping empty extras."""
    width = max(len(key) for key in summary)
    for key, value in summary.items():
        if value in ({}, []):
            continue
        shown = "n/a (no --server-pid)" if value is None else value
        print(f"{key:<{width}}  {shown}")


# --------------------------------------------------------------------------- CLI


def loopback_endpoint(text: str) -> tuple[str, int]:
    """Parse HOST:PORT and refuse anything that is not this machine's loopback."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if host != "localhost" and not ipaddress.ip_address(host or "0.0.0.0").is_loopback:
        raise argparse.ArgumentTypeError(f"{text}: only loopback servers may be loaded")
    return host, int(port)


def raise_open_files(needed: int) -> None:
    """Each client is a socket, and so is each server side: lift the soft fd limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        print(f"warning: open-files limit {target} < {needed} needed", file=sys.stderr)


# (flag, type, default, help); None = no default, or one that depends on the mode.
OPTIONS: list[tuple[str, Any, Any, str]] = [
    (
        "--clients",
        int,
        None,
        "pairs (pairs, rate), receivers (broadcast) or connections (idle);"
        " default 50, 50, 1000, 1000",
    ),
    ("--window", int, None, "unacked sends per sender; default 32, broadcast 8"),
    ("--rate", float, 1000.0, "rate mode: total messages per second"),
    ("--duration", float, 10.0, "seconds measured"),
    ("--warmup", float, 2.0, "seconds of traffic before measuring"),
    ("--text-size", int, 64, "characters of message text"),
    ("--procs", int, 1, "client worker processes"),
    ("--server-pid", int, None, "pid of --server, to read its CPU time and RSS"),
    ("--prefix", str, f"lg{os.getpid() % 100000}", "user name prefix"),
    ("--login-timeout", float, 120.0, "seconds allowed for all logins"),
    ("--drain", float, 10.0, "seconds allowed for in-flight messages after the window"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Load generator for trichat's line protocol (loopback only)."
    )
    parser.add_argument("mode", choices=list(MODE_DEFAULTS))
    for flag, kind, default, text in OPTIONS:
        shown = text if default is None else f"{text} (default {default})"
        parser.add_argument(flag, type=kind, default=default, help=shown)
    parser.add_argument(
        "--server",
        type=loopback_endpoint,
        metavar="HOST:PORT",
        help="use this running server instead of starting one",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for the server this tool starts (repeatable), e.g."
        " --server-arg=--store-batch-max=64",
    )
    parser.add_argument(
        "--servers",
        type=int,
        choices=[1, 2],
        default=1,
        help="2: start two linked servers, senders on the first, receivers on the second"
        " (pairs, rate, broadcast; not with --server) (default 1)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    if args.servers > 1 and args.mode == "idle":
        parser.error("--servers 2 is for pairs, rate and broadcast")
    if args.servers > 1 and args.server is not None:
        parser.error("--servers 2 starts its own servers; it cannot be used with --server")
    return args


def make_plan(args: argparse.Namespace, endpoints: list[Endpoint]) -> Plan:
    """Senders use the first server; receivers the last (the same one when there is one)."""
    clients, window = MODE_DEFAULTS[args.mode]
    return Plan(
        mode=args.mode,
        host=endpoints[0].host,
        port=endpoints[0].port,
        servers=len(endpoints),
        recv_host=endpoints[-1].host,
        recv_port=endpoints[-1].port,
        clients=args.clients or clients,
        window=args.window or window,
        rate=args.rate,
        warmup_s=args.warmup,
        duration_s=args.duration,
        text_size=args.text_size,
        procs=max(1, args.procs),
        prefix=args.prefix,
        login_timeout_s=args.login_timeout,
        drain_s=args.drain,
    )


@contextlib.contextmanager
def servers_for(args: argparse.Namespace) -> Iterator[list[Endpoint]]:
    if args.server is None:
        with own_servers(args.servers, args.server_arg) as endpoints:
            yield endpoints
        return
    if args.server_pid is not None and not psutil.pid_exists(args.server_pid):
        raise SystemExit(f"--server-pid {args.server_pid}: no such process")
    yield [Endpoint(args.server[0], args.server[1], args.server_pid)]


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Explicit handlers: a shell starts background jobs with SIGINT ignored (and Python keeps
    # it so), and SIGTERM would otherwise end us without stopping the servers and workers.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, interrupt)
    raise_open_files((args.clients or MODE_DEFAULTS[args.mode][0]) * 2 + 256)
    try:
        with servers_for(args) as endpoints:
            plan = make_plan(args, endpoints)
            summary = measure(plan, endpoints)
    except (RuntimeError, TimeoutError, OSError) as exc:  # the cleanup above has already run
        print(f"load.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(orjson.dumps(summary).decode())
    else:
        show(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
