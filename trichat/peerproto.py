"""The peer link protocol between trichat servers (protocol.md "Peer links").

Owns: the peer message shapes and their strict decoding, the challenge-response handshake
(the cluster secret never crosses the wire: each side proves it knows it with an HMAC over
both sides' nonces and names), and link liveness (heartbeats, timeout). Must never: touch
a socket or a clock (``now`` is passed in, seconds, monotonic), or decide routing (hub.py).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import typing
from typing import Any, ClassVar, Final

import attrs
import cattrs
import orjson
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from trichat.accounts import AccountRecord
from trichat.codec import strict_converter
from trichat.framing import NEED_DATA, TOO_LONG, LineFramer
from trichat.names import is_valid_name

PEER_PROTOCOL_VERSION: Final = 2
MAX_PEER_LINE_BYTES: Final = 4 * 1024 * 1024  # a snapshot page of 1000 sessions fits easily
HANDSHAKE_LINE_BYTES: Final = 4096  # before a peer has proved it knows the secret
HEARTBEAT_S: Final = 1.0  # a ping when nothing else was sent for this long
PEER_TIMEOUT_S: Final = 4.0  # nothing heard for this long: the link is dead
HANDSHAKE_TIMEOUT_S: Final = 5.0
MAX_BAD_LINES: Final = 100  # undecodable lines from an authenticated peer before we hang up
ACCOUNTS_PER_MESSAGE: Final = 1000  # account records in one ``accounts`` message


class PeerError(Exception):
    """A peer broke the protocol; the link is closed with this reason (and it is logged)."""


# --- messages -----------------------------------------------------------------------


@attrs.define
class Hello:
    TYPE: ClassVar[str] = "hello"
    version: int
    server: str
    addr: str
    nonce: str
    proof: str | None = None  # the acceptor's answer carries its proof


@attrs.define
class Auth:
    TYPE: ClassVar[str] = "auth"
    proof: str


@attrs.define
class Accept:
    TYPE: ClassVar[str] = "accept"


@attrs.define
class Refuse:
    TYPE: ClassVar[str] = "refuse"
    reason: str


@attrs.define
class Member:
    server: str
    addr: str


@attrs.define
class Members:
    TYPE: ClassVar[str] = "members"
    members: list[Member]


@attrs.define
class SessionInfo:
    user: str
    account: bool
    since: int  # ms: when this user's first connection on that server logged in
    uid: str = ""  # the account's id, or the guest session's (protocol.md "Identities")
    logins: int = 1  # connections that logged in to it there so far: a new one is told again


@attrs.define
class Snapshot:
    """Every user online on the sending server; replaces what was known of it."""

    TYPE: ClassVar[str] = "snapshot"
    boot: str
    seq: int
    sessions: list[SessionInfo]


@attrs.define
class SessionChange:
    """One user came online on, or left, the sending server."""

    TYPE: ClassVar[str] = "session"
    boot: str
    seq: int
    user: str
    online: bool
    account: bool
    since: int
    uid: str = ""
    logins: int = 1


@attrs.define
class Relay:
    """A private message for ``uid`` (an account, or one guest session), connected to the
    receiving server. Not acknowledged: the server that stored it keeps offering it until
    the recipient's ``received`` comes back (protocol.md "Store and forward")."""

    TYPE: ClassVar[str] = "relay"
    msg: str
    sender: str
    to: str
    text: str
    ts: int
    uid: str
    push: bool = False  # part of a backlog push (ends with ``pushed``), not a live relay


@attrs.define
class Pushed:
    """The end of a backlog push for ``uid``: its connections that logged in before the
    push take live relays from the sender again (protocol.md "Store and forward")."""

    TYPE: ClassVar[str] = "pushed"
    uid: str


@attrs.define
class AccountsHave:
    """Sent on link-up: for each origin, up to which oseq the sender has every record."""

    TYPE: ClassVar[str] = "accounts_have"
    have: dict[str, int]


@attrs.define
class Accounts:
    """Account records the receiver lacks (on link-up), or new ones (as they are made)."""

    TYPE: ClassVar[str] = "accounts"
    records: list[AccountRecord]
    rid: str | None = None  # a new registration's: answer claim_reply once it is stored


@attrs.define
class Claim:
    """The sender is registering ``name`` (protocol.md "Registering across the mesh")."""

    TYPE: ClassVar[str] = "claim"
    rid: str
    name: str
    created: int


@attrs.define
class ClaimReply:
    TYPE: ClassVar[str] = "claim_reply"
    rid: str
    ok: bool


@attrs.define
class ClaimEnd:
    """The registration ``rid`` failed: forget the claim."""

    TYPE: ClassVar[str] = "claim_end"
    rid: str


@attrs.define
class PeerBroadcast:
    TYPE: ClassVar[str] = "broadcast"
    msg: str
    sender: str
    text: str
    ts: int


@attrs.define
class PeerReceipt:
    """``by`` received or read ``msg``: to the server that stored it (the id's prefix)."""

    TYPE: ClassVar[str] = "receipt"
    msg: str
    status: str
    by: str
    ts: int
    uid: str  # the recipient's identity: who answered must be who it was for


@attrs.define
class ReceiptNotice:
    """The origin recorded a receipt: for the sender's connections on the receiving server."""

    TYPE: ClassVar[str] = "receipt_notice"
    msg: str
    sender: str
    status: str
    by: str
    ts: int
    uid: str  # the sender's identity: only its connections are told


@attrs.define
class PeerTyping:
    TYPE: ClassVar[str] = "typing"
    sender: str
    to: str


@attrs.define
class Ping:
    TYPE: ClassVar[str] = "ping"


PeerMessage = (
    Hello
    | Auth
    | Accept
    | Refuse
    | Members
    | Snapshot
    | SessionChange
    | Relay
    | Pushed
    | AccountsHave
    | Accounts
    | Claim
    | ClaimReply
    | ClaimEnd
    | PeerBroadcast
    | PeerReceipt
    | ReceiptNotice
    | PeerTyping
    | Ping
)

PEER_TYPES: Final[dict[str, type[Any]]] = {cls.TYPE: cls for cls in typing.get_args(PeerMessage)}


def _converter() -> cattrs.Converter:
    conv = strict_converter()
    for cls in (Relay, PeerBroadcast, ReceiptNotice, PeerTyping):
        conv.register_structure_hook(
            cls, make_dict_structure_fn(cls, conv, sender=override(rename="from"))
        )
        conv.register_unstructure_hook(
            cls, make_dict_unstructure_fn(cls, conv, sender=override(rename="from"))
        )
    return conv


_conv = _converter()


def encode_peer(message: PeerMessage) -> bytes:
    body = {"type": message.TYPE}
    body.update(_conv.unstructure(message))
    return orjson.dumps(body, option=orjson.OPT_APPEND_NEWLINE)


def decode_peer(line: bytes) -> PeerMessage:
    """Parse and validate one peer line, as strictly as client input.

    Raises:
        PeerError: not JSON, an unknown type, a missing or mistyped field, a bad name.
    """
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise PeerError("a line that is not JSON") from None
    if type(data) is not dict:
        raise PeerError("a line that is not a JSON object")
    kind = data.get("type")
    cls = PEER_TYPES.get(kind) if type(kind) is str else None
    if cls is None:
        raise PeerError(f"unknown peer message type {str(kind)[:40]!r}")
    try:
        message: PeerMessage = _conv.structure(data, cls)
    except Exception as exc:
        raise PeerError(f"a malformed {cls.TYPE} message: {exc}") from None
    _check_names(message)
    return message


def _check_names(message: PeerMessage) -> None:
    names: list[str] = []
    match message:
        case Hello(server=server):
            names = [server]
        case Members(members=members):
            names = [m.server for m in members]
        case Snapshot(sessions=sessions):
            names = [s.user for s in sessions]
        case SessionChange(user=user):
            names = [user]
        case Relay(sender=sender, to=to) | PeerTyping(sender=sender, to=to):
            names = [sender, to]
        case Accounts(records=records):
            names = [n for r in records for n in (r.name, r.origin)]
        case Claim(name=name):
            names = [name]
        case AccountsHave(have=have):
            names = list(have)
        case PeerReceipt(by=by):
            names = [by]
        case ReceiptNotice(sender=sender, by=by):
            names = [sender, by]
        case PeerBroadcast(sender=sender):
            names = [sender]
    for name in names:
        if not is_valid_name(name):
            raise PeerError(f"a bad name {name[:40]!r} in a {message.TYPE} message")


# --- the handshake ------------------------------------------------------------------


def proof(secret: str, role: str, dialer_nonce: str, acceptor_nonce: str, me: str, you: str) -> str:
    """HMAC-SHA256 of both nonces and both names under the secret; ``role`` keeps the two
    sides' proofs different, so neither can be replayed as the other's."""
    text = "|".join(("trichat-peer-v1", role, dialer_nonce, acceptor_nonce, me, you))
    return hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()


class Phase(enum.Enum):
    HELLO_SENT = "hello_sent"  # dialer, waiting for the acceptor's hello
    WAIT_HELLO = "wait_hello"  # acceptor, waiting for the dialer's hello
    AUTH_SENT = "auth_sent"  # dialer, waiting for accept
    WAIT_AUTH = "wait_auth"  # acceptor, waiting for auth
    UP = "up"
    CLOSED = "closed"


@attrs.define
class LinkUp:
    server: str
    addr: str


@attrs.define
class Received:
    message: PeerMessage


@attrs.define
class LinkDown:
    reason: str


LinkEvent = LinkUp | Received | LinkDown


class PeerLink:
    """One peer connection's protocol state, from handshake to heartbeats.

    Args:
        me: this server's name.
        my_addr: where this server's peer port can be reached (told to peers).
        secret: the cluster secret ("" when none is set).
        dialer: True on the side that connected.
        now: monotonic seconds.
        nonce: for tests; random otherwise.
    """

    def __init__(
        self,
        me: str,
        my_addr: str,
        secret: str,
        *,
        dialer: bool,
        now: float,
        nonce: str | None = None,
    ) -> None:
        self.me = me
        self.my_addr = my_addr
        self.dialer = dialer
        self.peer: str | None = None
        self.peer_addr: str | None = None
        self.phase = Phase.HELLO_SENT if dialer else Phase.WAIT_HELLO
        self._secret = secret
        self._nonce = nonce or secrets.token_hex(16)
        self._their_nonce = ""
        self._framer = LineFramer(HANDSHAKE_LINE_BYTES)
        self._started = now
        self._last_heard = now
        self._last_sent = now
        self._bad_lines = 0
        self._out: list[bytes] = []

    # --- output -------------------------------------------------------------------

    def start(self) -> None:
        """The dialer speaks first."""
        if self.dialer:
            self._emit(Hello(PEER_PROTOCOL_VERSION, self.me, self.my_addr, self._nonce))

    def send(self, message: PeerMessage, now: float) -> None:
        """Queue a message (once the link is up)."""
        self._last_sent = now
        self._out.append(encode_peer(message))

    def send_encoded(self, line: bytes, now: float) -> None:
        self._last_sent = now
        self._out.append(line)

    def data_to_send(self) -> bytes:
        """Everything queued, as one write."""
        out, self._out = self._out, []
        return b"".join(out)

    def _emit(self, message: PeerMessage) -> None:
        self._out.append(encode_peer(message))

    # --- input --------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> list[LinkEvent]:
        """Bytes from the peer; what they mean, in order (LinkDown ends the link)."""
        self._last_heard = now
        self._framer.feed(data)
        events: list[LinkEvent] = []
        while self.phase is not Phase.CLOSED:
            line = self._framer.next_line()
            if line is NEED_DATA:
                break
            try:
                if line is TOO_LONG:
                    raise PeerError("a line over the peer line limit")
                assert isinstance(line, bytes)
                events += self._handle(decode_peer(line), now)
            except PeerError as exc:
                if self.phase is not Phase.UP or self._bad_line():
                    events.append(self._fail(str(exc)))
        return events

    def _bad_line(self) -> bool:
        self._bad_lines += 1
        return self._bad_lines > MAX_BAD_LINES

    def _fail(self, reason: str) -> LinkDown:
        if self.phase is not Phase.UP:
            self._emit(Refuse(reason))
        self.phase = Phase.CLOSED
        return LinkDown(reason)

    def _handle(self, message: PeerMessage, now: float) -> list[LinkEvent]:
        if self.phase is Phase.UP:
            if isinstance(message, Ping):
                return []
            if isinstance(message, Hello | Auth | Accept):
                raise PeerError(f"a {message.TYPE} message on a link that is up")
            if isinstance(message, Refuse):
                return [self._fail(f"refused: {message.reason[:200]}")]
            return [Received(message)]
        if isinstance(message, Refuse):
            return [self._fail(f"refused: {message.reason[:200]}")]
        handler = {
            Phase.WAIT_HELLO: self._on_dialer_hello,
            Phase.HELLO_SENT: self._on_acceptor_hello,
            Phase.WAIT_AUTH: self._on_auth,
            Phase.AUTH_SENT: self._on_accept,
        }[self.phase]
        return handler(message)

    def _check_hello(self, message: PeerMessage) -> Hello:
        if not isinstance(message, Hello):
            raise PeerError(f"expected hello, got {message.TYPE}")
        if message.version != PEER_PROTOCOL_VERSION:
            raise PeerError(f"peer protocol version {message.version} is not supported")
        if message.server == self.me:
            raise PeerError(f"that is this server ({self.me}) itself")
        return message

    def _on_dialer_hello(self, message: PeerMessage) -> list[LinkEvent]:
        hello = self._check_hello(message)
        self.peer, self.peer_addr, self._their_nonce = hello.server, hello.addr, hello.nonce
        mine = proof(self._secret, "acceptor", hello.nonce, self._nonce, self.me, hello.server)
        self._emit(Hello(PEER_PROTOCOL_VERSION, self.me, self.my_addr, self._nonce, mine))
        self.phase = Phase.WAIT_AUTH
        return []

    def _on_acceptor_hello(self, message: PeerMessage) -> list[LinkEvent]:
        hello = self._check_hello(message)
        expected = proof(self._secret, "acceptor", self._nonce, hello.nonce, hello.server, self.me)
        if hello.proof is None or not hmac.compare_digest(hello.proof, expected):
            raise PeerError("the peer does not know the cluster secret")
        self.peer, self.peer_addr, self._their_nonce = hello.server, hello.addr, hello.nonce
        mine = proof(self._secret, "dialer", self._nonce, hello.nonce, self.me, hello.server)
        self._emit(Auth(mine))
        self.phase = Phase.AUTH_SENT
        return []

    def _on_auth(self, message: PeerMessage) -> list[LinkEvent]:
        if not isinstance(message, Auth):
            raise PeerError(f"expected auth, got {message.TYPE}")
        assert self.peer is not None and self.peer_addr is not None
        expected = proof(self._secret, "dialer", self._their_nonce, self._nonce, self.peer, self.me)
        if not hmac.compare_digest(message.proof, expected):
            raise PeerError("the peer does not know the cluster secret")
        self._emit(Accept())
        return self._up()

    def _on_accept(self, message: PeerMessage) -> list[LinkEvent]:
        if not isinstance(message, Accept):
            raise PeerError(f"expected accept, got {message.TYPE}")
        return self._up()

    def _up(self) -> list[LinkEvent]:
        assert self.peer is not None and self.peer_addr is not None
        self.phase = Phase.UP
        self._framer.set_limit(MAX_PEER_LINE_BYTES)
        return [LinkUp(self.peer, self.peer_addr)]

    # --- time ---------------------------------------------------------------------

    def tick(self, now: float) -> LinkDown | None:
        """Call about every HEARTBEAT_S: queues a ping when idle; LinkDown when the peer
        has been silent too long (or the handshake took too long)."""
        if self.phase is Phase.CLOSED:
            return None
        if self.phase is not Phase.UP:
            if now - self._started > HANDSHAKE_TIMEOUT_S:
                return self._fail("the handshake timed out")
            return None
        if now - self._last_heard > PEER_TIMEOUT_S:
            self.phase = Phase.CLOSED
            return LinkDown(f"nothing heard for {PEER_TIMEOUT_S:g} s")
        if now - self._last_sent >= HEARTBEAT_S:
            self.send(Ping(), now)
        return None

    def close(self) -> None:
        self.phase = Phase.CLOSED
