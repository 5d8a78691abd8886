"""Registering accounts across the mesh: two or three Hub cores wired back to back.

Peer messages cross as bytes (peerproto.encode_peer, then decode_peer), in order on each
link, as a real link would carry them; everything else the hubs ask of the shell is kept
for the test to look at (protocol.md "Accounts across the mesh", "Name conflicts").
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trichat import errors, messages, peerproto
from trichat.accounts import AccountRecord, derived_name
from trichat.effects import (
    Backlog,
    ClaimSettled,
    Close,
    Effect,
    PushBacklog,
    Reply,
    StoreAccounts,
    ToPeers,
)
from trichat.errors import ProtocolError
from trichat.hub import Hub
from trichat.registration import Registration
from trichat.store import CreateAccount, Database

T0 = 1_700_000_000_000


class Mesh:
    """Hubs named s1, s2, ... and the links between them."""

    def __init__(self, *names: str, accounts: dict[str, list[AccountRecord]] | None = None):
        accounts = accounts or {}
        self.hubs = {n: Hub(n, incarnation=f"b{n}", accounts=accounts.get(n, ())) for n in names}
        self.links: set[frozenset[str]] = set()
        self.wire: deque[tuple[str, str, bytes]] = deque()
        self.delivered: list[tuple[str, str, peerproto.PeerMessage]] = []
        self.effects: dict[str, list[Effect]] = {n: [] for n in names}
        self.now = T0

    # --- the shell's part ---------------------------------------------------------

    def apply(self, server: str, effects: Iterable[Effect]) -> None:
        hub = self.hubs[server]
        for effect in effects:
            if isinstance(effect, ToPeers):
                line = peerproto.encode_peer(effect.message)
                for dst in effect.servers:
                    assert frozenset((server, dst)) in self.links, (server, dst, effect)
                    self.wire.append((server, dst, line))
                continue
            self.effects[server].append(effect)
            if isinstance(effect, PushBacklog):  # nothing stored: an empty backlog
                pushed = hub.backlog_for_peer(effect.server, effect.uid, effect.token, Backlog())
                self.apply(server, pushed)
            elif isinstance(effect, Close):  # the connection closes: it is gone
                self.apply(server, hub.disconnect(effect.conn, self.now))

    def link(self, a: str, b: str) -> None:
        self.links.add(frozenset((a, b)))
        self.apply(a, self.hubs[a].peer_up(b, self.now))
        self.apply(b, self.hubs[b].peer_up(a, self.now))

    def cut(self, a: str, b: str) -> None:
        """The link goes down: what was on its way is lost."""
        self.links.discard(frozenset((a, b)))
        self.wire = deque(m for m in self.wire if {m[0], m[1]} != {a, b})
        self.apply(a, self.hubs[a].peer_down(b, self.now))
        self.apply(b, self.hubs[b].peer_down(a, self.now))

    def channels(self) -> list[tuple[str, str]]:
        return sorted({(src, dst) for src, dst, _ in self.wire})

    def step(self, channel: tuple[str, str] | None = None) -> None:
        """Deliver the oldest message (of one link direction, if given)."""
        index = 0
        if channel is not None:
            index = next(i for i, m in enumerate(self.wire) if (m[0], m[1]) == channel)
        src, dst, line = self.wire[index]
        del self.wire[index]
        message = peerproto.decode_peer(line)
        self.delivered.append((src, dst, message))
        self.apply(dst, self.hubs[dst].peer_message(src, message, self.now))

    def pump(self) -> None:
        while self.wire:
            self.step()

    # --- what clients do ------------------------------------------------------------

    def begin(self, server: str, name: str, created: int = T0) -> Registration:
        reg, effects = self.hubs[server].begin_register(name, created)
        self.apply(server, effects)
        return reg

    def finish(self, server: str, reg: Registration, uid: str) -> AccountRecord | str:
        """The registration's outcome: its stored record, or the error code."""
        hub = self.hubs[server]
        try:
            record = hub.make_account(reg, uid, f"hash:{uid}")
        except ProtocolError as exc:
            self.apply(server, hub.abort_register(reg))
            return exc.code
        self.apply(server, hub.account_stored(reg, record))
        return record

    def register(self, server: str, name: str, uid: str, created: int = T0) -> AccountRecord:
        """A whole registration, every message crossing as soon as it is sent."""
        reg = self.begin(server, name, created)
        self.pump()
        assert reg.settled
        record = self.finish(server, reg, uid)
        assert isinstance(record, AccountRecord), record
        self.pump()
        self.announced(server, reg, record)
        return record

    def announced(self, server: str, reg: Registration, record: AccountRecord) -> None:
        """The shell waits until every linked peer has the new record, then says welcome:
        from then on the account logs in on any of them."""
        assert reg.settled
        for peer in self.hubs[server].peers:
            assert self.hubs[peer].book.get(record.uid) == record, peer
        self.hubs[server].announced(reg)

    def login(self, server: str, conn: int, name: str, uid: str | None = None) -> list[Effect]:
        effects = self.hubs[server].login(
            conn, name, auto_ack=False, now=self.now, req_id=None, uid=uid
        )
        self.apply(server, effects)
        hub = self.hubs[server]
        if conn in hub.conns:
            self.apply(server, hub.backlog_loaded(conn, Backlog()))
        return effects

    def records_sent(self, src: str, dst: str) -> list[AccountRecord]:
        return [
            r
            for s, d, m in self.delivered
            if (s, d) == (src, dst) and isinstance(m, peerproto.Accounts)
            for r in m.records
        ]


def books_equal(mesh: Mesh) -> bool:
    books = [hub.book for hub in mesh.hubs.values()]
    return all(b.names() == books[0].names() and len(b) == len(books[0]) for b in books)


def full_mesh(*names: str) -> Mesh:
    mesh = Mesh(*names)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            mesh.link(a, b)
    mesh.pump()
    return mesh


def uid(n: int) -> str:
    return f"{n:04x}" * 4


# --- claims ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("created1", "created2", "winner"),
    [(T0, T0, "s1"), (T0 + 1, T0, "s2"), (T0, T0 + 1, "s1")],
    ids=["same-ms-server-order", "s2-earlier", "s1-earlier"],
)
def test_two_registrations_of_one_name_at_once_make_one_account(
    created1: int, created2: int, winner: str
) -> None:
    mesh = full_mesh("s1", "s2")
    reg1 = mesh.begin("s1", "dan", created1)
    reg2 = mesh.begin("s2", "DAN", created2)  # before either claim has crossed
    mesh.pump()
    assert reg1.settled and reg2.settled
    outcome = {"s1": mesh.finish("s1", reg1, uid(1)), "s2": mesh.finish("s2", reg2, uid(2))}
    mesh.pump()
    loser = "s2" if winner == "s1" else "s1"
    record = outcome[winner]
    assert isinstance(record, AccountRecord) and record.origin == winner
    assert outcome[loser] == errors.NAME_TAKEN
    for hub in mesh.hubs.values():
        assert hub.book.names() == {record.uid: record.name}
    # Each side was woken when its registration settled.
    for server, reg in (("s1", reg1), ("s2", reg2)):
        assert ClaimSettled(reg.rid) in mesh.effects[server]


def test_three_registrations_of_one_name_at_once_make_one_account() -> None:
    mesh = full_mesh("s1", "s2", "s3")
    regs = {s: mesh.begin(s, "dan", T0 + 3 - i) for i, s in enumerate(["s1", "s2", "s3"])}
    mesh.pump()
    outcome = {s: mesh.finish(s, reg, uid(i)) for i, (s, reg) in enumerate(regs.items())}
    mesh.pump()
    made = [r for r in outcome.values() if isinstance(r, AccountRecord)]
    assert [r.origin for r in made] == ["s3"]  # the earliest
    assert sorted(r for r in outcome.values() if isinstance(r, str)) == ["name_taken"] * 2
    assert books_equal(mesh)


def test_welcome_waits_until_every_linked_peer_has_the_new_account() -> None:
    mesh = full_mesh("s1", "s2", "s3")
    reg = mesh.begin("s1", "dan")
    mesh.pump()
    record = mesh.finish("s1", reg, uid(1))
    assert isinstance(record, AccountRecord)
    assert not reg.settled  # waiting for s2 and s3 to have it
    mesh.step(("s1", "s2"))
    mesh.step(("s2", "s1"))  # s2 has it and says so
    assert mesh.hubs["s2"].check_login("dan", "pw") == [record]
    assert not reg.settled
    mesh.cut("s1", "s3")  # s3 goes: no longer waited for
    assert reg.settled
    assert ClaimSettled(reg.rid) in mesh.effects["s1"]
    mesh.hubs["s1"].announced(reg)


def test_two_registrations_under_way_on_one_server_both_succeed(tmp_path: Path) -> None:
    hub = Hub("s1")
    ann, _ = hub.begin_register("ann", T0)
    bob, _ = hub.begin_register("bob", T0 + 1)
    # service.py: each makes its record, then awaits CreateAccount; both are in flight.
    records = [hub.make_account(ann, uid(1), "h1"), hub.make_account(bob, uid(2), "h2")]
    database = Database(str(tmp_path / "data"), "s1")
    try:
        stored = database.run_batch([CreateAccount(r) for r in records])
    finally:
        database.close()
    assert stored == [True, True]  # else the shell answers name_taken
    assert records[0].oseq != records[1].oseq  # the version vector needs each its own


def test_a_registration_with_no_linked_peers_waits_for_nobody() -> None:
    mesh = Mesh("s1")
    reg = mesh.begin("s1", "dan")
    assert reg.settled and mesh.wire == deque()
    assert isinstance(mesh.finish("s1", reg, uid(1)), AccountRecord)


def test_a_claim_of_a_name_an_account_holds_is_refused() -> None:
    dan = AccountRecord(uid(9), "dan", "h", T0 - 5, "s2", 1)
    mesh = Mesh("s1", "s2", accounts={"s2": [dan]})
    # Linked, but the account has not reached s1 yet: s1 lets the registration start.
    mesh.links.add(frozenset(("s1", "s2")))
    mesh.hubs["s1"].peers.add("s2")
    mesh.hubs["s2"].peers.add("s1")
    reg = mesh.begin("s1", "Dan", T0)
    mesh.pump()
    [reply] = [m for _, _, m in mesh.delivered if isinstance(m, peerproto.ClaimReply)]
    assert reply == peerproto.ClaimReply(reg.rid, ok=False)
    assert reg.settled and reg.lost
    assert mesh.finish("s1", reg, uid(1)) == errors.NAME_TAKEN
    mesh.pump()
    assert mesh.hubs["s2"].book.names() == {dan.uid: "dan"}  # nothing new anywhere
    assert len(mesh.hubs["s1"].book) == 0


def test_a_claim_of_a_name_a_guest_is_online_with_is_refused() -> None:
    mesh = full_mesh("s1", "s2")
    mesh.hubs["s2"].login(1, "dan", auto_ack=False, now=T0, req_id=None)
    # Not told to s1 (its session delta is not delivered): s1 starts registering.
    reg = mesh.begin("s1", "dan")
    mesh.step(("s1", "s2"))
    mesh.step(("s2", "s1"))
    assert reg.lost
    assert mesh.finish("s1", reg, uid(1)) == errors.NAME_TAKEN


def test_a_held_claim_keeps_the_name_from_guests_and_registrations_there() -> None:
    mesh = full_mesh("s1", "s2")
    mesh.begin("s1", "dan")
    mesh.pump()
    s2 = mesh.hubs["s2"]
    for call in (
        lambda: s2.check_login("dan", None),
        lambda: s2.login(1, "DAN", auto_ack=False, now=T0, req_id=None),
        lambda: s2.begin_register("dan", T0 + 1),
    ):
        with pytest.raises(ProtocolError) as info:
            call()
        assert info.value.code == errors.NAME_TAKEN


def test_a_claim_is_released_by_claim_end() -> None:
    mesh = full_mesh("s1", "s2")
    reg = mesh.begin("s1", "dan")
    mesh.pump()
    mesh.apply("s1", mesh.hubs["s1"].abort_register(reg))  # e.g. the client went away
    mesh.pump()
    assert peerproto.ClaimEnd(reg.rid) in [m for _, _, m in mesh.delivered]
    assert mesh.hubs["s2"].check_login("dan", None) == []  # a guest may have it now
    assert mesh.hubs["s1"].check_login("dan", None) == []


def test_a_claim_end_of_another_registration_releases_nothing() -> None:
    mesh = full_mesh("s1", "s2")
    mesh.begin("s1", "dan")
    mesh.pump()
    mesh.apply("s2", mesh.hubs["s2"].peer_message("s1", peerproto.ClaimEnd("other"), T0))
    with pytest.raises(ProtocolError):
        mesh.hubs["s2"].check_login("dan", None)


def test_a_claim_is_released_when_its_server_goes_and_the_registration_goes_on() -> None:
    mesh = full_mesh("s1", "s2", "s3")
    reg = mesh.begin("s1", "dan")
    mesh.step(("s1", "s2"))  # s2 holds the claim; s3 has not seen it yet
    assert not reg.settled
    mesh.cut("s1", "s2")
    assert mesh.hubs["s2"].check_login("dan", None) == []  # released with the link
    assert not reg.settled  # still waiting for s3
    mesh.pump()
    assert reg.settled and not reg.lost  # s2 stopped being waited for
    assert isinstance(mesh.finish("s1", reg, uid(1)), AccountRecord)


# --- the exchange on link-up, and flooding -----------------------------------------------


def test_link_up_sends_each_side_only_what_it_lacks() -> None:
    a = [AccountRecord(uid(i), f"a{i}", "h", T0 + i, "s1", i) for i in range(1, 4)]
    b = [AccountRecord(uid(10 + i), f"b{i}", "h", T0 + i, "s2", i) for i in range(1, 3)]
    mesh = Mesh("s1", "s2", accounts={"s1": [*a, b[0]], "s2": [a[0], *b]})
    mesh.link("s1", "s2")
    mesh.pump()
    assert books_equal(mesh) and len(mesh.hubs["s1"].book) == 5
    assert mesh.records_sent("s1", "s2") == a[1:]
    assert mesh.records_sent("s2", "s1") == b[1:]
    assert StoreAccounts(a[1:]) in mesh.effects["s2"]  # learned records are stored
    assert StoreAccounts(b[1:]) in mesh.effects["s1"]
    # A second link-up between equal books sends no records at all.
    mesh.cut("s1", "s2")
    before = len(mesh.delivered)
    mesh.link("s1", "s2")
    mesh.pump()
    assert not any(isinstance(m, peerproto.Accounts) for _, _, m in mesh.delivered[before:])


def test_many_records_cross_in_pages() -> None:
    size = peerproto.ACCOUNTS_PER_MESSAGE
    records = [AccountRecord(uid(i), f"u{i}", "h", T0, "s1", i) for i in range(1, size + 3)]
    mesh = Mesh("s1", "s2", accounts={"s1": records})
    mesh.link("s1", "s2")
    mesh.pump()
    pages = [m for s, _, m in mesh.delivered if isinstance(m, peerproto.Accounts)]
    assert [len(p.records) for p in pages] == [size, 2]
    assert len(mesh.hubs["s2"].book) == size + 2


def test_a_new_account_reaches_every_linked_peer_at_once() -> None:
    mesh = full_mesh("s1", "s2", "s3")
    record = mesh.register("s1", "dan", uid(1))
    for server in ("s2", "s3"):
        assert mesh.hubs[server].book.get(record.uid) == record
        assert mesh.records_sent("s1", server) == [record]
    # Flooding: a copy passed on to a server that has it already changes nothing there
    # (stored once), and none goes back to the origin.
    for server in ("s2", "s3"):
        stored = [e for e in mesh.effects[server] if isinstance(e, StoreAccounts)]
        assert stored == [StoreAccounts([record])]
        assert mesh.records_sent(server, "s1") == []


def test_a_record_learned_from_one_peer_is_passed_on_to_the_others() -> None:
    # A line: s1 - s2 - s3. s3 is not linked to the origin, s1.
    mesh = Mesh("s1", "s2", "s3")
    mesh.link("s1", "s2")
    mesh.link("s2", "s3")
    mesh.pump()
    record = mesh.register("s1", "dan", uid(1))
    assert mesh.hubs["s3"].book.get(record.uid) == record
    assert mesh.records_sent("s2", "s3") == [record]
    assert mesh.records_sent("s2", "s1") == []  # not back where it came from
    assert StoreAccounts([record]) in mesh.effects["s3"]


def test_records_learned_on_link_up_are_passed_on_too() -> None:
    old = AccountRecord(uid(1), "old", "h", T0, "s1", 1)
    mesh = Mesh("s1", "s2", "s3", accounts={"s1": [old]})
    mesh.link("s2", "s3")
    mesh.pump()
    mesh.link("s1", "s2")
    mesh.pump()
    assert mesh.hubs["s3"].book.get(old.uid) == old


# --- a partition, and its healing --------------------------------------------------------


def partitioned_dans() -> tuple[Mesh, AccountRecord, AccountRecord]:
    """s1 and s2 unlinked; dan registered on each, s1's first; each logged in at home."""
    mesh = Mesh("s1", "s2")
    first = mesh.register("s1", "dan", uid(1), T0)
    second = mesh.register("s2", "dan", uid(2), T0 + 5)
    mesh.login("s1", 3, "dan", first.uid)
    mesh.login("s2", 7, "dan", second.uid)
    mesh.login("s2", 8, "dan", second.uid)  # a second device
    mesh.login("s2", 9, "eve")
    return mesh, first, second


def test_after_a_partition_the_earlier_registration_keeps_the_name_everywhere() -> None:
    mesh, first, second = partitioned_dans()
    mesh.link("s1", "s2")
    mesh.pump()
    derived = derived_name("dan", second.uid)
    for hub in mesh.hubs.values():
        assert hub.book.names() == {first.uid: "dan", second.uid: derived}
        assert hub.book.holder("dan") == first.uid


def test_the_renamed_accounts_connections_are_told_and_closed() -> None:
    mesh, _, second = partitioned_dans()
    mesh.link("s1", "s2")
    mesh.pump()
    derived = derived_name("dan", second.uid)
    s2 = mesh.effects["s2"]
    for conn in (7, 8):
        [notice] = [
            e for e in s2 if isinstance(e, Reply) and e.conn == conn and e.event.TYPE == "renamed"
        ]
        assert isinstance(notice.event, messages.Renamed)
        assert (notice.event.old, notice.event.user) == ("dan", derived)
        [close] = [e for e in s2 if isinstance(e, Close) and e.conn == conn]
        assert close.bye.reason == "renamed"
        assert s2.index(notice) < s2.index(close)  # told first, then closed
    assert set(mesh.hubs["s2"].conns) == {9}  # eve stays
    # The winner's connection on s1 is left alone.
    assert not any(isinstance(e, Close) for e in mesh.effects["s1"])
    assert 3 in mesh.hubs["s1"].conns
    # Everyone sees one dan, the winner, online on s1 only.
    assert status(mesh, "dan") == messages.Status("dan", True, server="s1", servers=["s1"])
    # The loser, back under its new name, is seen under it on s2 by everyone.
    mesh.login("s2", 30, "dan", second.uid)
    mesh.pump()
    assert status(mesh, derived) == messages.Status(derived, True, server="s2", servers=["s2"])


def status(mesh: Mesh, name: str) -> messages.Status:
    """What ``status`` answers about ``name``: the same on every server, or it fails."""
    answers = []
    for hub in mesh.hubs.values():
        conn = min(hub.conns)  # any logged-in connection there may ask
        [reply] = hub.handle(conn, messages.StatusRequest(name), 1, T0)
        assert isinstance(reply, Reply) and isinstance(reply.event, messages.Status)
        answers.append(reply.event)
    assert all(a == answers[0] for a in answers)
    return answers[0]


def test_the_loser_logs_in_again_with_the_old_name_and_its_password() -> None:
    mesh, first, second = partitioned_dans()
    mesh.link("s1", "s2")
    mesh.pump()
    derived = derived_name("dan", second.uid)
    for server in ("s1", "s2"):
        hub = mesh.hubs[server]
        candidates = hub.check_login("dan", "second's password")
        assert candidates == [first, second]  # the holder, then the one that lost it
        # The shell tries the password on each; the second's matches.
        [match] = [r for r in candidates if r.pw_hash == f"hash:{second.uid}"]
        effects = mesh.login(server, 20, "dan", match.uid)
        welcome = effects[0]
        assert isinstance(welcome, Reply) and isinstance(welcome.event, messages.Welcome)
        assert welcome.event.user == derived
        renamed = effects[1]
        assert isinstance(renamed, Reply) and isinstance(renamed.event, messages.Renamed)
        assert (renamed.event.old, renamed.event.user) == ("dan", derived)
        assert hub.conns[20].uid == second.uid
        mesh.apply(server, hub.disconnect(20, T0))
        mesh.pump()
    # By its new name, it logs in without a notice.
    assert mesh.hubs["s1"].check_login(derived, "pw") == [second]
    effects = mesh.login("s1", 21, derived, second.uid)
    assert not any(isinstance(e, Reply) and isinstance(e.event, messages.Renamed) for e in effects)


def test_the_loser_leaving_is_not_the_winners_last_seen() -> None:
    mesh = Mesh("s1", "s2")
    mesh.register("s1", "dan", uid(1), T0)  # never logs in
    second = mesh.register("s2", "dan", uid(2), T0 + 5)
    mesh.login("s1", 3, "eve")
    mesh.login("s2", 7, "dan", second.uid)
    mesh.login("s2", 9, "gus")
    mesh.now = T0 + 1000
    mesh.link("s1", "s2")
    mesh.pump()  # the loser is renamed: its connection is closed, it leaves
    assert status(mesh, "dan") == messages.Status("dan", False, last_seen=None)


def test_after_healing_a_message_to_the_name_goes_to_the_earlier_account() -> None:
    mesh, first, second = partitioned_dans()
    mesh.link("s1", "s2")
    mesh.pump()
    s2 = mesh.hubs["s2"]
    [store] = s2.handle(9, messages.SendRequest("dan", "for the real dan"), "q", T0)
    assert store.message.to_uid == first.uid  # type: ignore[union-attr]
    [store] = s2.handle(9, messages.SendRequest(derived_name("dan", second.uid), "x"), "q", T0)
    assert store.message.to_uid == second.uid  # type: ignore[union-attr]


def test_a_registration_under_way_loses_to_an_earlier_record_that_arrives() -> None:
    # s2 registered dan while cut off from s1; s1 starts registering dan later (linked to
    # s3 only); s2's record reaches s1 through s3 before s3 answers s1's claim.
    mesh = Mesh("s1", "s2", "s3")
    mesh.link("s1", "s3")
    mesh.pump()
    early = mesh.register("s2", "dan", uid(2), T0)
    reg = mesh.begin("s1", "dan", T0 + 10)
    mesh.link("s2", "s3")
    # Everything between s2 and s3 crosses first: s3 learns the record before s1's claim.
    while any(c in (("s2", "s3"), ("s3", "s2")) for c in mesh.channels()):
        mesh.step(next(c for c in mesh.channels() if c in (("s2", "s3"), ("s3", "s2"))))
    mesh.pump()
    assert reg.lost
    assert mesh.finish("s1", reg, uid(1)) == errors.NAME_TAKEN
    mesh.pump()
    assert mesh.hubs["s1"].book.names() == {early.uid: "dan"}


def test_an_earlier_record_arriving_ends_a_registration_still_waiting() -> None:
    # s1 waits for s2 and s3; a record of dan made earlier elsewhere arrives (passed on by
    # s2) before s3 answers: the registrant hears name_taken at once, not after the wait.
    mesh = full_mesh("s1", "s2", "s3")
    reg = mesh.begin("s1", "dan", T0 + 10)
    early = AccountRecord(uid(4), "dan", "h", T0, "s4", 1)
    mesh.apply("s1", mesh.hubs["s1"].peer_message("s2", peerproto.Accounts([early]), T0))
    assert reg.lost and ClaimSettled(reg.rid) in mesh.effects["s1"]
    assert mesh.finish("s1", reg, uid(1)) == errors.NAME_TAKEN


def test_a_later_record_arriving_leaves_a_registration_waiting() -> None:
    mesh = full_mesh("s1", "s2", "s3")
    reg = mesh.begin("s1", "dan", T0)
    late = AccountRecord(uid(4), "dan", "h", T0 + 10, "s4", 1)
    mesh.apply("s1", mesh.hubs["s1"].peer_message("s2", peerproto.Accounts([late]), T0))
    assert not reg.lost and not reg.settled


def test_a_server_between_two_unlinked_registrants_refuses_the_later_claim() -> None:
    # A line s1 - s3 - s2: the registrants can't see each other; s3 holds the first
    # claim and refuses a later one.
    mesh = Mesh("s1", "s2", "s3")
    mesh.link("s1", "s3")
    mesh.link("s2", "s3")
    mesh.pump()
    first = mesh.begin("s2", "dan", T0)
    mesh.step(("s2", "s3"))
    later = mesh.begin("s1", "dan", T0 + 1)
    mesh.pump()
    assert later.lost and not first.lost
    assert mesh.finish("s1", later, uid(1)) == errors.NAME_TAKEN
    record = mesh.finish("s2", first, uid(2))
    mesh.pump()
    assert isinstance(record, AccountRecord)
    assert all(h.book.names() == {record.uid: "dan"} for h in mesh.hubs.values())


# --- any interleaving ---------------------------------------------------------------------

TOPOLOGIES = {
    "pair": (("s1", "s2"), [("s1", "s2")]),
    "triangle": (("s1", "s2", "s3"), [("s1", "s2"), ("s1", "s3"), ("s2", "s3")]),
    "line": (("s1", "s2", "s3"), [("s1", "s2"), ("s2", "s3")]),
}


def race(
    topology: str, plan: list[tuple[int, int]], schedule: list[int]
) -> tuple[Mesh, list[AccountRecord]]:
    """Registrations of dan start at the planned moments on the planned servers, with
    skewed clocks, while peer messages cross in any order (each link direction in order);
    each is finished as soon as it settles, as the shell does. The accounts made."""
    servers, links = TOPOLOGIES[topology]
    mesh = Mesh(*servers)
    for a, b in links:
        mesh.link(a, b)
    mesh.pump()
    started: list[tuple[str, Registration]] = []
    done: dict[str, AccountRecord | str] = {}
    announcing: list[tuple[str, Registration, AccountRecord]] = []
    moves = iter(schedule)

    def finish_settled() -> None:
        for i, (srv, reg) in enumerate(started):
            if reg.rid not in done and reg.settled:
                done[reg.rid] = outcome = mesh.finish(srv, reg, uid(len(started) * 100 + i))
                if isinstance(outcome, AccountRecord):
                    announcing.append((srv, reg, outcome))
        for item in [a for a in announcing if a[1].settled]:
            mesh.announced(*item)
            announcing.remove(item)

    for which, skew in plan:
        server = servers[which % len(servers)]
        try:
            started.append((server, mesh.begin(server, "dan", T0 + skew)))
        except ProtocolError as exc:
            assert exc.code == errors.NAME_TAKEN
        for _ in range(next(moves, 0) % 4):
            channels = mesh.channels()
            if channels:
                mesh.step(channels[next(moves, 0) % len(channels)])
                finish_settled()
        finish_settled()
    while mesh.wire or announcing or len(done) < len(started):
        if mesh.wire:
            mesh.step()
        else:  # every linked peer answered: nothing is left waiting
            assert all(r.settled for _, r in started) and all(a[1].settled for a in announcing)
        finish_settled()
    assert started, "the first registration always starts"
    assert all(r == errors.NAME_TAKEN for r in done.values() if isinstance(r, str))
    return mesh, [r for r in done.values() if isinstance(r, AccountRecord)]


plans = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3)), min_size=1, max_size=4)
schedules = st.lists(st.integers(0, 10**6), max_size=60)


@settings(max_examples=150, deadline=None)
@given(topology=st.sampled_from(["pair", "triangle"]), plan=plans, schedule=schedules)
def test_linked_servers_registering_one_name_make_exactly_one_account(
    topology: str, plan: list[tuple[int, int]], schedule: list[int]
) -> None:
    mesh, made = race(topology, plan, schedule)
    assert len(made) == 1
    assert books_equal(mesh)
    for hub in mesh.hubs.values():
        assert hub.book.names() == {made[0].uid: "dan"}
        with pytest.raises(ProtocolError) as info:
            hub.check_login("dan", None)
        assert info.value.code == errors.AUTH_FAILED  # an account's name, everywhere


@settings(max_examples=100, deadline=None)
@given(plan=plans, schedule=schedules)
def test_servers_that_can_not_see_each_other_still_agree_on_the_name(
    plan: list[tuple[int, int]], schedule: list[int]
) -> None:
    # In a line s1 - s2 - s3 the ends may both be told yes (the middle said yes to the
    # later claim first); then the earliest registration keeps the name everywhere.
    mesh, made = race("line", plan, schedule)
    assert made
    assert books_equal(mesh)
    winner = min(made, key=lambda r: r.rank)
    for hub in mesh.hubs.values():
        assert hub.book.holder("dan") == winner.uid
        assert sorted(hub.book.names().values()) == sorted(
            ["dan"] + [derived_name("dan", r.uid) for r in made if r is not winner]
        )
