"""Registering accounts in the mesh, and keeping every server's set of accounts the same.

Owns: protocol.md "Accounts across the mesh": the claim a registering server sends to its
linked peers before it says ``welcome`` (so two registrations of one name on linked servers
give exactly one ``welcome``), the exchange of account records on link-up (each side sends
only what the other's version vector lacks) and their flooding as they are made, and what a
rename (:mod:`trichat.accounts`) does to the sessions of the account that lost its name.
Must never: do I/O, read a clock or hash a password (like hub.py, whose state it shares as a
mixin); the merge rule itself is :class:`~trichat.accounts.AccountBook`'s.
"""

from __future__ import annotations

import attrs

from trichat import errors, messages, peerproto
from trichat.accounts import AccountBook, AccountRecord, Renamed
from trichat.effects import ClaimSettled, Close, Effect, Reply, StoreAccounts, ToPeers
from trichat.errors import ProtocolError
from trichat.names import check_name, name_key


@attrs.define
class Registration:
    """A registration under way on this server: waiting for its linked peers' replies."""

    rid: str
    name: str
    created: int
    waiting: set[str]
    lost: bool = False

    @property
    def settled(self) -> bool:
        return self.lost or not self.waiting


@attrs.frozen
class HeldClaim:
    """A peer's registration under way: the name is held for it until it ends."""

    rank: tuple[int, str]
    server: str
    rid: str


class RegistrationRouting:
    """Mixed into :class:`trichat.hub.Hub`; the attributes below are the hub's."""

    server: str
    book: AccountBook
    peers: set[str]
    local_uids: dict[str, set[int]]

    def _init_registration(self) -> None:
        self._registering: dict[str, Registration] = {}  # name key -> ours under way
        self._held: dict[str, HeldClaim] = {}  # name key -> a peer's under way
        self._announcing: dict[str, Registration] = {}  # rid -> new accounts being told
        self._rids = 0
        self._last_oseq = 0  # the last oseq handed out here

    def _name_claimed(self, key: str) -> bool:
        return key in self._registering or key in self._held

    def _guest_name_taken(self, key: str) -> bool:
        raise NotImplementedError

    # --- our registrations ------------------------------------------------------------

    def begin_register(self, name: str, now: int) -> tuple[Registration, list[Effect]]:
        """Start registering ``name``: it is held here at once, and claimed from every
        linked peer. Wait for :attr:`Registration.settled` (a :class:`ClaimSettled`),
        then call :meth:`make_account`.

        Raises:
            ProtocolError: ``bad_name`` or ``name_taken``.
        """
        check_name(name)
        key = name_key(name)
        if self.book.holder(name) is not None or self._guest_name_taken(key):
            raise ProtocolError(errors.NAME_TAKEN, f"{name} is taken; pick another name")
        self._rids += 1
        reg = Registration(f"{self.server}.{now}.{self._rids}", name, now, set(self.peers))
        self._registering[key] = reg
        effects: list[Effect] = []
        if reg.waiting:
            claim = peerproto.Claim(reg.rid, name, now)
            effects.append(ToPeers(sorted(reg.waiting), claim))
        return reg, effects

    def make_account(self, reg: Registration, uid: str, pw_hash: str) -> AccountRecord:
        """The record to store for a settled registration.

        Raises:
            ProtocolError: ``name_taken``: a linked peer holds an earlier claim or account.
        """
        if reg.lost or self.book.holder(reg.name) is not None:
            raise ProtocolError(errors.NAME_TAKEN, f"{reg.name} is taken; pick another name")
        # Registrations under way on this server side by side each take their own number.
        oseq = self._last_oseq = max(self.book.next_oseq(self.server), self._last_oseq + 1)
        return AccountRecord(uid, reg.name, pw_hash, reg.created, self.server, oseq)

    def account_stored(self, reg: Registration, record: AccountRecord) -> list[Effect]:
        """Our new account is on disk: it exists, and every linked peer learns it. Wait
        for :attr:`Registration.settled` again (each peer answers once it has the record:
        the account logs in anywhere once ``welcome`` is out), then :meth:`announced`."""
        self._registering.pop(name_key(reg.name), None)
        effects = self._apply_renames(self.book.add(record) or [])
        reg.waiting = set(self.peers)
        if reg.waiting:
            self._announcing[reg.rid] = reg
            announce = peerproto.Accounts([record], rid=reg.rid)
            effects.append(ToPeers(sorted(reg.waiting), announce))
        return effects

    def announced(self, reg: Registration) -> None:
        """Done waiting for peers to learn the new account (or out of time)."""
        self._announcing.pop(reg.rid, None)

    def abort_register(self, reg: Registration) -> list[Effect]:
        """The registration failed (name taken, storage, a disconnect): let the name go."""
        if self._registering.get(name_key(reg.name)) is reg:
            del self._registering[name_key(reg.name)]
        if not self.peers:
            return []
        return [ToPeers(sorted(self.peers), peerproto.ClaimEnd(reg.rid))]

    def _lose(self, reg: Registration) -> list[Effect]:
        if reg.lost:
            return []
        reg.lost = True
        return [ClaimSettled(reg.rid)]

    # --- what peers say ---------------------------------------------------------------

    def _accounts_up(self, server: str) -> list[Effect]:
        return [ToPeers([server], peerproto.AccountsHave(self.book.have()))]

    def _accounts_down(self, server: str) -> list[Effect]:
        for key in [k for k, held in self._held.items() if held.server == server]:
            del self._held[key]
        effects: list[Effect] = []
        for reg in [*self._registering.values(), *self._announcing.values()]:
            if server in reg.waiting:
                # Cut off: the partition rule (protocol.md "Name conflicts") settles it.
                reg.waiting.discard(server)
                if reg.settled:
                    effects.append(ClaimSettled(reg.rid))
        return effects

    def _accounts_message(self, server: str, message: peerproto.PeerMessage) -> list[Effect]:
        match message:
            case peerproto.AccountsHave(have=have):
                missing = self.book.missing_for(have)
                size = peerproto.ACCOUNTS_PER_MESSAGE
                return [
                    ToPeers([server], peerproto.Accounts(missing[i : i + size]))
                    for i in range(0, len(missing), size)
                ]
            case peerproto.Accounts(records=records, rid=rid):
                effects = self._learn_accounts(server, records)
                if rid is not None:
                    effects.append(ToPeers([server], peerproto.ClaimReply(rid, True)))
                return effects
            case peerproto.Claim(rid=rid, name=name, created=created):
                return self._peer_claim(server, rid, name, created)
            case peerproto.ClaimReply(rid=rid, ok=ok):
                return self._claim_reply(server, rid, ok)
            case peerproto.ClaimEnd(rid=rid):
                for key in [k for k, h in self._held.items() if (h.server, h.rid) == (server, rid)]:
                    del self._held[key]
        return []  # membership and link messages are the shell's (peers.py)

    def _peer_claim(self, server: str, rid: str, name: str, created: int) -> list[Effect]:
        """A peer registers ``name``: yes, unless an account has it, a guest is online
        with it, or an earlier claim (ours or another peer's) holds it."""
        key = name_key(name)
        rank = (created, server)
        effects: list[Effect] = []
        ok = self.book.holder(name) is None and not self._guest_online(key)
        ours = self._registering.get(key)
        if ok and ours is not None:
            if (ours.created, self.server) < rank:
                ok = False
            else:
                effects += self._lose(ours)
        held = self._held.get(key)
        if ok and held is not None and held.server != server and held.rank < rank:
            ok = False
        if ok:
            self._held[key] = HeldClaim(rank, server, rid)
        effects.append(ToPeers([server], peerproto.ClaimReply(rid, ok)))
        return effects

    def _guest_online(self, key: str) -> bool:
        raise NotImplementedError

    def _claim_reply(self, server: str, rid: str, ok: bool) -> list[Effect]:
        for reg in [*self._registering.values(), *self._announcing.values()]:
            if reg.rid == rid and server in reg.waiting:
                reg.waiting.discard(server)
                if not ok:
                    return self._lose(reg)
                return [ClaimSettled(reg.rid)] if reg.settled else []
        return []

    def _learn_accounts(self, server: str, records: list[AccountRecord]) -> list[Effect]:
        """Records from a peer: keep the new ones, pass them on to the other linked peers
        (a server not linked to their origin learns them too), settle names."""
        new: list[AccountRecord] = []
        renamed: list[Renamed] = []
        effects: list[Effect] = []
        for record in records:
            changes = self.book.add(record)
            if changes is None:
                continue
            new.append(record)
            renamed += changes
            key = name_key(record.name)
            held = self._held.get(key)
            if held is not None and held.server == record.origin:
                del self._held[key]
            ours = self._registering.get(key)
            if ours is not None and record.rank < (ours.created, self.server, ""):
                effects += self._lose(ours)
        if not new:
            return effects
        effects.append(StoreAccounts(new))
        others = sorted(self.peers - {server})
        if others:
            effects.append(ToPeers(others, peerproto.Accounts(new)))
        return effects + self._apply_renames(renamed)

    def _apply_renames(self, renamed: list[Renamed]) -> list[Effect]:
        """An account of ours lost its name: its connections here are told, and closed so
        that they log in again under the name it goes by now."""
        effects: list[Effect] = []
        for change in renamed:
            for conn in sorted(self.local_uids.get(change.uid, ())):
                notice = renamed_notice(change.old, change.new)
                effects.append(Reply(conn, notice))
                effects.append(Close(conn, messages.Bye("renamed", notice.message)))
        return effects


def renamed_notice(old: str, new: str) -> messages.Renamed:
    return messages.Renamed(
        old,
        new,
        f"{old} was registered earlier by someone else on another server: this account "
        f"goes on as {new} (log in with either name and your password)",
    )
