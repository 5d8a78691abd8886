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

from trichat import errors, messages, peerproto
from trichat.codec import RequestId
from trichat.effects import (
    AfterStored,
    Close,
    ConnEntry,
    Deliver,
    DropBacklog,
    Effect,
    FetchBacklog,
    OnlineUser,
    Reply,
    SaveLastSeen,
    Seen,
    StoredMessage,
    StoreMessage,
    StoreReceipt,
    ToPeers,
)
from trichat.errors import ProtocolError
from trichat.mesh import BROADCAST_TO, MeshRouting
from trichat.messages import Request
from trichat.names import describe_name_rule, is_valid_name, name_key

__all__ = [  # the effects are part of the hub's interface: tests and the shell use them
    "AfterStored",
    "Close",
    "ConnEntry",
    "Deliver",
    "DropBacklog",
    "Effect",
    "FetchBacklog",
    "Hub",
    "OnlineUser",
    "Reply",
    "SaveLastSeen",
    "Seen",
    "StoreMessage",
    "StoreReceipt",
    "StoredMessage",
    "ToPeers",
]


class Hub(MeshRouting):
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
        self._registering: set[str] = set()  # names whose account is being stored
        self._last_since = 0
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
        if not account and self._guest_name_taken(name_key(name)):
            raise ProtocolError(errors.NAME_TAKEN, f"{name} is in use; pick another name")
        return account

    def _guest_name_taken(self, key: str) -> bool:
        return key in self.online or key in self._registering

    def check_register(self, name: str) -> None:
        """Raises ``bad_name`` or ``name_taken`` before the password is hashed."""
        check_name(name)
        if self.is_account(name) or self._guest_name_taken(name_key(name)):
            raise ProtocolError(errors.NAME_TAKEN, f"{name} is taken; pick another name")

    def reserve(self, name: str) -> None:
        """Hold ``name`` while its registration is hashed and stored: no guest may take it
        in between (call :meth:`add_account` or :meth:`release` after).

        Raises:
            ProtocolError: ``bad_name`` or ``name_taken``.
        """
        self.check_register(name)
        self._registering.add(name_key(name))

    def release(self, name: str) -> None:
        self._registering.discard(name_key(name))

    def add_account(self, name: str) -> None:
        """A new account was stored."""
        self._accounts[name_key(name)] = Seen(name, True, None)
        self._gone_guests.pop(name_key(name), None)
        self.release(name)

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
        if not account and self._guest_name_taken(key):
            raise ProtocolError(errors.NAME_TAKEN, f"{name} is in use; pick another name")
        if account and user is not None and user.conns and not user.account:
            # Never share an online entry with a guest of the same name (its mail would mix).
            raise ProtocolError(errors.NAME_TAKEN, f"{name} is in use by a guest right now")
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
            # Strictly increasing: a session's since also names it (a relay for a guest goes
            # to that session only), so two in the same millisecond must differ.
            self._last_since = max(now, self._last_since + 1)
            user.since, user.account = self._last_since, account
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
        relay_to = {s: i.since for s, i in target.remote.items()} if target is not None else {}
        return [StoreMessage(stored, seq, conn, req_id, relay_to)]

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
        relay_to: dict[str, int] | None = None,
    ) -> list[Effect]:
        """``stored`` is on disk; ``duplicate`` means it was a resend of that message.

        ``now`` stamps receipts of text-mode connections (the message's time if None);
        ``relay_to`` is the StoreMessage's: servers the recipient was on when it was sent.
        """
        effects: list[Effect] = []
        if conn in self.conns:
            effects.append(Reply(conn, messages.Sent(stored.msg, stored.ts), req_id))
        if duplicate:
            return effects
        target = self.online.get(name_key(stored.to))
        if target is None:
            return effects + self._relay_all(stored, None, relay_to)
        ready = [c for c in sorted(target.conns) if not self.conns[c].backlog_pending]
        effects += self._deliver_private(ready, [stored], now)
        return effects + self._relay_all(stored, target, relay_to)

    def _relay_all(
        self, stored: StoredMessage, target: OnlineUser | None, relay_to: dict[str, int] | None
    ) -> list[Effect]:
        servers = dict(relay_to or {})
        if target is not None:
            servers.update({server: info.since for server, info in target.remote.items()})
        effects: list[Effect] = []
        for server, since in sorted(servers.items()):
            effects += self._relay(server, stored, since)
        return effects

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

    # --- views --------------------------------------------------------------------

    def _all_conns(self, exclude: int | None = None) -> list[int]:
        return [c for c in self.conns if c != exclude]

    def _servers(self, user: OnlineUser) -> list[str]:
        return user.servers(self.server)

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
