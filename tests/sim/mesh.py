"""A simulated mesh: several servers' routing cores (:class:`~trichat.hub.Hub`) in one
process, over a simulated network, on a fake clock.

What is real: every Hub, and the peer wire format (each peer message is encoded with
``peerproto.encode_peer`` when a hub emits it and decoded with ``peerproto.decode_peer``
when it is delivered). What is simulated, the way the shells (service.py, peers.py,
store.py) behave:

- **Links.** Between every pair of servers one physical link carrying two directed FIFO
  queues of encoded lines. Cutting it (a partition, or a TCP reset) loses what is in flight
  both ways. Each end notices on its own (``Notice``; peers.py: a read error or
  PEER_TIMEOUT_S of silence) and then calls ``hub.peer_down``; until it does, what it sends
  is lost. When the link comes back both ends call ``hub.peer_up``; an end that never
  noticed the old link die gets ``peer_up`` without a ``peer_down`` first (peers.py replaces
  a stale link that way). No PeerLink handshake: links are up or down.
- **Storage.** One durable store per server (kept across crashes), worked in order like
  store.py's queue: each operation's callback (``message_stored``, ``receipt_stored``,
  ``backlog_loaded``, an ``AfterStored`` barrier) runs after the effects before it. By
  default all of them run before the next step (storage is synchronous as far as the
  schedule can tell); with ``lazy_storage`` they wait for ``Flush`` steps, so peer traffic
  and link changes land between a request and its storage callback, as with a real disk.
- **Clients.** Connections are ints, unique across the mesh; a client records every event
  it is sent. ``Close`` marks a connection closing; the hub hears ``disconnect`` later
  (``Reap``), as service.py's close_connection does once the connection's tasks end.
- **Crashes.** A server loses every link and its memory (a fresh Hub with a new incarnation,
  its store's accounts and next sequence number, no connections); its clients are gone.
  Its links come back with ``Heal``.

A schedule is a list of :data:`Step` values; :func:`run_schedule` plays one, then heals
every link and delivers everything until nothing moves (quiescence), and
:meth:`Mesh.violations` lists what broke the contract. Steps name clients and links by
index, modulo what exists at that moment, so every list of steps is a valid schedule (and
hypothesis can shrink them freely).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import attrs
from hypothesis import strategies as st

from trichat import messages, peerproto
from trichat.accounts import AccountRecord
from trichat.effects import OwedReceipt
from trichat.errors import ProtocolError
from trichat.hub import (
    AfterStored,
    Backlog,
    ClaimSettled,
    Close,
    Deliver,
    DropBacklog,
    Effect,
    FetchBacklog,
    Hub,
    OweReceipts,
    OweToPeer,
    PushBacklog,
    ReceiptsTold,
    Reply,
    SaveLastSeen,
    SendOwedToPeer,
    StoreAccounts,
    StoredMessage,
    StoreMessage,
    StoreReceipt,
    ToPeers,
)
from trichat.messages import Event
from trichat.names import name_key
from trichat.registration import Registration

SERVERS = ("s0", "s1", "s2", "s3")
ACCOUNTS = ("Acc",)  # registered on s0 (or, with accounts_everywhere, stored on every server)
NAMES = ("ann", "bob", "BOB", "cy", "dan", "Acc", "acc")  # guests, case variants, an account
NEW_ACCOUNTS = ("cy", "dan", "Dan")  # what Register steps may register
T0 = 1_700_000_000_000
PASSWORD = "pw"  # the shell checks passwords; the hub only asks whether one was given
SEED_ACCOUNTS = tuple(
    AccountRecord(f"{i:016x}", name, "hash", T0 - 1000, "s0", i + 1)
    for i, name in enumerate(ACCOUNTS)
)

# Known bugs in the routing core (trichat/hub.py, trichat/mesh.py), each with a strict xfail
# in test_mesh.py, would be listed here with the exact condition under which the property
# test excuses them. None is known now.
KNOWN_BUGS: tuple[str, ...] = ()

# --- steps ----------------------------------------------------------------------------


@attrs.frozen
class Login:
    server: int
    name: str
    text_mode: bool = False  # text mode: every message shown counts as received


@attrs.frozen
class Register:
    """Register ``name`` on ``server`` (the password is the shell's business) and log in."""

    server: int
    name: str


@attrs.frozen
class Logout:
    conn: int  # an index into the live connections, modulo their number


@attrs.frozen
class Send:
    conn: int
    to: str


@attrs.frozen
class SendTo:
    """Send to the user of another live connection (``to``: an index, like ``conn``)."""

    conn: int
    to: int


@attrs.frozen
class Broadcast:
    conn: int


@attrs.frozen
class Ack:
    conn: int
    pick: int  # which message the connection received (modulo)
    read: bool = False


@attrs.frozen
class Typing:
    conn: int
    to: str


@attrs.frozen
class Reap:
    """Connections told to close are gone: the hubs hear ``disconnect``."""


@attrs.frozen
class DeliverLink:
    link: int  # an index into the directed links, modulo their number
    count: int = 1


@attrs.frozen
class Cut:
    """The link between ``a`` and ``b`` dies; each end may notice at once (a reset) or
    later (a silent partition: ``Notice``, or the next ``Heal``)."""

    a: int
    b: int
    notice_a: bool = False
    notice_b: bool = False


@attrs.frozen
class Quiet:
    """Everything in flight on live links is delivered, storage catches up, closes are
    reaped: the mesh is quiet (links stay as they are)."""


@attrs.frozen
class Notice:
    """Server ``a`` notices that its link to ``b`` is dead (if it is)."""

    a: int
    b: int


@attrs.frozen
class Heal:
    a: int
    b: int
    replace_a: bool = False  # an end that never noticed the old link: peer_up only
    replace_b: bool = False


@attrs.frozen
class Crash:
    server: int


@attrs.frozen
class Tick:
    ms: int


@attrs.frozen
class Flush:
    """Server ``server``'s storage finishes ``count`` operations (lazy storage only)."""

    server: int
    count: int = 1


Step = (
    Login
    | Register
    | Logout
    | Send
    | SendTo
    | Broadcast
    | Ack
    | Typing
    | Reap
    | Quiet
    | DeliverLink
    | Cut
    | Notice
    | Heal
    | Crash
    | Tick
    | Flush
)


def steps() -> st.SearchStrategy[Step]:
    """One step of a schedule: deliveries, logins and sends are common, crashes rare."""
    idx = st.integers(0, 7)
    name = st.sampled_from(NAMES)
    weighted = [
        # First: what shrinking turns a step it can't remove into.
        (1, st.builds(Tick, st.sampled_from([1, 1, 2, 50, 5000]))),
        (4, st.builds(Login, idx, name, st.booleans())),
        (2, st.builds(Send, idx, name)),
        (1, st.builds(Register, idx, st.sampled_from(NEW_ACCOUNTS))),
        (5, st.builds(SendTo, idx, idx)),
        (1, st.builds(Logout, idx)),
        (1, st.builds(Broadcast, idx)),
        (1, st.builds(Ack, idx, idx, st.booleans())),
        (1, st.builds(Typing, idx, name)),
        (1, st.just(Reap())),
        (1, st.just(Quiet())),
        (2, st.builds(Cut, idx, idx, st.booleans(), st.booleans())),
        (1, st.builds(Notice, idx, idx)),
        (2, st.builds(Heal, idx, idx, st.booleans(), st.booleans())),
        (3, st.builds(Flush, idx, st.integers(1, 3))),
        (8, st.builds(DeliverLink, st.integers(0, 11), st.integers(1, 4))),
    ]
    # one_of would drop repeated strategies: weigh by repeating them in sampled_from.
    table = [s for weight, s in weighted for _ in range(weight * 2)] + [st.builds(Crash, idx)]
    return st.sampled_from(table).flatmap(lambda strategy: strategy)


@st.composite
def schedules(draw: st.DrawFn, max_steps: int = 80) -> list[Step]:
    """Long enough for something to happen (left alone, hypothesis draws lists of ~5), and
    still shrinkable to a few steps: the length is drawn first."""
    size = draw(st.integers(0, max_steps))
    return draw(st.lists(steps(), min_size=size, max_size=size))


# --- the simulated world ----------------------------------------------------------------


@attrs.define
class Row:
    stored: StoredMessage
    seq: int
    stamp: int  # when it was stored, on the mesh's event counter
    delivered: bool = False
    read: bool = False
    dropped: bool = False
    owed: int = 0  # receipts kept for an absent sender (1 delivered, 2 read)
    times: dict[str, int] = attrs.Factory(dict)  # status -> when


@attrs.define
class Storage:
    """One server's database (database.py): it survives crashes."""

    accounts: dict[str, AccountRecord] = attrs.Factory(dict)
    rows: dict[str, Row] = attrs.Factory(dict)
    top_seq: int = 0
    kept: dict[str, dict[tuple[str, str, str], peerproto.PeerReceipt]] = attrs.Factory(dict)

    def insert(self, stored: StoredMessage, seq: int, stamp: int) -> None:
        assert stored.msg not in self.rows, f"message id {stored.msg} stored twice"
        self.rows[stored.msg] = Row(stored, seq, stamp)
        self.top_seq = max(self.top_seq, seq)

    def mark(self, msg: str, uid: str, status: str, ts: int) -> tuple[str, str] | None:
        """database.py's MarkReceipt: (sender, sender_uid) if this receipt is news."""
        row = self.rows.get(msg)
        if row is None or row.dropped or row.stored.to_uid != uid:
            return None
        if status == "delivered":
            if row.delivered:
                return None
            row.delivered = True
        else:
            if row.read:
                return None
            row.read = row.delivered = True
            row.times.setdefault("delivered", ts)
        row.times[status] = ts
        return row.stored.sender, row.stored.sender_uid

    def backlog(self, uid: str) -> Backlog:
        rows = sorted(self.rows.values(), key=lambda r: r.seq)
        backlog = Backlog([r.stored for r in rows if r.stored.to_uid == uid and not r.delivered])
        for r in rows:
            if r.stored.sender_uid == uid and r.owed:
                if r.owed & 1 and r.delivered:
                    backlog.receipts.append(
                        OwedReceipt(r.stored.msg, "delivered", r.stored.to, 0, 1)
                    )
                if r.owed & 2 and r.read:
                    backlog.receipts.append(OwedReceipt(r.stored.msg, "read", r.stored.to, 0, 2))
        return backlog

    def drop(self, uid: str) -> None:
        for row in self.rows.values():
            if row.stored.to_uid == uid and not row.delivered:
                row.delivered = row.dropped = True

    def owe(self, receipts: list[tuple[str, int]], owed: bool) -> None:
        for msg, bits in receipts:
            row = self.rows[msg]
            row.owed = row.owed | bits if owed else row.owed & ~bits

    def keep(self, server: str, receipt: peerproto.PeerReceipt) -> None:
        key = (receipt.msg, receipt.uid, receipt.status)
        self.kept.setdefault(server, {}).setdefault(key, receipt)

    def take(self, server: str) -> list[peerproto.PeerReceipt]:
        return list(self.kept.pop(server, {}).values())


@attrs.define
class PendingRegistration:
    """A Register step under way (service.py's _register): claiming, then announcing."""

    reg: Registration
    phase: str = "claim"  # "claim": waiting for claim replies; "announce": for the record's
    record: AccountRecord | None = None


@attrs.define(eq=False)
class Server:
    name: str
    hub: Hub
    storage: Storage
    incarnation: int = 0
    believes_up: set[str] = attrs.Factory(set)  # peers it called peer_up for, not peer_down
    queue: deque[Callable[[], list[Effect]]] = attrs.Factory(deque)  # storage callbacks
    registering: list[PendingRegistration] = attrs.Factory(list)


@attrs.define(eq=False)
class Client:
    id: int
    server: str
    incarnation: int
    name: str
    account: bool
    text_mode: bool
    since: int
    stamp: int  # when it logged in, on the mesh's event counter
    uid: str  # the account's id, or the guest session's (protocol.md "Identities")
    closing: bool = False  # told to close (logout, kicked); the hub may not know yet
    dead: bool = False  # the hub knows it is gone, or its server crashed
    kicked: bool = False
    events: list[tuple[Event, object]] = attrs.Factory(list)
    late: list[str] = attrs.Factory(list)  # messages sent to it while it was closing
    view: dict[str, tuple[str, tuple[str, ...]]] = attrs.Factory(dict)  # presence as told

    @property
    def key(self) -> str:
        return name_key(self.name)

    @property
    def live(self) -> bool:
        return not (self.closing or self.dead)

    def view_matches(self, where: dict[str, tuple[str, ...]]) -> bool:
        """Whether what this client was told (its welcome names one server a user is on,
        presence events all of them) adds up to ``where``."""
        return set(self.view) == set(where) and all(
            servers == (where[key] if kind == "all" else where[key][:1])
            for key, (kind, servers) in self.view.items()
        )

    def private_messages(self) -> list[messages.Message]:
        return [e for e, _ in self.events if isinstance(e, messages.Message) and e.to != "*"]


@attrs.define
class PendingSend:
    """A ``send`` waiting for its ``sent``."""

    sender_conn: int
    server: str
    incarnation: int


@attrs.define
class SendRecord:
    """A private message whose sender was told ``sent``: every connection of its recipient
    identity that is live in the end must get it, unless one of them acknowledged it."""

    msg: str
    index: int  # order of sending, mesh-wide
    sender_conn: int
    server: str
    incarnation: int
    stored: StoredMessage
    acked: bool = False  # a connection of the recipient answered received or read


@attrs.define
class BroadcastRecord:
    msg: str
    index: int  # order of sending, mesh-wide (shared with SendRecord.index)
    sender_conn: int
    sender: str
    text: str


@attrs.define
class Claim:
    """A connection holding a name."""

    key: str
    since: int
    server: str
    conn: int
    account: bool

    @property
    def rank(self) -> tuple[int, str]:
        return (self.since, self.server)


class Mesh:
    """``n`` servers s0.. linked to each other, and their clients.

    Args:
        n: how many servers (2-4).
        lazy_storage: storage callbacks wait for ``Flush`` steps.
        strict: owe messages even where a known bug (see KNOWN_BUGS) would lose them
            (none is known: strict and default modes check the same).
        accounts_everywhere: the accounts are registered on every server (as replicated
            accounts would be); otherwise only on s0, as protocol.md "What the mesh does
            not do yet" says, and their names are guest names elsewhere.
    """

    def __init__(
        self,
        n: int,
        *,
        lazy_storage: bool = False,
        strict: bool = False,
        accounts_everywhere: bool = False,
    ) -> None:
        assert 2 <= n <= len(SERVERS)
        self.lazy_storage = lazy_storage
        self.strict = strict
        self.now = T0
        self.servers: dict[str, Server] = {}
        for name in SERVERS[:n]:
            home = accounts_everywhere or name == SERVERS[0]
            storage = Storage({r.uid: r for r in SEED_ACCOUNTS} if home else {})
            self.servers[name] = Server(name, self._new_hub(name, storage, 0), storage)
        self.names = list(self.servers)
        self.pairs = [(a, b) for a in self.names for b in self.names if a < b]
        self.links = [(a, b) for a in self.names for b in self.names if a != b]
        self.alive: dict[tuple[str, str], bool] = dict.fromkeys(self.pairs, False)
        self.wires: dict[tuple[str, str], deque[bytes]] = {pair: deque() for pair in self.links}
        self.clients: dict[int, Client] = {}
        self._ids = itertools.count(1)
        self._req_ids = itertools.count(1)
        self._stamps = itertools.count(1)  # orders logins and stores
        self._uids = itertools.count(1000)  # account ids made by Register steps
        self.pending_closes: list[int] = []
        self.records: dict[str, SendRecord] = {}
        self.pending_sends: dict[int, PendingSend] = {}  # by request id
        self.pending_broadcasts: dict[int, BroadcastRecord] = {}  # by request id
        self.broadcasts: dict[str, BroadcastRecord] = {}  # by message id
        self.typings: set[tuple[str, str]] = set()  # (sender key, to key)
        self.claims: dict[int, Claim] = {}
        self.registered: dict[str, AccountRecord] = {}  # uid -> every account made
        self.register_refused = 0
        self.log: list[str] = []
        self.lost_lines = 0
        for a, b in self.pairs:
            self._heal(a, b, replace_a=False, replace_b=False)
        self.quiesce()  # a schedule starts on a linked mesh that agrees on its accounts

    @staticmethod
    def _new_hub(name: str, storage: Storage, incarnation: int) -> Hub:
        return Hub(
            name,
            accounts=storage.accounts.values(),
            next_seq=storage.top_seq + 1,
            incarnation=f"i{incarnation}",
        )

    # --- helpers ----------------------------------------------------------------------

    def live_clients(self) -> list[Client]:
        return [c for c in self.clients.values() if c.live]

    def _pick(self, index: int) -> Client | None:
        live = self.live_clients()
        return live[index % len(live)] if live else None

    def _server(self, index: int) -> Server:
        return self.servers[self.names[index % len(self.names)]]

    def _pair(self, a: int, b: int) -> tuple[str, str] | None:
        x, y = self.names[a % len(self.names)], self.names[b % len(self.names)]
        return None if x == y else (min(x, y), max(x, y))

    def _note(self, text: str) -> None:
        self.log.append(f"[{self.now - T0}] {text}")

    # --- carrying out effects ----------------------------------------------------------

    def _run(self, srv: Server, effects: list[Effect]) -> None:
        """Carry out effects, then (unless storage is lazy) every storage callback they
        queued, in order."""
        self._apply(srv, effects)
        if not self.lazy_storage:
            self._flush(srv, None)
        self._progress(srv)

    def _flush(self, srv: Server, count: int | None) -> None:
        done = 0
        while srv.queue and (count is None or done < count):
            done += 1
            self._apply(srv, srv.queue.popleft()())

    def _apply(self, srv: Server, effects: Iterable[Effect]) -> None:
        for effect in effects:
            match effect:
                case Reply(conn=conn, event=event, req_id=req_id):
                    self._to_client(srv, conn, event, req_id)
                case Deliver(conns=conns, event=event):
                    for conn in conns:
                        self._to_client(srv, conn, event, None)
                case ToPeers(servers=servers, message=message):
                    line = peerproto.encode_peer(message)
                    for dst in servers:
                        self._send_line(srv, dst, line)
                case Close(conn=conn, bye=bye):
                    client = self._client_of(srv, conn)
                    if client.live:
                        client.closing = True
                        client.kicked = bye.reason == "name_taken"
                        self.pending_closes.append(conn)
                        self._note(f"{srv.name}: close c{conn} ({bye.reason})")
                case ClaimSettled():
                    pass  # _progress looks at every registration after each step
                case _:
                    srv.queue.append(self._storage_op(srv, effect))

    def _storage_op(self, srv: Server, effect: Effect) -> Callable[[], list[Effect]]:
        hub, storage = srv.hub, srv.storage
        match effect:
            case StoreMessage(message=stored, seq=seq, conn=conn, req_id=req_id):

                def store() -> list[Effect]:
                    storage.insert(stored, seq, next(self._stamps))
                    return hub.message_stored(stored, conn, req_id, duplicate=False, now=self.now)

                return store
            case StoreReceipt(msg=msg, by=by, status=status, ts=ts, uid=uid):

                def receipt() -> list[Effect]:
                    news = storage.mark(msg, uid, status, ts)
                    if news is None:
                        return []
                    return hub.receipt_stored(msg, news[0], news[1], by, status, ts)

                return receipt
            case FetchBacklog(conn=conn, uid=uid):
                return lambda: hub.backlog_loaded(conn, storage.backlog(uid), self.now)
            case PushBacklog(server=server, uid=uid, token=token):
                return lambda: hub.backlog_for_peer(server, uid, token, storage.backlog(uid))
            case AfterStored(effects=later):
                return lambda: later
            case DropBacklog(uid=uid):
                return lambda: storage.drop(uid) or []
            case SaveLastSeen():
                return lambda: []
            case OweReceipts(receipts=receipts):
                return lambda: storage.owe(receipts, True) or []
            case ReceiptsTold(receipts=receipts):
                return lambda: storage.owe(receipts, False) or []
            case OweToPeer(server=server, receipt=r):
                return lambda: storage.keep(server, r) or []
            case SendOwedToPeer(server=server):
                return lambda: hub.owed_loaded(server, storage.take(server))
            case StoreAccounts(records=records):
                return lambda: storage.accounts.update({r.uid: r for r in records}) or []
        raise AssertionError(f"an effect the simulator does not know: {effect!r}")

    def _client_of(self, srv: Server, conn: int) -> Client:
        """The client ``conn`` names; the hub may name one that is gone (service.py skips
        it: connection ids are never reused), but never one of another server."""
        client = self.clients.get(conn)
        assert client is not None, f"{srv.name} names connection {conn}, which never existed"
        assert (client.server, client.incarnation) == (srv.name, srv.incarnation), (
            f"{srv.name} names connection {conn} of {client.server}#{client.incarnation}"
        )
        return client

    def _to_client(self, srv: Server, conn: int, event: Event, req_id: object) -> None:
        client = self._client_of(srv, conn)
        if not client.live:
            # What a closing connection is sent may or may not be written before it closes:
            # nothing is owed to it, but a text-mode receipt for it is no lie.
            if isinstance(event, messages.Message):
                client.late.append(event.msg)
                if client.text_mode and event.msg in self.records:
                    self.records[event.msg].acked = True
            return
        client.events.append((event, req_id))
        match event:
            case messages.Message(msg=msg) if client.text_mode and msg in self.records:
                self.records[msg].acked = True  # text mode acknowledges what it shows
            case messages.Sent(msg=msg) if isinstance(req_id, int):
                self._sent(srv, msg, req_id)
            case messages.Welcome(users=users):
                client.view = {name_key(u.user): ("first", (u.server,)) for u in users if u.online}
            case messages.Presence(user=user, online=True, servers=servers):
                client.view[name_key(user)] = ("all", tuple(servers or ()))
            case messages.Presence(user=user, online=False):
                client.view.pop(name_key(user), None)

    def _sent(self, srv: Server, msg: str, req_id: int) -> None:
        pending = self.pending_sends.pop(req_id, None)
        if pending is not None:
            assert (pending.server, pending.incarnation) == (srv.name, srv.incarnation)
            stored = srv.storage.rows[msg].stored
            record = SendRecord(msg, req_id, pending.sender_conn, srv.name, srv.incarnation, stored)
            self.records[msg] = record
        elif req_id in self.pending_broadcasts:
            self.broadcasts[msg] = self.pending_broadcasts.pop(req_id)
            self.broadcasts[msg].msg = msg

    def _send_line(self, srv: Server, dst: str, line: bytes) -> None:
        pair = (min(srv.name, dst), max(srv.name, dst))
        if dst in srv.believes_up and self.alive[pair]:
            self.wires[srv.name, dst].append(line)
        else:
            self.lost_lines += 1  # a dead link nobody noticed yet, or no link (peers.py drops)

    # --- steps ------------------------------------------------------------------------

    def step(self, step: Step) -> None:
        match step:
            case Login(server=server, name=name, text_mode=text_mode):
                self._login(self._server(server), name, text_mode)
            case Register(server=server, name=name):
                self._register(self._server(server), name)
            case Logout(conn=i):
                if (client := self._pick(i)) is not None:
                    self._request(client, messages.LogoutRequest())
            case Send(conn=i, to=to):
                if (client := self._pick(i)) is not None:
                    self._send(client, to)
            case SendTo(conn=i, to=j):
                if (client := self._pick(i)) is not None:
                    self._send(client, self._pick(j).name)  # type: ignore[union-attr]
            case Broadcast(conn=i):
                if (client := self._pick(i)) is not None:
                    self._broadcast(client)
            case Ack(conn=i, pick=pick, read=read):
                if (client := self._pick(i)) is not None and (got := client.private_messages()):
                    msg = got[pick % len(got)].msg
                    request = messages.ReadRequest(msg) if read else messages.ReceivedRequest(msg)
                    if self._request(client, request) and msg in self.records:
                        self.records[msg].acked = True
            case Typing(conn=i, to=to):
                if (client := self._pick(i)) is not None:
                    self.typings.add((client.key, name_key(to)))
                    self._request(client, messages.TypingRequest(to))
            case Reap():
                self.reap()
            case DeliverLink(link=i, count=count):
                self._deliver(self.links[i % len(self.links)], count)
            case Cut(a=a, b=b, notice_a=notice_a, notice_b=notice_b):
                if (pair := self._pair(a, b)) is not None:
                    self._cut(pair)
                    x, y = self._server(a).name, self._server(b).name
                    if notice_a:
                        self._notice(x, y)
                    if notice_b:
                        self._notice(y, x)
            case Quiet():
                self.quiesce()
            case Notice(a=a, b=b):
                if (pair := self._pair(a, b)) is not None:
                    me = self._server(a).name
                    self._notice(me, pair[1] if pair[0] == me else pair[0])
            case Heal(a=a, b=b, replace_a=replace_a, replace_b=replace_b):
                if (pair := self._pair(a, b)) is not None:
                    x, y = self._server(a).name, self._server(b).name
                    self._heal(x, y, replace_a=replace_a, replace_b=replace_b)
            case Crash(server=i):
                self._crash(self._server(i))
            case Tick(ms=ms):
                self.now += ms
            case Flush(server=i, count=count):
                self._flush(self._server(i), count)

    def _login(self, srv: Server, name: str, text_mode: bool, uid: str | None = None) -> None:
        """service.py's login: the password given is right for the account going by
        ``name`` (or for ``uid``, one of those registered with it)."""
        conn = next(self._ids)
        hub = srv.hub
        try:
            candidates = hub.check_login(name, PASSWORD if hub.is_account(name) else None)
            if candidates and uid not in {c.uid for c in candidates}:
                uid = candidates[0].uid
            effects = hub.login(
                conn, name, auto_ack=text_mode, now=self.now, req_id="login", uid=uid
            )
        except ProtocolError as exc:
            self._note(f"{srv.name}: login {name} refused: {exc.code}")
            return
        entry = hub.conns[conn]
        since = hub.online[entry.key].since  # the hub's: unique per session here
        client = Client(
            conn,
            srv.name,
            srv.incarnation,
            entry.user,
            entry.account,
            text_mode,
            since,
            next(self._stamps),
            entry.uid,
        )
        self.clients[conn] = client
        self.claims[conn] = Claim(client.key, since, srv.name, conn, entry.account)
        self._note(f"{srv.name}: c{conn} logs in as {entry.user} ({entry.uid})")
        self._run(srv, effects)

    def _register(self, srv: Server, name: str) -> None:
        """service.py's register: claim the name from linked peers; _progress goes on."""
        try:
            reg, effects = srv.hub.begin_register(name, self.now)
        except ProtocolError as exc:
            self._note(f"{srv.name}: register {name} refused: {exc.code}")
            self.register_refused += 1
            return
        self._note(f"{srv.name}: registering {name} ({reg.rid}), waiting for {reg.waiting}")
        srv.registering.append(PendingRegistration(reg))
        self._run(srv, effects)

    def _progress(self, srv: Server, *, expire: bool = False) -> None:
        """Registrations whose peers all answered (or, ``expire``: CLAIM_WAIT_S passed) go
        on: the account is stored and announced, then, announced, it logs in."""
        while True:
            ready = [p for p in srv.registering if p.reg.settled or expire]
            if not ready:
                return
            pending = ready[0]
            reg = pending.reg
            if pending.phase == "claim":
                uid = f"{next(self._uids):016x}"
                try:
                    record = srv.hub.make_account(reg, uid, "hash")
                except ProtocolError as exc:
                    srv.registering.remove(pending)
                    self._note(f"{srv.name}: register {reg.name} refused: {exc.code}")
                    self.register_refused += 1
                    self._apply(srv, srv.hub.abort_register(reg))
                    continue
                srv.storage.accounts[uid] = record
                self.registered[uid] = record
                pending.phase, pending.record = "announce", record
                self._note(f"{srv.name}: {reg.name} registered as {uid}")
                self._apply(srv, srv.hub.account_stored(reg, record))
            else:
                srv.registering.remove(pending)
                srv.hub.announced(reg)
                assert pending.record is not None
                self._login(srv, reg.name, text_mode=False, uid=pending.record.uid)
            if not self.lazy_storage:
                self._flush(srv, None)

    def _request(self, client: Client, request: messages.Request, req_id: object = None) -> bool:
        srv = self.servers[client.server]
        try:
            effects = srv.hub.handle(client.id, request, req_id, self.now)
        except ProtocolError as exc:
            self._note(f"{srv.name}: c{client.id} {request.TYPE} refused: {exc.code}")
            return False
        self._note(f"{srv.name}: c{client.id} ({client.name}) {request!r}")
        self._run(srv, effects)
        return True

    def _send(self, client: Client, to: str) -> None:
        req_id = next(self._req_ids)
        srv = self.servers[client.server]
        self.pending_sends[req_id] = PendingSend(client.id, srv.name, srv.incarnation)
        self._request(client, messages.SendRequest(to, f"text{req_id}"), req_id)

    def _broadcast(self, client: Client) -> None:
        req_id = next(self._req_ids)
        text = f"text{req_id}"
        self.pending_broadcasts[req_id] = BroadcastRecord("", req_id, client.id, client.name, text)
        self._request(client, messages.BroadcastRequest(text), req_id)

    def reap(self) -> None:
        closes, self.pending_closes = self.pending_closes, []
        for conn in closes:
            client = self.clients[conn]
            srv = self.servers[client.server]
            if client.dead:
                continue  # its server crashed meanwhile
            client.dead = True
            self._run(srv, srv.hub.disconnect(conn, self.now))

    def _deliver(self, link: tuple[str, str], count: int) -> None:
        src, dst = link
        wire = self.wires[link]
        srv = self.servers[dst]
        for _ in range(count):
            if not wire:
                return
            message = peerproto.decode_peer(wire.popleft())
            assert src in srv.believes_up, f"{dst} got a line from {src} on a link it thinks down"
            self._run(srv, srv.hub.peer_message(src, message, self.now))

    def _cut(self, pair: tuple[str, str]) -> None:
        if self.alive[pair]:
            self._note(f"cut {pair[0]}-{pair[1]}")
            self.alive[pair] = False
            a, b = pair
            self.wires[a, b].clear()
            self.wires[b, a].clear()

    def _notice(self, me: str, other: str) -> None:
        srv = self.servers[me]
        if other in srv.believes_up and not self.alive[min(me, other), max(me, other)]:
            self._note(f"{me} notices its link to {other} is down")
            srv.believes_up.discard(other)
            self._run(srv, srv.hub.peer_down(other, self.now))

    def _heal(self, a: str, b: str, *, replace_a: bool, replace_b: bool) -> None:
        pair = (min(a, b), max(a, b))
        if self.alive[pair]:
            return
        self._note(
            f"link {a}-{b} up (replacing: {a if replace_a else ''} {b if replace_b else ''})"
        )
        self.alive[pair] = True
        for me, other, replace in ((a, b, replace_a), (b, a, replace_b)):
            if not replace:
                self._notice(me, other)
        for me, other in ((a, b), (b, a)):
            srv = self.servers[me]
            srv.believes_up.add(other)
            self._run(srv, srv.hub.peer_up(other, self.now))

    def _crash(self, srv: Server) -> None:
        self._note(f"{srv.name} crashes")
        for pair in self.pairs:
            if srv.name in pair:
                self._cut(pair)
        for client in self.clients.values():
            if client.server == srv.name and not client.dead:
                client.dead = True
        srv.incarnation += 1
        srv.believes_up = set()
        srv.queue.clear()
        srv.registering.clear()  # the clients waiting for them are gone
        srv.hub = self._new_hub(srv.name, srv.storage, srv.incarnation)

    # --- the end of a schedule ----------------------------------------------------------

    def quiesce(self, max_rounds: int = 100_000) -> None:
        """Deliver everything in flight, finish all storage and reap every close, until
        nothing moves."""
        for _ in range(max_rounds):
            if self.pending_closes:
                self.reap()
                continue
            if any(srv.queue for srv in self.servers.values()):
                for srv in self.servers.values():
                    self._flush(srv, None)
                continue
            busy = [link for link in self.links if self.wires[link]]
            if not busy:
                waiting = [srv for srv in self.servers.values() if srv.registering]
                if not waiting:
                    return
                for srv in waiting:  # CLAIM_WAIT_S passes: registrations go on regardless
                    self._progress(srv, expire=True)
                continue
            for link in busy:
                self._deliver(link, 1)
        raise AssertionError(f"no quiescence after {max_rounds} rounds")

    def settle(self) -> list[Claim]:
        """Quiesce, heal every link, quiesce again. Returns the guest claims that were live
        when the links came back (the final contenders for each guest name)."""
        self.quiesce()
        contenders = [claim for conn, claim in self.claims.items() if self.clients[conn].live]
        for a, b in self.pairs:
            self._heal(a, b, replace_a=False, replace_b=False)
        self.quiesce()
        return contenders

    # --- invariants -------------------------------------------------------------------

    def truth(self) -> dict[str, tuple[str, ...]]:
        """Who has a live connection where."""
        where: dict[str, set[str]] = {}
        for client in self.live_clients():
            where.setdefault(client.key, set()).add(client.server)
        return {key: tuple(sorted(servers)) for key, servers in where.items()}

    def steady_violations(self) -> list[str]:
        """What must hold after every step, partitions or not."""
        out: list[str] = []
        for srv in self.servers.values():
            hub = srv.hub
            if hub.peers != srv.believes_up:
                out.append(f"{srv.name} has peers {hub.peers}, its links are {srv.believes_up}")
            view = {key: tuple(u.servers(hub.server)) for key, u in hub.online.items()}
            for client in self.live_clients():
                if client.server == srv.name and not client.view_matches(view):
                    out.append(f"(a) c{client.id} on {srv.name} was told {client.view}, not {view}")
            for key, user in hub.online.items():
                mine = {
                    c.id
                    for c in self.clients.values()
                    if (c.server, c.incarnation) == (srv.name, srv.incarnation)
                    and not c.dead
                    and c.key == key
                }
                if user.conns != mine:
                    out.append(f"{srv.name} has {user.conns} for {key}, not {mine}")
                if not user.conns and not user.remote:
                    out.append(f"{srv.name} keeps {key} online on no server")
                stray = set(user.remote) - srv.believes_up
                if stray:
                    # protocol.md "Presence": a server's users go offline when it is gone.
                    out.append(f"(a) {srv.name} shows {key} on {stray}, known to be unlinked")
            for other in sorted(srv.believes_up):
                if not self.alive[min(srv.name, other), max(srv.name, other)]:
                    continue
                if self.wires[other, srv.name]:
                    continue
                # A live link with nothing in flight towards srv: srv knows exactly the
                # sessions ``other`` has, as ``other`` has them.
                theirs = {
                    key: (u.name, u.account, u.since)
                    for key, u in self.servers[other].hub.online.items()
                    if u.conns
                }
                known = {
                    key: (info.user, info.account, info.since)
                    for key, u in hub.online.items()
                    if (info := u.remote.get(other)) is not None
                }
                if known != theirs:
                    out.append(f"(a) {srv.name} knows {known} on {other}, which has {theirs}")
        return out

    def violations(self, contenders: Sequence[Claim]) -> list[str]:
        """Everything that breaks the contract, once settled (empty when all is well)."""
        return [
            *self._accounts(),
            *self._convergence(),
            *self._client_views(),
            *self._names(contenders),
            *self._delivery(),
            *self._addressing(),
        ]

    def fail_if(self, problems: list[str], when: str) -> None:
        if problems:
            trace = "\n".join(self.log[-80:])
            raise AssertionError("\n".join([when, *problems, "--- the last events:", trace]))

    def _convergence(self) -> list[str]:
        out: list[str] = []
        truth = self.truth()
        for srv in self.servers.values():
            hub = srv.hub
            view = {key: tuple(u.servers(hub.server)) for key, u in hub.online.items()}
            if view != truth:
                out.append(f"(a) {srv.name} sees {view}, the truth is {truth}")
            live = {c.id for c in self.live_clients() if c.server == srv.name}
            if set(hub.conns) != live:
                out.append(f"(a) {srv.name} has connections {set(hub.conns)}, live are {live}")
            others = set(self.names) - {srv.name}
            if hub.peers != others:
                out.append(f"(a) {srv.name} has peers {hub.peers} after healing")
            if hub._pushing:
                out.append(f"(c) {srv.name} still loads backlogs for peers: {hub._pushing}")
            kept = {server: len(r) for server, r in srv.storage.kept.items() if r}
            if kept:
                out.append(f"(c) {srv.name} still keeps receipts for linked peers: {kept}")
            awaiting = {c: e.awaiting for c, e in hub.conns.items() if e.awaiting}
            if awaiting:
                out.append(f"(c) {srv.name} has connections awaiting pushes: {awaiting}")
        return out

    def _accounts(self) -> list[str]:
        """protocol.md "Accounts across the mesh": once healed and quiet, every server has
        every account, all agree on the name each goes by, every account logs in on every
        server, and no connection goes by a name its account no longer has."""
        out: list[str] = []
        names = {srv.name: srv.hub.book.names() for srv in self.servers.values()}
        first = names[self.names[0]]
        for srv in self.servers.values():
            if names[srv.name] != first:
                out.append(f"(b) {srv.name} names accounts {names[srv.name]}, s0 {first}")
            stored = set(srv.storage.accounts)
            if stored != set(first):
                out.append(f"(b) {srv.name} stores accounts {sorted(stored)}, not {sorted(first)}")
            for uid, record in self.registered.items():
                name = srv.hub.book.name_of(uid)
                if name is None:
                    out.append(f"(b) {srv.name} does not know account {uid} ({record.name})")
                    continue
                for typed in (name, record.name):
                    try:
                        candidates = srv.hub.check_login(typed, PASSWORD)
                    except ProtocolError as exc:
                        out.append(f"(b) {srv.name}: login {typed} for {uid} fails: {exc.code}")
                        continue
                    if uid not in {c.uid for c in candidates}:
                        out.append(f"(b) {srv.name}: login {typed} can't reach account {uid}")
        for client in self.live_clients():
            book = self.servers[client.server].hub.book
            if client.account and book.name_of(client.uid) != client.name:
                out.append(
                    f"(b) c{client.id} goes by {client.name}, its account by "
                    f"{book.name_of(client.uid)}"
                )
        return out

    def _client_views(self) -> list[str]:
        """protocol.md "Presence": what each connection was told adds up to the truth."""
        truth = self.truth()
        return [
            f"(a) c{c.id} ({c.name} on {c.server}) was told {c.view}, the truth is {truth}"
            for c in self.live_clients()
            if not c.view_matches(truth)
        ]

    def _names(self, contenders: Sequence[Claim]) -> list[str]:
        """protocol.md "Name conflicts": of the sessions holding a name when the links came
        back, an account's survive (and no guest's); else the earliest guest's alone."""
        out: list[str] = []
        for client in self.clients.values():
            if client.account and client.kicked:
                out.append(f"(b) account connection c{client.id} was kicked")
        guests: dict[str, list[int]] = {}
        for client in self.live_clients():
            if not client.account:
                guests.setdefault(client.key, []).append(client.id)
        for key, holders in guests.items():
            if len(holders) > 1:
                out.append(f"(b) guest name {key} is held by {holders}")
        by_key: dict[str, list[Claim]] = {}
        for claim in contenders:
            by_key.setdefault(claim.key, []).append(claim)
        for key, claims in by_key.items():
            accounts = [c.conn for c in claims if c.account]
            earliest = min(claims, key=lambda c: c.rank)
            expected = [] if accounts else [earliest.conn]
            if guests.get(key, []) != expected:
                ranks = [(c.conn, "account" if c.account else c.rank) for c in claims]
                out.append(
                    f"(b) name {key}: contenders {ranks}, so the surviving guest should be "
                    f"{expected}, not {guests.get(key, [])}"
                )
        return out

    def _delivery(self) -> list[str]:
        """protocol.md "Delivery guarantee": every ``sent`` private message reaches every
        connection of its recipient identity that is live now (whatever server it is on,
        whenever it logged in), unless one of them acknowledged it already."""
        out: list[str] = []
        for record in self.records.values():
            if record.acked:
                continue
            for client in self.live_clients():
                if client.uid != record.stored.to_uid:
                    continue
                if record.msg not in {m.msg for m in client.private_messages()}:
                    out.append(
                        f"(c) {record.msg} from c{record.sender_conn} for {record.stored.to_uid} "
                        f"never reached c{client.id} ({client.name} on {client.server})"
                    )
        # protocol.md "Order": from one sender, messages arrive in the order sent; a
        # broadcast keeps its place behind the sender's private messages (hub.AfterStored).
        for client in self.clients.values():
            seen: set[str] = set()
            last: dict[int, int] = {}
            for event, _ in client.events:
                if not isinstance(event, messages.Message):
                    continue
                message = event
                record = self.records.get(message.msg) or self.broadcasts.get(message.msg)
                if record is None or message.msg in seen:
                    continue
                seen.add(message.msg)
                previous = last.get(record.sender_conn, 0)
                if record.index < previous:
                    out.append(
                        f"(c) c{client.id} got {message.msg} (send #{record.index}) after a later "
                        f"one (send #{previous}) from c{record.sender_conn}"
                    )
                last[record.sender_conn] = max(previous, record.index)
        return out

    def _addressing(self) -> list[str]:
        out: list[str] = []
        rows = {msg: row for srv in self.servers.values() for msg, row in srv.storage.rows.items()}
        stored = {msg: row.stored for msg, row in rows.items()}
        received: dict[str, set[str]] = {}  # identity -> what any of its connections got
        for client in self.clients.values():
            got = received.setdefault(client.uid, set())
            got.update(m.msg for m in client.private_messages())
            got.update(client.late)
        for client in self.clients.values():
            replies = [r for _, r in client.events if r is not None]
            if len(replies) != len(set(replies)):
                out.append(f"c{client.id} got several replies to one request: {replies}")
            broadcasts: set[str] = set()
            for event, _ in client.events:
                match event:
                    case messages.Message(msg=msg, to="*") as m:
                        known = self.broadcasts.get(msg)
                        if known is not None and (known.sender, known.text) != (m.sender, m.text):
                            out.append(f"(c) c{client.id} got broadcast {m!r}, not as sent")
                        if msg in broadcasts:
                            out.append(f"(c) c{client.id} got broadcast {msg} twice")
                        broadcasts.add(msg)
                    case messages.Message(msg=msg) as m:
                        original = stored.get(msg)
                        if original is None or original.as_event() != m:
                            out.append(f"(c) c{client.id} got {m!r}; stored was {original!r}")
                        elif original.to_uid != client.uid:
                            # Identities, not names: not the next guest of that name, not
                            # another account that had it (protocol.md "Identities").
                            out.append(
                                f"(c) c{client.id} ({client.name}, {client.uid}) got {msg}, "
                                f"which is for {original.to_uid}"
                            )
                    case messages.Receipt(msg=msg):
                        original = stored.get(msg)
                        if (
                            original is None
                            or original.sender_uid != client.uid
                            or msg not in received.get(original.to_uid, set())
                        ):
                            out.append(f"(c) c{client.id} ({client.name}) got {event!r}")
                    case messages.Typing(sender=sender):
                        if (name_key(sender), client.key) not in self.typings:
                            out.append(f"(c) c{client.id} ({client.name}) got {event!r}")
        return out


def run_schedule(
    n: int,
    schedule: Iterable[Step],
    *,
    lazy_storage: bool = False,
    strict: bool = False,
    accounts_everywhere: bool = False,
) -> Mesh:
    """Play ``schedule`` on ``n`` servers, settle, and fail with every violation found
    (checked after every step, then once settled)."""
    mesh = Mesh(
        n, lazy_storage=lazy_storage, strict=strict, accounts_everywhere=accounts_everywhere
    )
    for number, step in enumerate(schedule):
        mesh.step(step)
        mesh.fail_if(mesh.steady_violations(), f"after step {number}: {step!r}")
    contenders = mesh.settle()
    mesh.fail_if(mesh.steady_violations() + mesh.violations(contenders), "once settled")
    return mesh
