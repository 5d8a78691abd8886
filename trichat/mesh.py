"""The routing core's side of the mesh: other servers' sessions, relays, name conflicts.

Owns: protocol.md "Peer links" as the hub applies it: each server is the authority for its
own sessions and tells its peers by a snapshot on link-up and one small delta per change;
what a peer says is versioned (boot, seq) so a stale or repeated update never overwrites a
newer one; private messages for users on other servers are relayed and kept until
acknowledged; guest name conflicts are settled the same way on every server. Must never:
do I/O or read a clock (like hub.py, whose state it shares as a mixin).
"""

from __future__ import annotations

from collections import OrderedDict

from trichat import errors, messages, peerproto
from trichat.effects import (
    Close,
    ConnEntry,
    Deliver,
    Effect,
    OnlineUser,
    Reply,
    Seen,
    StoredMessage,
    StoreReceipt,
    ToPeers,
)
from trichat.names import is_valid_name, name_key

BROADCAST_TO = "*"
MAX_PENDING_RELAYS = 10000  # per peer, awaiting relay_ack; beyond it the oldest are dropped


class MeshRouting:
    """Mixed into :class:`trichat.hub.Hub`; the attributes below are the hub's."""

    server: str
    boot: str
    peers: set[str]
    online: dict[str, OnlineUser]
    conns: dict[int, ConnEntry]
    _gone_guests: OrderedDict[str, Seen]
    _presence_seq: int
    _remote_versions: dict[str, tuple[str, int]]
    _pending_relays: dict[str, OrderedDict[str, peerproto.Relay]]

    def _all_conns(self, exclude: int | None = None) -> list[int]:
        raise NotImplementedError

    def _presence_changed(
        self, key: str, before: list[str], now: int, exclude: int | None = None
    ) -> list[Effect]:
        raise NotImplementedError

    # --- what a request needs from the mesh --------------------------------------

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

    def _relay(self, server: str, stored: StoredMessage, since: int) -> list[Effect]:
        """Hand a stored message to the server the recipient is on; kept until acknowledged
        and sent again if the link drops first (protocol.md "Relay")."""
        relay = peerproto.Relay(stored.msg, stored.sender, stored.to, stored.text, stored.ts, since)
        pending = self._pending_relays.setdefault(server, OrderedDict())
        pending[stored.msg] = relay
        while len(pending) > MAX_PENDING_RELAYS:
            pending.popitem(last=False)
        if server not in self.peers:
            return []
        return [ToPeers([server], relay)]

    # --- what peers say --------------------------------------------------------------

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
        if not target.account and relay.since is not None and relay.since != target.since:
            return effects  # that guest left; this is another person with the same name
        event = messages.Message(relay.msg, relay.sender, relay.to, relay.text, relay.ts)
        conns = sorted(target.conns)
        effects.append(Deliver(conns, event))
        if any(self.conns[c].auto_ack for c in conns):
            effects += self._receipt(relay.msg, target.name, "delivered", now)
        return effects
