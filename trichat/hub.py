"""Routing decisions: who is online where, and what each request makes happen.

Owns: the global view of who is online (on this server now; the mesh adds other servers'
sessions to the same table), the accounts' names and last-seen times, message ids, and the
rules of protocol.md "Semantics". Must never: do I/O, await, or read a clock: every call
gets ``now`` (milliseconds since the epoch) and returns a list of effects, which the shell
carries out in order. Storing is an effect too; the shell reports back with
:meth:`Hub.message_stored`, :meth:`Hub.receipt_stored` and :meth:`Hub.backlog_loaded`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import attrs

from trichat import errors, messages, peerproto
from trichat.codec import RequestId
from trichat.errors import ProtocolError
from trichat.messages import Event, Request
from trichat.names import describe_name_rule, is_valid_name, name_key

BROADCAST_TO = "*"
MAX_PENDING_RELAYS = 10000  # per peer, awaiting relay_ack; beyond it the oldest are dropped

# --- effects --------------------------------------------------------------------------
# Effects and storage operations are plain (not frozen) attrs classes: several are made per
# message, and a frozen class takes 2.7x as long to build (benchmarks/README.md). Treat them
# as values all the same.


@attrs.define
class Reply:
    """Send ``event`` to one connection, echoing ``req_id``."""

    conn: int
    event: Event
    req_id: RequestId = None


@attrs.define
class Deliver:
    """Send one event to many connections; the shell encodes it once per mode."""

    conns: list[int]
    event: Event


@attrs.define
class StoredMessage:
    """A private message as it is written to disk."""

    msg: str
    sender: str
    to: str
    text: str
    ts: int
    req_id: RequestId = None

    def as_event(self) -> messages.Message:
        return messages.Message(self.msg, self.sender, self.to, self.text, self.ts)


@attrs.define
class StoreMessage:
    """Write ``message`` durably, then call :meth:`Hub.message_stored`."""

    message: StoredMessage
    seq: int
    conn: int
    req_id: RequestId


@attrs.define
class StoreReceipt:
    """Record that ``by`` received or read ``msg``, then call :meth:`Hub.receipt_stored`."""

    msg: str
    by: str
    status: str
    ts: int


@attrs.define
class FetchBacklog:
    """Load ``user``'s unacknowledged messages, then call :meth:`Hub.backlog_loaded`."""

    conn: int
    user: str


@attrs.define
class SaveLastSeen:
    user: str
    ts: int


@attrs.define
class DropBacklog:
    """A guest is gone: what it left unacknowledged is never offered to anyone."""

    user: str
    ts: int


@attrs.define
class AfterStored:
    """Carry out ``effects`` once everything already sent to storage is stored: a broadcast
    must not overtake the same sender's private messages (protocol.md "Order"). ``conn``
    is the requester, whose connection stays open until then."""

    conn: int
    effects: list[Effect]


@attrs.define
class ToPeers:
    """Send one peer message to each of ``servers`` (linked peers); encoded once."""

    servers: list[str]
    message: peerproto.PeerMessage


@attrs.define
class Close:
    """Send ``bye`` to the connection and close it."""

    conn: int
    bye: messages.Bye


Effect = (
    Reply
    | Deliver
    | StoreMessage
    | StoreReceipt
    | FetchBacklog
    | SaveLastSeen
    | DropBacklog
    | AfterStored
    | ToPeers
    | Close
)

# --- state ----------------------------------------------------------------------------


@attrs.define
class ConnEntry:
    user: str
    key: str
    account: bool
    auto_ack: bool  # text mode: a line shown to a person counts as received
    backlog_pending: bool = False


@attrs.define
class OnlineUser:
    name: str
    account: bool
    conns: set[int] = attrs.Factory(set)  # this server's connections
    since: int = 0  # ms, when the first of them logged in (guest name conflicts)
    remote: dict[str, peerproto.SessionInfo] = attrs.Factory(dict)  # other servers' sessions

    def servers(self, me: str) -> list[str]:
        local = [me] if self.conns else []
        return sorted([*local, *self.remote])


@attrs.define
class Seen:
    name: str
    account: bool
    last_seen: int | None


class Hub:
    """The routing core of one server.

    Args:
        server: this server's name.
        accounts: registered names and their last-seen times, as loaded from storage.
        next_seq: the first unused message sequence number.
        incarnation: the database's id, part of every message id.
        max_text_chars: the text limit.
        users_page_size: users per ``welcome``/``users`` page.
        remembered_guests: gone guests kept for ``status`` and ``offline``.
    """

    def __init__(
        self,
        server: str,
        *,
        accounts: Iterable[tuple[str, int | None]] = (),
        next_seq: int = 1,
        incarnation: str = "0",
        max_text_chars: int = 4096,
        users_page_size: int = 500,
        remembered_guests: int = 10000,
    ) -> None:
        self.server = server
        self._seq = next_seq
        self._msg_prefix = f"{server}:{incarnation}:"
        self._max_text = max_text_chars
        self._page = users_page_size
        self._remembered_guests = remembered_guests
        self.conns: dict[int, ConnEntry] = {}
        self.online: dict[str, OnlineUser] = {}
        self._accounts: dict[str, Seen] = {name_key(n): Seen(n, True, seen) for n, seen in accounts}
        self._gone_guests: OrderedDict[str, Seen] = OrderedDict()
        # The mesh (protocol.md "Peer links"): linked peers, the version of what each told
        # us about its sessions, and relays each has not acknowledged yet.
        self.boot = incarnation
        self.peers: set[str] = set()
        self._presence_seq = 0
        self._remote_versions: dict[str, tuple[str, int]] = {}
        self._pending_relays: dict[str, OrderedDict[str, peerproto.Relay]] = {}

    # --- login and logout ---------------------------------------------------------

    def is_account(self, name: str) -> bool:
        return name_key(name) in self._accounts

    def check_login(self, name: str, password: str | None) -> bool:
        """Check a login before any password work; True when it is for an account.

        Raises:
            ProtocolError: ``bad_name``, ``name_taken`` (a guest name in use) or
                ``auth_failed`` (an account without password, a password for no account).
        """
        check_name(name)
        account = self.is_account(name)
        if account and password is None:
            raise ProtocolError(errors.AUTH_FAILED, f"{name} is registered: give its password")
        if not account and password is not None:
            raise ProtocolError(
                errors.AUTH_FAILED,
                f"there is no account {name}: register it, or log in without a password",
            )
        if not account and name_key(name) in self.online:
            raise ProtocolError(errors.NAME_TAKEN, f"{name} is in use; pick another name")
        return account

    def check_register(self, name: str) -> None:
        """Raises ``bad_name`` or ``name_taken`` before the password is hashed."""
        check_name(name)
        if self.is_account(name) or name_key(name) in self.online:
            raise ProtocolError(errors.NAME_TAKEN, f"{name} is taken; pick another name")

    def add_account(self, name: str) -> None:
        """A new account was stored."""
        self._accounts[name_key(name)] = Seen(name, True, None)
        self._gone_guests.pop(name_key(name), None)

    def login(
        self, conn: int, name: str, *, auto_ack: bool, now: int, req_id: RequestId
    ) -> list[Effect]:
        """Log ``conn`` in as ``name`` (password already checked by the shell).

        Raises:
            ProtocolError: ``name_taken`` if a guest took the name meanwhile.
        """
        key = name_key(name)
        account = key in self._accounts
        if account:
            name = self._accounts[key].name
        user = self.online.get(key)
        if user is not None and not account:
            raise ProtocolError(errors.NAME_TAKEN, f"{name} is in use; pick another name")
        entry = ConnEntry(name, key, account, auto_ack, backlog_pending=account)
        self.conns[conn] = entry
        if user is None:
            user = self.online[key] = OnlineUser(name, account)
            self._gone_guests.pop(key, None)
        before = user.servers(self.server)
        first_here = not user.conns
        user.conns.add(conn)
        users, more = self._users_page(None)
        effects: list[Effect] = [
            Reply(conn, messages.Welcome(name, self.server, users, more), req_id)
        ]
        if first_here:
            user.since, user.account = now, account
            effects += self._tell_peers(user, online=True)
        effects += self._presence_changed(key, before, now, exclude=conn)
        if account:
            effects.append(FetchBacklog(conn, name))
        return effects

    def disconnect(self, conn: int, now: int) -> list[Effect]:
        """``conn`` is gone (logout, error, shutdown); a no-op if it never logged in."""
        entry = self.conns.pop(conn, None)
        if entry is None:
            return []
        user = self.online[entry.key]
        before = user.servers(self.server)
        user.conns.discard(conn)
        if user.conns:
            return []
        effects: list[Effect] = self._tell_peers(user, online=False)
        if entry.account:
            self._accounts[entry.key].last_seen = now
            effects.append(SaveLastSeen(entry.user, now))
        else:
            effects.append(DropBacklog(entry.user, now))
        return effects + self._presence_changed(entry.key, before, now)

    def _presence_changed(
        self, key: str, before: list[str], now: int, exclude: int | None = None
    ) -> list[Effect]:
        """Tell this server's connections if where ``key`` is online changed; forget users
        who are online nowhere any more."""
        user = self.online.get(key)
        after = user.servers(self.server) if user is not None else []
        if after == before or user is None:
            return []
        if after:
            event = messages.Presence(user.name, True, server=after[0], servers=after)
        else:
            del self.online[key]
            if user.account and key in self._accounts:
                self._accounts[key].last_seen = now
            else:
                self._remember_guest(user.name, now, account=user.account)
            event = messages.Presence(user.name, False, last_seen=now)
        return [Deliver(self._all_conns(exclude=exclude), event)]

    def _remember_guest(self, name: str, now: int, *, account: bool = False) -> None:
        self._gone_guests[name_key(name)] = Seen(name, account, now)
        self._gone_guests.move_to_end(name_key(name))
        while len(self._gone_guests) > self._remembered_guests:
            self._gone_guests.popitem(last=False)

    # --- requests -----------------------------------------------------------------

    def handle(self, conn: int, request: Request, req_id: RequestId, now: int) -> list[Effect]:
        """Serve a logged-in connection's request (login and register excepted).

        Raises:
            ProtocolError: the request can't be served; nothing changed.
        """
        entry = self.conns[conn]
        match request:
            case messages.SendRequest(to=to, text=text):
                return self._send(conn, entry, to, text, req_id, now)
            case messages.BroadcastRequest(text=text):
                return self._broadcast(conn, entry, text, req_id, now)
            case messages.ReceivedRequest(msg=msg):
                return self._receipt(msg, entry.user, "delivered", now)
            case messages.ReadRequest(msg=msg):
                return self._receipt(msg, entry.user, "read", now)
            case messages.TypingRequest(to=to):
                return self._typing(entry.user, to)
            case messages.UsersRequest(after=after):
                users, more = self._users_page(after)
                return [Reply(conn, messages.Users(users, more), req_id)]
            case messages.StatusRequest(user=user):
                return [Reply(conn, self._status(user), req_id)]
            case messages.LogoutRequest():
                return [Close(conn, messages.Bye("logout", "logged out; goodbye"))]
        raise ProtocolError(errors.UNKNOWN_TYPE, f"{request.TYPE} is not served here")

    def _receipt(self, msg: str, by: str, status: str, now: int) -> list[Effect]:
        """A receipt is recorded where the message is stored: the server its id names."""
        origin = msg.partition(":")[0]
        if origin == self.server:
            return [StoreReceipt(msg, by, status, now)]
        if origin in self.peers:
            return [ToPeers([origin], peerproto.PeerReceipt(msg, status, by, now))]
        return []  # its server is not reachable now; receipts are best effort for now

    def _typing(self, sender: str, to: str) -> list[Effect]:
        target = self.online.get(name_key(to)) if is_valid_name(to) else None
        if target is None:
            return []  # typing notices are best effort: nobody to tell
        effects: list[Effect] = []
        if target.conns:
            effects.append(Deliver(sorted(target.conns), messages.Typing(sender)))
        if target.remote:
            effects.append(
                ToPeers(sorted(target.remote), peerproto.PeerTyping(sender, target.name))
            )
        return effects

    def _check_text(self, text: str) -> None:
        if len(text) > self._max_text:
            raise ProtocolError(
                errors.TEXT_TOO_LONG, f"a text may be at most {self._max_text} characters"
            )

    def _next_msg_id(self) -> tuple[int, str]:
        seq = self._seq
        self._seq += 1
        return seq, f"{self._msg_prefix}{seq}"

    def _send(
        self, conn: int, entry: ConnEntry, to: str, text: str, req_id: RequestId, now: int
    ) -> list[Effect]:
        self._check_text(text)
        key = name_key(to) if is_valid_name(to) else None
        target = self.online.get(key) if key else None
        if target is not None:
            to = target.name
        elif key in self._accounts:
            to = self._accounts[key].name  # stored until they log in
        elif key in self._gone_guests:
            raise ProtocolError(errors.OFFLINE, f"{to} is a guest who is not online now")
        else:
            raise ProtocolError(errors.NO_SUCH_USER, f"there is no user {to[:40]}")
        seq, msg = self._next_msg_id()
        stored = StoredMessage(msg, entry.user, to, text, now, req_id)
        return [StoreMessage(stored, seq, conn, req_id)]

    def _broadcast(
        self, conn: int, entry: ConnEntry, text: str, req_id: RequestId, now: int
    ) -> list[Effect]:
        self._check_text(text)
        _, msg = self._next_msg_id()
        event = messages.Message(msg, entry.user, BROADCAST_TO, text, now)
        # Everyone online now gets it, behind the sender's private messages still on their
        # way to disk (connection ids are never reused, so one that left is just skipped).
        later: list[Effect] = [
            Reply(conn, messages.Sent(msg, now), req_id),
            Deliver(self._all_conns(exclude=conn), event),
        ]
        if self.peers:
            relay = peerproto.PeerBroadcast(msg, entry.user, text, now)
            later.append(ToPeers(sorted(self.peers), relay))
        return [AfterStored(conn, later)]

    # --- storage reports ----------------------------------------------------------

    def message_stored(
        self,
        stored: StoredMessage,
        conn: int,
        req_id: RequestId,
        *,
        duplicate: bool,
        now: int | None = None,
    ) -> list[Effect]:
        """``stored`` is on disk; ``duplicate`` means it was a resend of that message.

        ``now`` stamps receipts of text-mode connections (the message's time if None).
        """
        effects: list[Effect] = []
        if conn in self.conns:
            effects.append(Reply(conn, messages.Sent(stored.msg, stored.ts), req_id))
        if duplicate:
            return effects
        target = self.online.get(name_key(stored.to))
        if target is None:
            return effects
        ready = [c for c in sorted(target.conns) if not self.conns[c].backlog_pending]
        effects += self._deliver_private(ready, [stored], now)
        for server in sorted(target.remote):
            effects += self._relay(server, stored)
        return effects

    def _relay(self, server: str, stored: StoredMessage) -> list[Effect]:
        """Hand a stored message to the server the recipient is on; kept until acknowledged
        and sent again if the link drops first (protocol.md "Relay")."""
        relay = peerproto.Relay(stored.msg, stored.sender, stored.to, stored.text, stored.ts)
        pending = self._pending_relays.setdefault(server, OrderedDict())
        pending[stored.msg] = relay
        while len(pending) > MAX_PENDING_RELAYS:
            pending.popitem(last=False)
        if server not in self.peers:
            return []
        return [ToPeers([server], relay)]

    def _deliver_private(
        self, conns: list[int], batch: list[StoredMessage], now: int | None
    ) -> list[Effect]:
        effects: list[Effect] = []
        auto_ack = any(self.conns[c].auto_ack for c in conns)
        for stored in batch:
            if conns:
                effects.append(Deliver(conns, stored.as_event()))
            if auto_ack:
                shown = stored.ts if now is None else now
                effects.append(StoreReceipt(stored.msg, stored.to, "delivered", shown))
        return effects

    def backlog_loaded(
        self, conn: int, batch: list[StoredMessage], now: int | None = None
    ) -> list[Effect]:
        """``conn``'s stored messages, oldest first, loaded in order with live ones."""
        entry = self.conns.get(conn)
        if entry is None:
            return []
        entry.backlog_pending = False
        return self._deliver_private([conn], batch, now)

    def receipt_stored(self, msg: str, sender: str, by: str, status: str, ts: int) -> list[Effect]:
        """A receipt was recorded for the first time: tell the sender's connections."""
        target = self.online.get(name_key(sender))
        if target is None:
            return []
        effects: list[Effect] = []
        if target.conns:
            effects.append(Deliver(sorted(target.conns), messages.Receipt(msg, status, by, ts)))
        if target.remote:
            notice = peerproto.ReceiptNotice(msg, target.name, status, by, ts)
            effects.append(ToPeers(sorted(target.remote), notice))
        return effects

    # --- the mesh -----------------------------------------------------------------

    def _tell_peers(self, user: OnlineUser, *, online: bool) -> list[Effect]:
        """A user came online on, or left, this server: one small delta to each peer."""
        self._presence_seq += 1
        if not self.peers:
            return []
        change = peerproto.SessionChange(
            self.boot, self._presence_seq, user.name, online, user.account, user.since
        )
        return [ToPeers(sorted(self.peers), change)]

    def _snapshot(self) -> peerproto.Snapshot:
        sessions = [
            peerproto.SessionInfo(u.name, u.account, u.since)
            for u in self.online.values()
            if u.conns
        ]
        return peerproto.Snapshot(self.boot, self._presence_seq, sessions)

    def peer_up(self, server: str, now: int) -> list[Effect]:
        """A link to ``server`` is up: send it our sessions and what it has not acknowledged."""
        self.peers.add(server)
        effects: list[Effect] = [ToPeers([server], self._snapshot())]
        for relay in self._pending_relays.get(server, {}).values():
            effects.append(ToPeers([server], relay))
        return effects

    def peer_down(self, server: str, now: int) -> list[Effect]:
        """The link to ``server`` is gone: its users are offline here until it is back."""
        self.peers.discard(server)
        self._remote_versions.pop(server, None)
        return self._replace_sessions(server, [], now)

    def peer_message(self, server: str, message: peerproto.PeerMessage, now: int) -> list[Effect]:
        """A message from the linked peer ``server`` (already validated by peerproto)."""
        match message:
            case peerproto.Snapshot(boot=boot, seq=seq, sessions=sessions):
                if not self._newer(server, boot, seq, snapshot=True):
                    return []
                return self._replace_sessions(server, sessions, now)
            case peerproto.SessionChange():
                if not self._newer(server, message.boot, message.seq, snapshot=False):
                    return []
                info = peerproto.SessionInfo(message.user, message.account, message.since)
                return self._set_session(
                    server, info if message.online else None, message.user, now
                )
            case peerproto.Relay():
                return self._relayed(server, message, now)
            case peerproto.RelayAck(msgs=msgs):
                pending = self._pending_relays.get(server, OrderedDict())
                for msg in msgs:
                    pending.pop(msg, None)
                return []
            case peerproto.PeerBroadcast(msg=msg, sender=sender, text=text, ts=ts):
                event = messages.Message(msg, sender, BROADCAST_TO, text, ts)
                return [Deliver(self._all_conns(), event)]
            case peerproto.PeerReceipt(msg=msg, status=status, by=by, ts=ts):
                if msg.partition(":")[0] != self.server or status not in ("delivered", "read"):
                    return []
                return [StoreReceipt(msg, by, status, ts)]
            case peerproto.ReceiptNotice(msg=msg, sender=sender, status=status, by=by, ts=ts):
                target = self.online.get(name_key(sender))
                if target is None or not target.conns:
                    return []
                return [Deliver(sorted(target.conns), messages.Receipt(msg, status, by, ts))]
            case peerproto.PeerTyping(sender=sender, to=to):
                target = self.online.get(name_key(to))
                if target is None or not target.conns:
                    return []
                return [Deliver(sorted(target.conns), messages.Typing(sender))]
        return []  # membership and link messages are the shell's (peers.py)

    def _newer(self, server: str, boot: str, seq: int, *, snapshot: bool) -> bool:
        """Versioning: a stale or repeated update never overwrites a newer one. A snapshot
        starts a version line (a restarted server has a new boot); deltas must follow it."""
        known = self._remote_versions.get(server)
        if snapshot:
            ok = known is None or known[0] != boot or seq >= known[1]
        else:
            ok = known is not None and known[0] == boot and seq > known[1]
        if ok:
            self._remote_versions[server] = (boot, seq)
        return ok

    def _replace_sessions(
        self, server: str, sessions: list[peerproto.SessionInfo], now: int
    ) -> list[Effect]:
        wanted = {name_key(s.user): s for s in sessions}
        effects: list[Effect] = []
        for key, user in list(self.online.items()):
            if server in user.remote and key not in wanted:
                effects += self._set_session(server, None, user.name, now)
        for info in sessions:
            effects += self._set_session(server, info, info.user, now)
        return effects

    def _set_session(
        self, server: str, info: peerproto.SessionInfo | None, name: str, now: int
    ) -> list[Effect]:
        """Record that ``name`` is (info) or is not (None) online on ``server``."""
        key = name_key(name)
        user = self.online.get(key)
        if user is None:
            if info is None:
                return []
            user = self.online[key] = OnlineUser(info.user, info.account)
            self._gone_guests.pop(key, None)
        before = user.servers(self.server)
        if info is None:
            user.remote.pop(server, None)
        else:
            user.remote[server] = info
        effects = self._presence_changed(key, before, now)
        if info is not None and user.conns and self._loses_name(user, server, info):
            effects += self._kick_name_holder(user)
        return effects

    def _loses_name(self, user: OnlineUser, server: str, remote: peerproto.SessionInfo) -> bool:
        """Whether our guest must give up its name to ``remote`` (protocol.md "Name
        conflicts"): an account always wins; between guests, the earlier login, and on a
        tie the server whose name sorts first. Every server decides the same way."""
        if user.account:
            return False
        if remote.account:
            return True
        return (remote.since, server) < (user.since, self.server)

    def _kick_name_holder(self, user: OnlineUser) -> list[Effect]:
        effects: list[Effect] = []
        why = f"{user.name} was also taken on another server, earlier; log in with another name"
        for conn in sorted(user.conns):
            effects.append(Reply(conn, messages.Error(errors.NAME_TAKEN, why)))
            effects.append(Close(conn, messages.Bye("name_taken", why)))
        return effects

    def _relayed(self, server: str, relay: peerproto.Relay, now: int) -> list[Effect]:
        effects: list[Effect] = [ToPeers([server], peerproto.RelayAck([relay.msg]))]
        target = self.online.get(name_key(relay.to))
        if target is None or not target.conns:
            return effects  # gone meanwhile: its server keeps it (stored there)
        event = messages.Message(relay.msg, relay.sender, relay.to, relay.text, relay.ts)
        conns = sorted(target.conns)
        effects.append(Deliver(conns, event))
        if any(self.conns[c].auto_ack for c in conns):
            effects += self._receipt(relay.msg, target.name, "delivered", now)
        return effects

    # --- views --------------------------------------------------------------------

    def _all_conns(self, exclude: int | None = None) -> list[int]:
        return [c for c in self.conns if c != exclude]

    def _servers(self, user: OnlineUser) -> list[str]:
        return user.servers(self.server)

    def _presence(self, key: str) -> messages.Presence:
        user = self.online[key]
        servers = self._servers(user)
        return messages.Presence(user.name, True, server=servers[0], servers=servers)

    def _users_page(self, after: str | None) -> tuple[list[messages.UserEntry], str | None]:
        keys = sorted(self.online)
        if after is not None:
            keys = [k for k in keys if k > name_key(after)]
        page = keys[: self._page]
        entries = [
            messages.UserEntry(self.online[k].name, True, self._servers(self.online[k])[0])
            for k in page
        ]
        more = self.online[page[-1]].name if len(keys) > len(page) else None
        return entries, more

    def _status(self, name: str) -> messages.Status:
        key = name_key(name)
        user = self.online.get(key)
        if user is not None:
            servers = self._servers(user)
            return messages.Status(user.name, True, server=servers[0], servers=servers)
        seen = self._accounts.get(key) or self._gone_guests.get(key)
        if seen is None:
            raise ProtocolError(errors.NO_SUCH_USER, f"there is no user {name[:40]}")
        return messages.Status(seen.name, False, last_seen=seen.last_seen)


def check_name(name: str) -> None:
    if not is_valid_name(name):
        raise ProtocolError(errors.BAD_NAME, describe_name_rule())
