"""The effects the routing core asks the shell to carry out, and the state it keeps.

Owns: the vocabulary between hub.py/mesh.py (which decide) and service.py (which acts): one
plain attrs class per effect, carried out in order. Must never: do anything itself.
"""

from __future__ import annotations

import attrs

from trichat import messages, peerproto
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

    def as_event(self) -> messages.Message:
        return messages.Message(self.msg, self.sender, self.to, self.text, self.ts)


@attrs.define
class StoreMessage:
    """Write ``message`` durably, then call :meth:`Hub.message_stored` (with ``relay_to``)."""

    message: StoredMessage
    seq: int
    conn: int
    req_id: RequestId
    # Other servers the recipient was on when it was sent (server -> session since): it is
    # relayed there even if a link drops while it is being stored.
    relay_to: dict[str, int] = attrs.Factory(dict)


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
