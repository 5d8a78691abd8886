"""The effects the routing core asks the shell to carry out, and the state it keeps.

Owns: the vocabulary between hub.py/mesh.py (which decide) and service.py (which acts): one
plain attrs class per effect, carried out in order. Must never: do anything itself.
"""

from __future__ import annotations

import attrs

from trichat import messages, peerproto
from trichat.accounts import AccountRecord
from trichat.codec import RequestId
from trichat.messages import Event

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
    sender_uid: str = ""  # identities (protocol.md "Identities"): who sent it, whom it is for
    to_uid: str = ""

    def as_event(self) -> messages.Message:
        return messages.Message(self.msg, self.sender, self.to, self.text, self.ts)


RECEIPT_BITS: dict[str, int] = {"delivered": 1, "read": 2}


@attrs.define
class OwedReceipt:
    """A receipt kept for a sender who was away: ``bits`` say which (1 delivered, 2 read)."""

    msg: str
    status: str
    by: str
    ts: int
    bits: int

    def event(self) -> messages.Receipt:
        return messages.Receipt(self.msg, self.status, self.by, self.ts)


@attrs.define
class Backlog:
    """What storage owes one identity: messages for it (oldest first), receipts for it."""

    messages: list[StoredMessage] = attrs.Factory(list)
    receipts: list[OwedReceipt] = attrs.Factory(list)


@attrs.define
class StoreMessage:
    """Write ``message`` durably, then call :meth:`Hub.message_stored`."""

    message: StoredMessage
    seq: int
    conn: int
    req_id: RequestId


@attrs.define
class StoreReceipt:
    """Record that ``by`` (identity ``uid``) received or read ``msg``, then call
    :meth:`Hub.receipt_stored`."""

    msg: str
    by: str
    status: str
    ts: int
    uid: str


@attrs.define
class FetchBacklog:
    """Load what is owed to ``uid`` (messages for it, receipts for what it sent), then
    call :meth:`Hub.backlog_loaded`."""

    conn: int
    uid: str


@attrs.define
class PushBacklog:
    """Load what is owed to ``uid``, online on the linked peer ``server``, then call
    :meth:`Hub.backlog_for_peer` with ``token``."""

    server: str
    uid: str
    token: int


@attrs.define
class SaveLastSeen:
    uid: str
    ts: int


@attrs.define
class DropBacklog:
    """A guest session is gone: what it left unacknowledged is never offered to anyone."""

    uid: str
    ts: int


@attrs.define
class OweReceipts:
    """Receipts for messages stored here whose sender was reachable nowhere: kept until it
    logs in (``bits``: 1 delivered, 2 read)."""

    receipts: list[tuple[str, int]]


@attrs.define
class ReceiptsTold:
    """Owed receipts were given to the sender: forget them (written lazily)."""

    receipts: list[tuple[str, int]]


@attrs.define
class OweToPeer:
    """A receipt for a message stored on ``server``, which is not linked now: kept on disk
    and sent when it is (protocol.md "Receipts across the mesh")."""

    server: str
    receipt: peerproto.PeerReceipt


@attrs.define
class SendOwedToPeer:
    """``server`` is linked: load what is kept for it, then :meth:`Hub.owed_loaded`."""

    server: str


@attrs.define
class StoreAccounts:
    """Account records learned from peers: written lazily (a crash loses nothing that the
    next link-up does not bring back)."""

    records: list[AccountRecord]


@attrs.define
class ClaimSettled:
    """The registration ``rid`` may go on (or has lost): wake the shell waiting on it."""

    rid: str


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
    | PushBacklog
    | SaveLastSeen
    | DropBacklog
    | OweReceipts
    | ReceiptsTold
    | OweToPeer
    | SendOwedToPeer
    | StoreAccounts
    | ClaimSettled
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
    uid: str = ""  # the account's id, or this guest session's
    backlog_pending: bool = False
    # Peers whose backlog push for this identity has not ended since this connection
    # logged in (or the link came up): their live relays are in the push, in order.
    awaiting: set[str] = attrs.Factory(set)
    # Broadcasts from an awaited peer, held so that they keep their place among the
    # sender's private messages in the push (message ids order both).
    held: list[messages.Message] = attrs.Factory(list)


@attrs.define
class OnlineUser:
    name: str
    account: bool
    uid: str = ""  # the identity of this server's connections of this name
    logins: int = 0  # how many of them logged in so far (a new device is owed the backlog)
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
