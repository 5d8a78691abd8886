"""The routing core's side of the mesh: other servers' sessions, relays, receipts, name
conflicts between guests.

Owns: protocol.md "Peer links" as the hub applies it: each server is the authority for its
own sessions and tells its peers by a snapshot on link-up and one small delta per change;
what a peer says is versioned (boot, seq) so a stale or repeated update never overwrites a
newer one. Store and forward (protocol.md "Store and forward"): the server a private message
was stored on keeps it until its recipient answers ``received``, relays it to every server
the recipient is online on, and pushes the whole backlog again whenever the recipient
appears on a server (a login, a link-up), so nothing depends on a relay surviving a link or
a process. Receipts go to the server that stored the message, kept on disk while it is not
linked. Must never: do I/O or read a clock (like hub.py, whose state it shares as a mixin).
"""

from __future__ import annotations

from collections import OrderedDict

from trichat import errors, messages, peerproto
from trichat.accounts import AccountBook
from trichat.effects import (
    Backlog,
    Close,
    ConnEntry,
    Deliver,
    DropBacklog,
    Effect,
    OnlineUser,
    OweToPeer,
    PushBacklog,
    ReceiptsTold,
    Reply,
    Seen,
    SendOwedToPeer,
    StoreReceipt,
    ToPeers,
)
from trichat.names import is_valid_name, name_key

BROADCAST_TO = "*"
MAX_HELD_BROADCASTS = 1000  # per connection awaiting a push; past it they are shown at once
GUEST_UID_PREFIX = "g."  # guest session ids: g.SERVER.BOOT.SINCE (accounts' are hex)


class MeshRouting:
    """Mixed into :class:`trichat.hub.Hub`; the attributes below are the hub's."""

    server: str
    boot: str
    book: AccountBook
    peers: set[str]
    online: dict[str, OnlineUser]
    conns: dict[int, ConnEntry]
    local_uids: dict[str, set[int]]
    remote_uids: dict[str, set[str]]
    _gone_guests: OrderedDict[str, Seen]
    _presence_seq: int
    _remote_versions: dict[str, tuple[str, int]]
    _pushing: dict[tuple[str, str], int]
    _push_tokens: int

    def _all_conns(self, exclude: int | None = None) -> list[int]:
        raise NotImplementedError

    def _presence_changed(
        self, key: str, before: list[str], now: int, exclude: int | None = None
    ) -> list[Effect]:
        raise NotImplementedError

    def _deliver_private(self, conns: list[int], batch: list, now: int | None) -> list[Effect]:  # type: ignore[type-arg]
        raise NotImplementedError

    def _accounts_up(self, server: str) -> list[Effect]:
        raise NotImplementedError

    def _accounts_down(self, server: str) -> list[Effect]:
        raise NotImplementedError

    def _accounts_message(self, server: str, message: peerproto.PeerMessage) -> list[Effect]:
        raise NotImplementedError

    # --- what a request needs from the mesh --------------------------------------

    def _receipt(self, msg: str, by: str, uid: str, status: str, now: int) -> list[Effect]:
        """A receipt is recorded where the message is stored: the server its id names;
        kept on disk for it while it is not linked."""
        origin = msg.partition(":")[0]
        if origin == self.server:
            return [StoreReceipt(msg, by, status, now, uid)]
        receipt = peerproto.PeerReceipt(msg, status, by, now, uid)
        if origin in self.peers:
            return [ToPeers([origin], receipt)]
        if origin in self._remote_versions or origin in self._known_servers():
            return [OweToPeer(origin, receipt)]
        return []  # no server of that name was ever linked: not a message id of this mesh

    def _known_servers(self) -> set[str]:
        return set(self.book.have())

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

    # --- what peers say --------------------------------------------------------------

    def _tell_peers(self, user: OnlineUser, *, online: bool) -> list[Effect]:
        """A user came online on, or left, this server: one small delta to each peer."""
        self._presence_seq += 1
        if not self.peers:
            return []
        change = peerproto.SessionChange(
            self.boot,
            self._presence_seq,
            user.name,
            online,
            user.account,
            user.since,
            user.uid,
            user.logins,
        )
        return [ToPeers(sorted(self.peers), change)]

    def _snapshot(self) -> peerproto.Snapshot:
        sessions = [
            peerproto.SessionInfo(u.name, u.account, u.since, u.uid, u.logins)
            for u in self.online.values()
            if u.conns
        ]
        return peerproto.Snapshot(self.boot, self._presence_seq, sessions)

    def peer_up(self, server: str, now: int) -> list[Effect]:
        """A link to ``server`` is up: exchange accounts, send our sessions, and what we
        kept for it while it was away. Each of our connections waits for its push."""
        effects: list[Effect] = []
        if server in self.peers:
            effects += self.peer_down(server, now)  # a stale link replaced: start afresh
        self.peers.add(server)
        for entry in self.conns.values():
            entry.awaiting.add(server)
        effects += self._accounts_up(server)
        effects += [ToPeers([server], self._snapshot()), SendOwedToPeer(server)]
        return effects

    def peer_down(self, server: str, now: int) -> list[Effect]:
        """The link to ``server`` is gone: its users are offline here until it is back."""
        self.peers.discard(server)
        self._remote_versions.pop(server, None)
        effects: list[Effect] = []
        for conn, entry in self.conns.items():
            if server in entry.awaiting:
                entry.awaiting.discard(server)
                effects += _release(conn, entry, server)
        for pending in [p for p in self._pushing if p[0] == server]:
            del self._pushing[pending]
        effects += self._accounts_down(server)
        return effects + self._replace_sessions(server, [], now, ended=False)

    def peer_message(self, server: str, message: peerproto.PeerMessage, now: int) -> list[Effect]:
        """A message from the linked peer ``server`` (already validated by peerproto)."""
        match message:
            case peerproto.Snapshot(boot=boot, seq=seq, sessions=sessions):
                if not self._newer(server, boot, seq, snapshot=True):
                    return []
                return self._replace_sessions(server, sessions, now, ended=True)
            case peerproto.SessionChange():
                if not self._newer(server, message.boot, message.seq, snapshot=False):
                    return []
                info = peerproto.SessionInfo(
                    message.user, message.account, message.since, message.uid, message.logins
                )
                return self._set_session(
                    server, info if message.online else None, message.user, now, ended=True
                )
            case peerproto.Relay():
                return self._relayed(server, message, now)
            case peerproto.Pushed(uid=uid):
                effects: list[Effect] = []
                for conn in sorted(self.local_uids.get(uid, ())):
                    entry = self.conns[conn]
                    if server in entry.awaiting:
                        entry.awaiting.discard(server)
                        effects += _release(conn, entry, server)
                return effects
            case peerproto.PeerBroadcast(msg=msg, sender=sender, text=text, ts=ts):
                return self._peer_broadcast(server, messages.Message(msg, sender, "*", text, ts))
            case peerproto.PeerReceipt(msg=msg, status=status, by=by, ts=ts, uid=uid):
                if msg.partition(":")[0] != self.server or status not in ("delivered", "read"):
                    return []
                return [StoreReceipt(msg, by, status, ts, uid)]
            case peerproto.ReceiptNotice(msg=msg, status=status, by=by, ts=ts, uid=uid):
                conns = sorted(self.local_uids.get(uid, ()))
                if not conns:
                    return []
                return [Deliver(conns, messages.Receipt(msg, status, by, ts))]
            case peerproto.PeerTyping(sender=sender, to=to):
                target = self.online.get(name_key(to))
                if target is None or not target.conns:
                    return []
                return [Deliver(sorted(target.conns), messages.Typing(sender))]
        return self._accounts_message(server, message)

    def _peer_broadcast(self, server: str, event: messages.Message) -> list[Effect]:
        """A broadcast from ``server``: to everyone, but a connection awaiting that
        server's push gets it in its place among the push's messages."""
        now_ready: list[int] = []
        for conn in self._all_conns():
            entry = self.conns[conn]
            if server in entry.awaiting and len(entry.held) < MAX_HELD_BROADCASTS:
                entry.held.append(event)
            else:
                now_ready.append(conn)
        return [Deliver(now_ready, event)] if now_ready else []

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
        self, server: str, sessions: list[peerproto.SessionInfo], now: int, *, ended: bool
    ) -> list[Effect]:
        wanted = {name_key(s.user): s for s in sessions}
        effects: list[Effect] = []
        for key, user in list(self.online.items()):
            if server in user.remote and key not in wanted:
                effects += self._set_session(server, None, user.name, now, ended=ended)
        for info in sessions:
            effects += self._set_session(server, info, info.user, now, ended=ended)
        return effects

    def _set_session(
        self,
        server: str,
        info: peerproto.SessionInfo | None,
        name: str,
        now: int,
        *,
        ended: bool,
    ) -> list[Effect]:
        """Record that ``name`` is (info) or is not (None) online on ``server``. ``ended``:
        a session that goes is over for good (not just out of reach behind a dead link)."""
        key = name_key(name)
        user = self.online.get(key)
        if user is None:
            if info is None:
                return []
            user = self.online[key] = OnlineUser(info.user, info.account)
            self._gone_guests.pop(key, None)
        before = user.servers(self.server)
        old = user.remote.get(server)
        effects: list[Effect] = []
        if old is not None and (info is None or info.uid != old.uid):
            _unindex(self.remote_uids, old.uid, server)
            self._pushing.pop((server, old.uid), None)
            if ended and old.uid.startswith(GUEST_UID_PREFIX):
                effects.append(DropBacklog(old.uid, now))
        if info is None:
            user.remote.pop(server, None)
        else:
            user.remote[server] = info
            if not user.conns:
                user.uid = info.uid  # whose last-seen it is when it goes (hub)
            if old is None or old.uid != info.uid:
                self.remote_uids.setdefault(info.uid, set()).add(server)
            if old is None or old.uid != info.uid or old.logins != info.logins:
                effects.append(self._push(server, info.uid))
        effects += self._presence_changed(key, before, now)
        if info is not None and user.conns and self._loses_name(user, server, info):
            effects += self._kick_name_holder(user)
        return effects

    def _push(self, server: str, uid: str) -> PushBacklog:
        """``uid`` appeared on ``server``: load what is stored here for it (and receipts it
        is owed) to relay there; live messages for it wait behind the load."""
        self._push_tokens += 1
        self._pushing[server, uid] = self._push_tokens
        return PushBacklog(server, uid, self._push_tokens)

    def backlog_for_peer(self, server: str, uid: str, token: int, backlog: Backlog) -> list[Effect]:
        """The backlog a :class:`PushBacklog` asked for is loaded: relay it."""
        if self._pushing.get((server, uid)) != token:
            return []  # the session or the link went meanwhile; a new push follows if needed
        del self._pushing[server, uid]
        effects: list[Effect] = []
        for stored in backlog.messages:
            relay = peerproto.Relay(
                stored.msg, stored.sender, stored.to, stored.text, stored.ts, uid, push=True
            )
            effects.append(ToPeers([server], relay))
        if backlog.receipts:
            for r in backlog.receipts:
                sender = self.book.name_of(uid) or r.by
                notice = peerproto.ReceiptNotice(r.msg, sender, r.status, r.by, r.ts, uid)
                effects.append(ToPeers([server], notice))
            effects.append(ReceiptsTold([(r.msg, r.bits) for r in backlog.receipts]))
        effects.append(ToPeers([server], peerproto.Pushed(uid)))
        return effects

    def owed_loaded(self, server: str, receipts: list[peerproto.PeerReceipt]) -> list[Effect]:
        """Receipts kept on disk for ``server`` are loaded (and taken off disk): send them,
        or keep them again if the link went meanwhile."""
        if server in self.peers:
            return [ToPeers([server], r) for r in receipts]
        return [OweToPeer(server, r) for r in receipts]

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
        """A message stored elsewhere, for an identity connected here (only its own
        connections get it: a guest who left and a new guest of the same name, or two
        accounts that had one name, are different people). A connection waiting for a push
        from ``server`` takes only the push: a live relay is in it, in its place."""
        conns = sorted(self.local_uids.get(relay.uid, ()))
        if not relay.push:
            conns = [c for c in conns if server not in self.conns[c].awaiting]
        if not conns:
            return []  # gone meanwhile: the server that stored it keeps it
        effects: list[Effect] = []
        if relay.push:
            for conn in conns:  # held broadcasts sent before this message come first
                effects += _release(conn, self.conns[conn], server, before=relay.msg)
        event = messages.Message(relay.msg, relay.sender, relay.to, relay.text, relay.ts)
        effects.append(Deliver(conns, event))
        auto = [c for c in conns if self.conns[c].auto_ack]
        if auto:
            entry = self.conns[auto[0]]
            effects += self._receipt(relay.msg, entry.user, relay.uid, "delivered", now)
        return effects


def _msg_order(msg: str) -> tuple[str, int]:
    """A message id's server and incarnation, and its number there (protocol.md "ids")."""
    prefix, _, seq = msg.rpartition(":")
    return prefix, int(seq) if seq.isdigit() else 0


def _release(conn: int, entry: ConnEntry, server: str, before: str | None = None) -> list[Effect]:
    """Deliver ``entry``'s held broadcasts from ``server`` (only those numbered before the
    message ``before``, when given), in order."""
    if not entry.held:
        return []
    limit = _msg_order(before) if before is not None else None
    keep: list[messages.Message] = []
    out: list[Effect] = []
    for event in entry.held:
        origin = event.msg.partition(":")[0]
        order = _msg_order(event.msg)
        if origin == server and (limit is None or (order[0] == limit[0] and order < limit)):
            out.append(Deliver([conn], event))
        else:
            keep.append(event)
    entry.held = keep
    return out


def _unindex(index: dict[str, set[str]], uid: str, server: str) -> None:
    servers = index.get(uid)
    if servers is not None:
        servers.discard(server)
        if not servers:
            del index[uid]
