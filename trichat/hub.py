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
from trichat.accounts import AccountBook, AccountRecord
from trichat.codec import RequestId
from trichat.effects import (
    RECEIPT_BITS,
    AfterStored,
    Backlog,
    ClaimSettled,
    Close,
    ConnEntry,
    Deliver,
    DropBacklog,
    Effect,
    FetchBacklog,
    OnlineUser,
    OweReceipts,
    OweToPeer,
    PushBacklog,
    ReceiptsTold,
    Reply,
    SaveLastSeen,
    Seen,
    SendOwedToPeer,
    StoreAccounts,
    StoredMessage,
    StoreMessage,
    StoreReceipt,
    ToPeers,
)
from trichat.errors import ProtocolError
from trichat.mesh import BROADCAST_TO, MeshRouting
from trichat.messages import Request
from trichat.names import check_name, is_valid_name, name_key
from trichat.registration import RegistrationRouting, renamed_notice

__all__ = [  # the effects are part of the hub's interface: tests and the shell use them
    "AfterStored",
    "Backlog",
    "ClaimSettled",
    "Close",
    "ConnEntry",
    "Deliver",
    "DropBacklog",
    "Effect",
    "FetchBacklog",
    "Hub",
    "OnlineUser",
    "OweReceipts",
    "OweToPeer",
    "PushBacklog",
    "ReceiptsTold",
    "Reply",
    "SaveLastSeen",
    "Seen",
    "SendOwedToPeer",
    "StoreAccounts",
    "StoreMessage",
    "StoreReceipt",
    "StoredMessage",
    "ToPeers",
    "check_name",
]


class Hub(RegistrationRouting, MeshRouting):
    """The routing core of one server.

    Args:
        server: this server's name.
        accounts: every account record known, as loaded from storage.
        last_seen: accounts' last-seen times here (uid -> ms).
        next_seq: the first unused message sequence number.
        incarnation: the database's id, part of every message and guest session id.
        max_text_chars: the text limit.
        users_page_size: users per ``welcome``/``users`` page.
        remembered_guests: gone guests kept for ``status`` and ``offline``.
    """

    def __init__(
        self,
        server: str,
        *,
        accounts: Iterable[AccountRecord] = (),
        last_seen: dict[str, int] | None = None,
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
        self.book = AccountBook(accounts)
        self._last_seen: dict[str, int] = dict(last_seen or {})
        self._gone_guests: OrderedDict[str, Seen] = OrderedDict()
        self._last_since = 0
        # Identities (protocol.md "Identities"): this server's connections of each, and
        # the linked peers each is online on.
        self.local_uids: dict[str, set[int]] = {}
        self.remote_uids: dict[str, set[str]] = {}
        # The mesh (protocol.md "Peer links"): linked peers, the version of what each told
        # us about its sessions, and backlogs being loaded for peers' new sessions.
        self.boot = incarnation
        self.peers: set[str] = set()
        self._presence_seq = 0
        self._remote_versions: dict[str, tuple[str, int]] = {}
        self._pushing: dict[tuple[str, str], int] = {}
        self._push_tokens = 0
        self._init_registration()

    # --- login and logout ---------------------------------------------------------

    def is_account(self, name: str) -> bool:
        return self.book.holder(name) is not None

    def check_login(self, name: str, password: str | None) -> list[AccountRecord]:
        """Check a login before any password work: the accounts it may be for (the
        password tells which), or an empty list for a guest.

        Raises:
            ProtocolError: ``bad_name``, ``name_taken`` (a guest name in use) or
                ``auth_failed`` (an account without password, a password for no account).
        """
        check_name(name)
        candidates = self.book.login_candidates(name)
        if candidates and password is None:
            raise ProtocolError(errors.AUTH_FAILED, f"{name} is registered: give its password")
        if not candidates and password is not None:
            raise ProtocolError(
                errors.AUTH_FAILED,
                f"there is no account {name}: register it, or log in without a password",
            )
        if not candidates and self._guest_name_taken(name_key(name)):
            raise ProtocolError(errors.NAME_TAKEN, f"{name} is in use; pick another name")
        return candidates

    def _guest_name_taken(self, key: str) -> bool:
        return key in self.online or self._name_claimed(key)

    def _guest_online(self, key: str) -> bool:
        return key in self.online

    def login(
        self,
        conn: int,
        name: str,
        *,
        auto_ack: bool,
        now: int,
        req_id: RequestId,
        uid: str | None = None,
    ) -> list[Effect]:
        """Log ``conn`` in as ``name``: the account ``uid`` (password already checked by
        the shell), or a guest when ``uid`` is None.

        Raises:
            ProtocolError: ``name_taken`` if a guest took the name meanwhile.
        """
        typed = name
        account = uid is not None
        if uid is not None:
            name = self.book.name_of(uid) or name
        key = name_key(name)
        user = self.online.get(key)
        if not account and self._guest_name_taken(key):
            raise ProtocolError(errors.NAME_TAKEN, f"{name} is in use; pick another name")
        if account and user is not None and user.conns and user.uid != uid:
            # Never share an online entry with another identity (its mail would mix).
            raise ProtocolError(errors.NAME_TAKEN, f"{name} is in use by someone else right now")
        if user is None:
            user = self.online[key] = OnlineUser(name, account)
            self._gone_guests.pop(key, None)
        before = user.servers(self.server)
        first_here = not user.conns
        if first_here:
            # Strictly increasing: a guest session's id is made of it, so two logins in the
            # same millisecond must differ (and the boot tells restarts apart).
            self._last_since = max(now, self._last_since + 1)
            user.since, user.account, user.logins = self._last_since, account, 0
            user.uid = uid if uid is not None else f"g.{self.server}.{self.boot}.{user.since}"
        entry = ConnEntry(name, key, account, auto_ack, user.uid, account, set(self.peers))
        self.conns[conn] = entry
        user.conns.add(conn)
        self.local_uids.setdefault(user.uid, set()).add(conn)
        users, more = self._users_page(None)
        effects: list[Effect] = [
            Reply(conn, messages.Welcome(name, self.server, users, more), req_id)
        ]
        if name_key(typed) != key:
            effects.append(Reply(conn, renamed_notice(typed, name)))
        user.logins += 1
        if first_here or user.account:
            # Another device of an account is told too: it is owed what is stored elsewhere.
            effects += self._tell_peers(user, online=True)
        effects += self._presence_changed(key, before, now, exclude=conn)
        if account:
            effects.append(FetchBacklog(conn, user.uid))
        return effects

    def disconnect(self, conn: int, now: int) -> list[Effect]:
        """``conn`` is gone (logout, error, shutdown); a no-op if it never logged in."""
        entry = self.conns.pop(conn, None)
        if entry is None:
            return []
        _discard(self.local_uids, entry.uid, conn)
        user = self.online[entry.key]
        before = user.servers(self.server)
        user.conns.discard(conn)
        if user.conns:
            return []
        effects: list[Effect] = self._tell_peers(user, online=False)
        if entry.account:
            self._last_seen[entry.uid] = now
            effects.append(SaveLastSeen(entry.uid, now))
        else:
            effects.append(DropBacklog(entry.uid, now))
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
            # The session's own account, not whoever holds the name now (a renamed one).
            holder = user.uid if user.uid in self.book else self.book.holder(user.name)
            if holder is not None:
                self._last_seen[holder] = now
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
                return self._receipt(msg, entry.user, entry.uid, "delivered", now)
            case messages.ReadRequest(msg=msg):
                return self._receipt(msg, entry.user, entry.uid, "read", now)
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

    def _recipient(self, to: str) -> tuple[str, str]:
        """Whom a ``send`` to ``to`` is for: (the name it goes by, its identity).

        Raises:
            ProtocolError: ``offline`` (a guest who left), ``no_such_user``.
        """
        key = name_key(to) if is_valid_name(to) else None
        holder = self.book.holder(to) if key else None
        if holder is not None:
            return self.book.name_of(holder) or to, holder  # stored until they log in
        target = self.online.get(key) if key else None
        if target is not None:
            if target.conns:
                return target.name, target.uid
            # A guest (or an account whose record has not reached us yet) elsewhere.
            server = min(target.remote)
            return target.name, target.remote[server].uid
        if key in self._gone_guests:
            raise ProtocolError(errors.OFFLINE, f"{to} is a guest who is not online now")
        raise ProtocolError(errors.NO_SUCH_USER, f"there is no user {to[:40]}")

    def _send(
        self, conn: int, entry: ConnEntry, to: str, text: str, req_id: RequestId, now: int
    ) -> list[Effect]:
        self._check_text(text)
        to, to_uid = self._recipient(to)
        seq, msg = self._next_msg_id()
        stored = StoredMessage(msg, entry.user, to, text, now, req_id, entry.uid, to_uid)
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
        uid = stored.to_uid
        ready = [
            c for c in sorted(self.local_uids.get(uid, ())) if not self.conns[c].backlog_pending
        ]
        effects += self._deliver_private(ready, [stored], now)
        # Where the recipient is online elsewhere, unless that server's backlog for it is
        # being loaded: the message is in it, in order (protocol.md "Store and forward").
        for server in sorted(self.remote_uids.get(uid, ())):
            if (server, uid) not in self._pushing:
                effects.append(ToPeers([server], _relay(stored)))
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
                effects.append(
                    StoreReceipt(stored.msg, stored.to, "delivered", shown, stored.to_uid)
                )
        return effects

    def backlog_loaded(self, conn: int, backlog: Backlog, now: int | None = None) -> list[Effect]:
        """What is owed to ``conn``'s identity, loaded in order with live messages:
        stored messages (oldest first) and receipts kept for it while it was away."""
        entry = self.conns.get(conn)
        if entry is None:
            return []
        entry.backlog_pending = False
        effects = self._deliver_private([conn], backlog.messages, now)
        if backlog.receipts:
            for owed in backlog.receipts:
                effects.append(Deliver([conn], owed.event()))
            effects.append(ReceiptsTold([(r.msg, r.bits) for r in backlog.receipts]))
        return effects

    def receipt_stored(
        self, msg: str, sender: str, sender_uid: str, by: str, status: str, ts: int
    ) -> list[Effect]:
        """A receipt was recorded for the first time: tell the sender wherever it is, or
        keep it for the sender's next login (protocol.md "Receipts across the mesh")."""
        conns = sorted(self.local_uids.get(sender_uid, ()))
        servers = sorted(self.remote_uids.get(sender_uid, ()))
        effects: list[Effect] = []
        if conns:
            effects.append(Deliver(conns, messages.Receipt(msg, status, by, ts)))
        if servers:
            notice = peerproto.ReceiptNotice(msg, sender, status, by, ts, sender_uid)
            effects.append(ToPeers(servers, notice))
        if not conns and not servers and sender_uid in self.book:
            effects.append(OweReceipts([(msg, RECEIPT_BITS[status])]))
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
        holder = self.book.holder(name)
        if holder is not None:
            shown = self.book.name_of(holder) or name
            return messages.Status(shown, False, last_seen=self._last_seen.get(holder))
        seen = self._gone_guests.get(key)
        if seen is None:
            raise ProtocolError(errors.NO_SUCH_USER, f"there is no user {name[:40]}")
        return messages.Status(seen.name, False, last_seen=seen.last_seen)


def _relay(stored: StoredMessage) -> peerproto.Relay:
    return peerproto.Relay(
        stored.msg, stored.sender, stored.to, stored.text, stored.ts, stored.to_uid
    )


def _discard(index: dict[str, set[int]], uid: str, conn: int) -> None:
    conns = index.get(uid)
    if conns is not None:
        conns.discard(conn)
        if not conns:
            del index[uid]
