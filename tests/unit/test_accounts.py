"""AccountBook: the one set of accounts every server keeps, and the rule that settles names.

The rule (protocol.md "Name conflicts"): among registrations of one name (ignoring case) the
earliest keeps it, ties broken by the server it was registered on, then by id; every other
goes by a name derived from its id. It must be a pure function of the set of records, so
servers that hold the same records agree on every name, whatever order they learned them in.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trichat.accounts import AccountBook, AccountRecord, Renamed, derived_name
from trichat.names import MAX_NAME_CHARS, is_valid_name

T0 = 1_700_000_000_000


def record(
    uid: str, name: str = "dan", created: int = T0, origin: str = "s1", oseq: int = 1
) -> AccountRecord:
    return AccountRecord(uid, name, f"hash-{uid}", created, origin, oseq)


A = "aaaaaaaaaaaa0001"
B = "bbbbbbbbbbbb0002"
C = "cccccccccccc0003"


# --- who keeps the name -----------------------------------------------------------------


def test_the_earlier_registration_keeps_the_name_whichever_arrives_first() -> None:
    early = record(A, "dan", T0, "s2", 1)
    late = record(B, "Dan", T0 + 1, "s1", 1)  # another case: the same name
    for order in ([early, late], [late, early]):
        book = AccountBook(order)
        assert book.name_of(A) == "dan"
        assert book.name_of(B) == derived_name("Dan", B) == "Dan.bbbbbbbbbbbb"
        assert book.holder("DAN") == A
        assert book.holder("dan.BBBBBBBBBBBB") == B  # a derived name is held too


@pytest.mark.parametrize(
    ("first", "second", "winner"),
    [
        (record(A, origin="s2"), record(B, origin="s1"), B),  # same ms: the server's name
        (record(B, origin="s1"), record(A, origin="s1", oseq=2), A),  # same server: the id
        (record(A, created=T0 + 5, origin="s0"), record(B, created=T0, origin="s9"), B),
    ],
    ids=["tie-by-origin", "tie-by-uid", "time-first"],
)
def test_ties_go_by_origin_then_uid(
    first: AccountRecord, second: AccountRecord, winner: str
) -> None:
    for order in ([first, second], [second, first]):
        book = AccountBook(order)
        assert book.holder("dan") == winner
        loser = first.uid if winner == second.uid else second.uid
        assert book.name_of(loser) == derived_name("dan", loser)


def test_adding_a_later_registration_renames_only_it() -> None:
    book = AccountBook([record(A)])
    late = record(B, created=T0 + 1, origin="s2")
    assert book.add(late) == [Renamed(B, "dan", "dan.bbbbbbbbbbbb")]
    assert book.name_of(A) == "dan"


def test_adding_an_earlier_registration_renames_the_holder() -> None:
    book = AccountBook([record(B, created=T0 + 1)])
    assert book.add(record(A, created=T0, origin="s2")) == [Renamed(B, "dan", "dan.bbbbbbbbbbbb")]
    assert book.holder("dan") == A
    # A third, latest of all, goes by its derived name at once; the others keep theirs.
    assert book.add(record(C, created=T0 + 2, origin="s3")) == [
        Renamed(C, "dan", "dan.cccccccccccc")
    ]


def test_a_record_of_another_name_renames_nobody() -> None:
    book = AccountBook([record(A)])
    assert book.add(record(B, "eve", origin="s2")) == []
    assert book.names() == {A: "dan", B: "eve"}


def test_adding_a_record_twice_returns_none_and_changes_nothing() -> None:
    book = AccountBook([record(A), record(B, created=T0 + 1, origin="s2")])
    names, have = book.names(), book.have()
    assert book.add(record(A)) is None
    assert book.add(record(B, created=T0 + 1, origin="s2")) is None
    assert (book.names(), book.have(), len(book)) == (names, have, 2)


# --- derived names ----------------------------------------------------------------------


@given(
    name=st.from_regex(r"[A-Za-z0-9_.\-]{1,32}", fullmatch=True),
    uid=st.from_regex(r"[0-9a-f]{16}", fullmatch=True),
)
def test_a_derived_name_is_a_valid_name_that_fits(name: str, uid: str) -> None:
    derived = derived_name(name, uid)
    assert is_valid_name(derived)
    assert len(derived) <= MAX_NAME_CHARS
    assert derived.endswith("." + uid[:12])
    assert derived.lower() != name.lower()  # never the name it lost


def test_derived_names_of_one_name_differ_by_id() -> None:
    long = "x" * 32
    uids = [f"{i:012x}0000" for i in range(5)]
    derived = {derived_name(long, u) for u in uids}
    assert len(derived) == 5
    assert all(len(d) == MAX_NAME_CHARS for d in derived)


def test_a_long_name_is_cut_to_make_room_for_the_id() -> None:
    assert derived_name("abcdefghijklmnopqrstuvwxyz", B) == "abcdefghijklmnopqrs.bbbbbbbbbbbb"


def test_a_registered_name_equal_to_a_derived_one_never_gives_two_accounts_one_name() -> None:
    a, b = record(A, created=T0), record(B, created=T0 + 1, origin="s2")
    squatter = record(C, "dan.bbbbbbbbbbbb", created=T0 + 2, origin="s3")
    holders = set()
    for order in ([a, b, squatter], [squatter, a, b]):
        book = AccountBook(order)
        assert len(set(book.names().values())) == 3
        holders.add(book.holder("dan.bbbbbbbbbbbb"))
    assert len(holders) == 1


# --- logging in -------------------------------------------------------------------------


def test_login_candidates_are_the_holder_then_those_that_lost_the_name() -> None:
    a = record(A, created=T0)
    b = record(B, created=T0 + 1, origin="s2")
    c = record(C, created=T0 + 2, origin="s3")
    book = AccountBook([c, a, b])
    assert book.login_candidates("DAN") == [a, b, c]
    # By its derived name, only the account that goes by it.
    assert book.login_candidates("dan.bbbbbbbbbbbb") == [b]
    assert book.login_candidates("nobody") == []


def test_a_name_only_lost_still_finds_its_account() -> None:
    # Derived names are case-blind too, and a login with the registered name finds the
    # loser even when it is not the one going by it.
    book = AccountBook([record(A, "Dan", T0), record(B, "DAN", T0 + 1, "s2")])
    assert [r.uid for r in book.login_candidates("dan")] == [A, B]
    assert book.name_of(B) == "DAN.bbbbbbbbbbbb"
    assert [r.uid for r in book.login_candidates("dan.bbbbbbbbbbbb")] == [B]


# --- the version vector -----------------------------------------------------------------


def have(book: AccountBook) -> dict[str, int]:
    """The version vector, without origins it has nothing contiguous of (0 = none)."""
    return {origin: top for origin, top in book.have().items() if top}


def test_have_counts_only_contiguous_oseqs() -> None:
    book = AccountBook()
    assert have(book) == {}
    book.add(record("u1", "a1", origin="s1", oseq=1))
    book.add(record("u3", "a3", origin="s1", oseq=3))  # 2 is missing
    book.add(record("v2", "b2", origin="s2", oseq=2))  # 1 is missing
    assert have(book) == {"s1": 1}
    assert book.have().get("s2", 0) == 0
    assert book.next_oseq("s1") == 4  # past what is here, gap or not
    assert book.next_oseq("s2") == 3
    assert book.next_oseq("s3") == 1
    book.add(record("u2", "a2", origin="s1", oseq=2))  # the gap fills
    assert have(book) == {"s1": 3}
    book.add(record("v1", "b1", origin="s2", oseq=1))
    assert have(book) == {"s1": 3, "s2": 2}


def test_missing_for_is_what_the_other_vector_lacks_oldest_first() -> None:
    records = [record(f"u{i}", f"a{i}", origin="s1", oseq=i) for i in range(1, 5)]
    records += [record(f"v{i}", f"b{i}", origin="s2", oseq=i) for i in range(1, 3)]
    book = AccountBook(reversed(records))
    assert book.missing_for({"s1": 4, "s2": 2}) == []
    assert [r.uid for r in book.missing_for({"s1": 2})] == ["u3", "u4", "v1", "v2"]
    assert [r.uid for r in book.missing_for({})] == [r.uid for r in records]
    # A vector with a gap says nothing of what lies past it: those are sent again.
    other = AccountBook([records[0], records[2]])
    assert have(other) == {"s1": 1}
    assert [r.uid for r in book.missing_for(other.have())] == ["u2", "u3", "u4", "v1", "v2"]


def test_two_books_exchanging_what_each_lacks_become_equal() -> None:
    mine = AccountBook([record("u1", "a", origin="s1", oseq=1), record("v1", "b", origin="s2")])
    theirs = AccountBook([record("v1", "b", origin="s2"), record("v2", "c", origin="s2", oseq=2)])
    for_theirs = mine.missing_for(theirs.have())
    for_mine = theirs.missing_for(mine.have())
    assert [r.uid for r in for_theirs] == ["u1"]
    assert [r.uid for r in for_mine] == ["v2"]
    for r in for_theirs:
        theirs.add(r)
    for r in for_mine:
        mine.add(r)
    assert mine.names() == theirs.names() and mine.have() == theirs.have()


# --- convergence ------------------------------------------------------------------------

# Few names, ids, times and servers: clashes are the common case.
reg_names = st.sampled_from(["dan", "Dan", "DAN", "eve", "x" * 32, "x" * 31 + "y"])


@st.composite
def record_sets(draw: st.DrawFn) -> list[AccountRecord]:
    count = draw(st.integers(1, 8))
    uids = draw(
        st.lists(
            st.from_regex(r"[0-9a-f]{16}", fullmatch=True),
            min_size=count,
            max_size=count,
            unique_by=lambda u: u[:12],  # ids are random: their first 12 differ
        )
    )
    oseqs: dict[str, int] = {}
    out = []
    for uid in uids:
        origin = draw(st.sampled_from(["s1", "s2", "s3"]))
        oseqs[origin] = oseqs.get(origin, 0) + 1
        created = T0 + draw(st.integers(0, 2))
        out.append(AccountRecord(uid, draw(reg_names), "h", created, origin, oseqs[origin]))
    return out


@settings(max_examples=300)
@given(records=record_sets(), data=st.data())
def test_the_same_records_in_any_order_give_the_same_names(
    records: list[AccountRecord], data: st.DataObject
) -> None:
    reference = AccountBook(records)
    shuffled = data.draw(st.permutations(records))
    book = AccountBook()
    registered = {r.uid: r.name for r in records}
    renamed: dict[str, str] = {}
    for r in shuffled:
        changes = book.add(r)
        assert changes is not None
        for change in changes:
            assert change.old == renamed.get(change.uid, registered[change.uid])
            assert change.new != change.old
            renamed[change.uid] = change.new
    assert book.names() == reference.names()
    assert book.have() == reference.have()
    names = reference.names()
    # Every name gone by is valid, fits, and is gone by one account only.
    assert all(is_valid_name(n) and len(n) <= MAX_NAME_CHARS for n in names.values())
    assert len({n.lower() for n in names.values()}) == len(names)
    for uid, name in names.items():
        assert book.holder(name) == reference.holder(name) == uid
        assert book.login_candidates(name) == reference.login_candidates(name)
    # The Renamed events tell exactly the name each account goes by at the end.
    for r in records:
        assert renamed.get(r.uid, r.name) == names[r.uid]
    # And the earliest of each registered name keeps it.
    by_key: dict[str, list[AccountRecord]] = {}
    for r in records:
        by_key.setdefault(r.name.lower(), []).append(r)
    for group in by_key.values():
        first = min(group, key=lambda r: r.rank)
        assert names[first.uid] == first.name
        for r in group:
            if r is not first:
                assert names[r.uid] == derived_name(r.name, r.uid)


@settings(max_examples=100)
@given(records=record_sets(), data=st.data())
def test_adding_a_record_again_in_any_order_changes_nothing(
    records: list[AccountRecord], data: st.DataObject
) -> None:
    book = AccountBook(records)
    names = book.names()
    for r in data.draw(st.permutations(records)):
        assert book.add(r) is None
    assert book.names() == names and len(book) == len(records)
