"""The mesh's accounts: one set, replicated to every server, and the rule that settles names.

Owns: every account record known here (protocol.md "Accounts across the mesh"), which account
holds which name, the names of accounts that lost their name to an earlier registration
(derived from their id), and what this server has of each origin's records (a version
vector, so two servers exchange only what one of them lacks). Must never: do I/O, read a
clock or hash a password: the hub and the shell call it with records and get answers.

A record never changes once made; the name an account goes by is a pure function of the
set of records, so every server that holds the same records agrees on every name.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from trichat.names import MAX_NAME_CHARS, name_key

UID_CHARS = 16  # hex characters of an account id
DERIVED_UID_CHARS = 12  # of those, how many a derived name carries


@attrs.frozen
class AccountRecord:
    """One registration, as stored on every server.

    ``uid`` never changes and identifies the account everywhere (messages, receipts,
    sessions); ``name`` is the name it was registered with, which it keeps unless an
    earlier registration of the same name exists (:func:`derived_name`).
    """

    uid: str
    name: str
    pw_hash: str
    created: int  # ms since the epoch, on the origin's clock
    origin: str  # the server it was registered on
    oseq: int  # the origin's count of registrations: 1, 2, ...

    @property
    def rank(self) -> tuple[int, str, str]:
        """Earlier registrations rank first; ties by server name, then id."""
        return (self.created, self.origin, self.uid)


@attrs.frozen
class Renamed:
    """An account's name changed (or a record arrived that goes by a derived name)."""

    uid: str
    old: str
    new: str


def derived_name(name: str, uid: str, chars: int = DERIVED_UID_CHARS) -> str:
    """The name an account goes by when an earlier registration holds its own: the
    registered name, cut to fit, a dot, and the start of its id. Valid (letters, digits,
    ``-_.``; at most 32 characters) and unique as long as ids are."""
    tail = uid[:chars]
    return f"{name[: MAX_NAME_CHARS - len(tail) - 1]}.{tail}"


class AccountBook:
    """Every account record this server knows, and the names they go by.

    Args:
        records: the records as loaded from storage (any order).
    """

    def __init__(self, records: Iterable[AccountRecord] = ()) -> None:
        self._records: dict[str, AccountRecord] = {}
        self._groups: dict[str, list[AccountRecord]] = {}  # registered name key -> by rank
        self._names: dict[str, str] = {}  # uid -> the name it goes by
        self._holders: dict[str, str] = {}  # key of a name gone by -> uid
        self._have: dict[str, int] = {}  # origin -> every oseq up to this one is here
        self._above: dict[str, set[int]] = {}  # origin -> oseqs here past a gap
        self._tangled = False  # two groups wanted one name once: the global rule decides
        for record in records:
            self.add(record)

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, uid: object) -> bool:
        return uid in self._records

    # --- lookups ------------------------------------------------------------------

    def get(self, uid: str) -> AccountRecord | None:
        return self._records.get(uid)

    def name_of(self, uid: str) -> str | None:
        """The name account ``uid`` goes by now."""
        return self._names.get(uid)

    def holder(self, name: str) -> str | None:
        """The id of the account that goes by ``name`` (ignoring case), if any."""
        return self._holders.get(name_key(name))

    def login_candidates(self, name: str) -> list[AccountRecord]:
        """Accounts a login with ``name`` may be for: the one going by it, then any that
        were registered with it and lost it (protocol.md "Name conflicts": the password
        tells which one logs in, under the name it goes by now)."""
        key = name_key(name)
        out: list[AccountRecord] = []
        holder = self._holders.get(key)
        if holder is not None:
            out.append(self._records[holder])
        out += [r for r in self._groups.get(key, ()) if r.uid != holder]
        return out

    def names(self) -> dict[str, str]:
        """uid -> the name it goes by, for every account."""
        return dict(self._names)

    # --- replication --------------------------------------------------------------

    def have(self) -> dict[str, int]:
        """For each origin, the highest oseq up to which every record is here."""
        return dict(self._have)

    def missing_for(self, have: dict[str, int]) -> list[AccountRecord]:
        """What a server that has ``have`` lacks, in origin order (oldest first)."""
        out = [r for r in self._records.values() if r.oseq > have.get(r.origin, 0)]
        out.sort(key=lambda r: (r.origin, r.oseq))
        return out

    def next_oseq(self, origin: str) -> int:
        top = max(self._above.get(origin, ()), default=self._have.get(origin, 0))
        return top + 1

    # --- changes ------------------------------------------------------------------

    def add(self, record: AccountRecord) -> list[Renamed] | None:
        """Add a record; None if it was here already, else every account whose name
        changed (the new record included, if it goes by a derived name)."""
        if record.uid in self._records:
            return None
        self._records[record.uid] = record
        self._note_version(record.origin, record.oseq)
        key = name_key(record.name)
        group = self._groups.setdefault(key, [])
        group.append(record)
        group.sort(key=lambda r: r.rank)
        before = {r.uid: self._names.get(r.uid, record.name) for r in group}
        wanted = {
            member.uid: member.name if index == 0 else derived_name(member.name, member.uid)
            for index, member in enumerate(group)
        }
        members = set(wanted)
        if self._tangled or any(
            self._holders.get(name_key(name), uid) not in members for uid, name in wanted.items()
        ):
            # A name that two groups want (a registered name equal to another account's
            # derived one): settle every name by the global rule from now on.
            self._tangled = True
            return self._settle_all({record.uid: record.name})
        for uid in wanted:
            old = self._names.get(uid)
            if old is not None and self._holders.get(name_key(old)) == uid:
                del self._holders[name_key(old)]
        for uid, name in wanted.items():
            self._names[uid] = name
            self._holders[name_key(name)] = uid
        return [
            Renamed(uid, before[uid], name) for uid, name in wanted.items() if before[uid] != name
        ]

    def _settle_all(self, new: dict[str, str]) -> list[Renamed]:
        """The rule in full: from the earliest registration on, each account takes its
        registered name unless an earlier one goes by it, else its derived name, else the
        derived name with its whole id. Where no names collide this is the group rule."""
        before = {**self._names, **new}
        self._names, self._holders = {}, {}
        for record in sorted(self._records.values(), key=lambda r: r.rank):
            for name in (
                record.name,
                derived_name(record.name, record.uid),
                derived_name(record.name, record.uid, len(record.uid)),
            ):
                if name_key(name) not in self._holders:
                    break
            self._names[record.uid] = name
            self._holders[name_key(name)] = record.uid
        return [
            Renamed(uid, before[uid], name)
            for uid, name in self._names.items()
            if before.get(uid, name) != name
        ]

    def _note_version(self, origin: str, oseq: int) -> None:
        have = self._have.get(origin, 0)
        if oseq <= have:
            return
        above = self._above.setdefault(origin, set())
        above.add(oseq)
        while have + 1 in above:
            have += 1
            above.discard(have)
        self._have[origin] = have
        if not above:
            del self._above[origin]
