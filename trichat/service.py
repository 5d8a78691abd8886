"""The chat service of one server: carrying out what the hub decides.

Owns: the registry of client connections, carrying out the hub's effects, and the
asynchronous parts of login and register (password hashing, account lookups). Must never:
make routing decisions itself (hub.py does) or own listeners (server.py does).
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

import trio

from trichat import errors, passwords
from trichat.codec import RequestId, encode
from trichat.config import Settings
from trichat.connection import Connection
from trichat.errors import ProtocolError
from trichat.hub import (
    AfterStored,
    Backlog,
    ClaimSettled,
    Close,
    Deliver,
    DropBacklog,
    Effect,
    FetchBacklog,
    Hub,
    OweReceipts,
    OweToPeer,
    PushBacklog,
    ReceiptsTold,
    Reply,
    SaveLastSeen,
    SendOwedToPeer,
    StoreAccounts,
    StoreMessage,
    StoreReceipt,
    ToPeers,
    check_name,
)
from trichat.messages import (
    Bye,
    Error,
    HelpRequest,
    HelpText,
    LoginRequest,
    LogoutRequest,
    PingRequest,
    Pong,
    RegisterRequest,
)
from trichat.outbox import Outbox
from trichat.peerproto import PeerReceipt
from trichat.registration import Registration
from trichat.session import Incoming, Kick, Refused, Session
from trichat.store import (
    AddAccounts,
    Barrier,
    CreateAccount,
    DiscardBacklog,
    Inserted,
    InsertMessage,
    KeepForPeer,
    LoadBacklog,
    MarkReceipt,
    MarkReceiptsOwed,
    Store,
    StoreError,
    TakeKeptForPeer,
)
from trichat.store import SaveLastSeen as StoreLastSeen
from trichat.textmode import HELP_TEXT

if TYPE_CHECKING:
    from trichat.peers import PeerManager

log = logging.getLogger(__name__)

YIELD_EVERY = 256  # requests served from one read before other tasks get a turn
PASSWORD_THREADS = 2  # scrypt is CPU-bound: never let logins starve the event loop's core
# A registration waits this long at most for its linked peers' answers to its claim; a peer
# that has not answered by then is treated as cut off (protocol.md "Name conflicts").
CLAIM_WAIT_S = 2.0


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class ChatService:
    """The running chat service of one server process.

    Args:
        settings: all settings.
        hub: the routing core.
        store: the storage queue.
    """

    def __init__(self, settings: Settings, hub: Hub, store: Store) -> None:
        self.settings = settings
        self.hub = hub
        self.store = store
        self.connections: dict[int, Connection] = {}
        self._ids = itertools.count(1)
        self._password_limiter = trio.CapacityLimiter(PASSWORD_THREADS)
        self.closing = False
        self.peers: PeerManager | None = None  # set by server.py once peer links run
        self._dirty: list[Connection] = []
        self._flush_due = trio.Event()
        self._flusher_running = False
        self._claims: dict[str, trio.Event] = {}  # registrations waiting for peers' replies

    async def run_flusher(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Write what connections queued, once per pass of the event loop (outbox.py)."""
        self._flusher_running = True
        task_status.started()
        try:
            while True:
                await self._flush_due.wait()
                self._flush_due = trio.Event()
                self.flush()
        finally:
            self._flusher_running = False
            self.flush()

    def flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            conn.flush()

    def _mark_dirty(self, conn: Connection) -> None:
        if not self._dirty:
            self._flush_due.set()
        self._dirty.append(conn)

    # --- connections --------------------------------------------------------------

    def open_connection(self, peer: str) -> Connection | None:
        """A new client; None when the server is full or shutting down."""
        if self.closing or len(self.connections) >= self.settings.max_connections:
            return None
        s = self.settings
        session = Session(
            max_line_bytes=s.max_line_bytes,
            rate=s.rate_limit,
            burst=s.rate_burst,
            strikes=s.rate_limit_strikes,
            now=trio.current_time(),
        )
        on_dirty = self._mark_dirty if self._flusher_running else None
        conn = Connection(next(self._ids), peer, session, Outbox(s.outbox_bytes), on_dirty)
        self.connections[conn.id] = conn
        return conn

    def full_message(self) -> bytes:
        why = "the server is full" if not self.closing else "the server is shutting down"
        return encode(Error(errors.SERVER_FULL, f"{why}; try again later"))

    def close_connection(self, conn: Connection) -> None:
        """The connection's tasks have ended: forget it everywhere."""
        self.connections.pop(conn.id, None)
        effects = self.hub.disconnect(conn.id, now_ms())
        if self.closing:
            # Everyone is being disconnected: N goodbyes would cost N x N presence events.
            effects = [e for e in effects if not isinstance(e, Deliver)]
        self.apply(effects)

    def shutdown_connections(self) -> None:
        for conn in list(self.connections.values()):
            conn.close(Bye("shutdown", "the server is shutting down"))

    # --- requests -----------------------------------------------------------------

    async def receive(self, conn: Connection, data: bytes) -> None:
        """Bytes from a client: serve every complete request in them, in order."""
        session = conn.session
        session.feed(data)
        served = 0
        while not conn.closing:
            item = session.next_inbound(trio.current_time())
            if item is None:
                break
            served += 1
            if served % YIELD_EVERY == 0:
                # Fairness: one client's long burst must not hold the event loop (yielding
                # more often costs about a fifth of the CPU per message at full load).
                await trio.lowlevel.checkpoint()
            match item:
                case Refused(event=event, req_id=req_id):
                    conn.send(event, req_id)
                case Kick(bye=bye):
                    log.warning("closing connection %d (%s): %s", conn.id, conn.peer, bye.reason)
                    conn.close(bye)
                case Incoming():
                    try:
                        await self._serve(conn, item)
                    except ProtocolError as exc:
                        conn.send(Error(exc.code, exc.message), item.req_id)

    async def _serve(self, conn: Connection, item: Incoming) -> None:
        request, req_id = item.request, item.req_id
        match request:
            case LoginRequest():
                await self._login(conn, request, req_id)
            case RegisterRequest():
                await self._register(conn, request, req_id)
            case HelpRequest():
                conn.send(HelpText(HELP_TEXT), req_id)
            case PingRequest():
                conn.send(Pong(), req_id)
            case LogoutRequest() if conn.session.user is None:
                conn.close(Bye("logout", "goodbye"))
            case _:
                await self.execute(self.hub.handle(conn.id, request, req_id, now_ms()))

    async def _login(self, conn: Connection, req: LoginRequest, req_id: RequestId) -> None:
        candidates = self.hub.check_login(req.user, req.password)
        uid: str | None = None
        if candidates:
            assert req.password is not None
            if len(req.password) > self.settings.max_password_chars:
                # Never hash a megabyte: no account can have a password this long.
                raise ProtocolError(errors.AUTH_FAILED, "wrong name or password")
            for record in candidates:  # one, unless the name was registered twice (renamed)
                if await trio.to_thread.run_sync(
                    passwords.verify_password,
                    req.password,
                    record.pw_hash,
                    limiter=self._password_limiter,
                ):
                    uid = record.uid
                    break
            if uid is None:
                raise ProtocolError(errors.AUTH_FAILED, "wrong name or password")
        self._logged_in(conn, req.user, req_id, uid)

    async def _register(self, conn: Connection, req: RegisterRequest, req_id: RequestId) -> None:
        s = self.settings
        check_name(req.user)
        if not s.min_password_chars <= len(req.password) <= s.max_password_chars:
            raise ProtocolError(
                errors.WEAK_PASSWORD,
                f"a password needs {s.min_password_chars} to {s.max_password_chars} characters",
            )
        # protocol.md "Registering across the mesh": the name is claimed from every linked
        # peer while the password is hashed; welcome only once none holds an earlier claim.
        reg, effects = self.hub.begin_register(req.user, now_ms())
        self.apply(effects)
        try:
            pw_hash = await trio.to_thread.run_sync(
                passwords.hash_password, req.password, limiter=self._password_limiter
            )
            await self._wait_settled(reg)
            record = self.hub.make_account(reg, secrets.token_hex(8), pw_hash)
            if not await self._call_store(CreateAccount(record)):
                raise ProtocolError(errors.NAME_TAKEN, f"{req.user} is taken; pick another name")
        except BaseException:
            self.apply(self.hub.abort_register(reg))
            raise
        self.apply(self.hub.account_stored(reg, record))
        try:
            await self._wait_settled(reg)  # every linked peer knows it: log in anywhere
        finally:
            self.hub.announced(reg)
        log.info("account %s registered (%s)", req.user, record.uid)
        self._logged_in(conn, req.user, req_id, record.uid)

    async def _wait_settled(self, reg: Registration) -> None:
        """Wait (at most CLAIM_WAIT_S) until every linked peer answered ``reg``."""
        if reg.settled:
            return
        settled = self._claims[reg.rid] = trio.Event()
        try:
            with trio.move_on_after(CLAIM_WAIT_S):
                await settled.wait()
        finally:
            del self._claims[reg.rid]

    def _logged_in(
        self, conn: Connection, user: str, req_id: RequestId, uid: str | None = None
    ) -> None:
        if conn.closing:
            return
        effects = self.hub.login(
            conn.id, user, auto_ack=conn.session.text_mode, now=now_ms(), req_id=req_id, uid=uid
        )
        conn.session.logged_in(self.hub.conns[conn.id].user)
        self.apply(effects)

    async def _call_store(self, op: Any) -> Any:
        try:
            return await self.store.call(op)
        except StoreError:
            raise ProtocolError(errors.UNAVAILABLE, "storage is failing; try again") from None

    # --- effects ------------------------------------------------------------------

    async def execute(self, effects: list[Effect]) -> None:
        """Carry out effects from a client request; waits only when storage is backed up."""
        for effect in effects:
            if isinstance(effect, StoreMessage):
                await self.store.submit(*self._insert(effect))
            else:
                self.apply([effect])

    def apply(self, effects: list[Effect]) -> None:
        """Carry out effects without waiting (from storage callbacks and disconnects)."""
        for effect in effects:
            match effect:
                case Reply(conn=conn_id, event=event, req_id=req_id):
                    conn = self.connections.get(conn_id)
                    if conn is not None:
                        conn.send(event, req_id)
                case Deliver():
                    self._deliver(effect)
                case StoreMessage():
                    self.store.submit_nowait(*self._insert(effect))
                case StoreReceipt(msg=msg, status=status, ts=ts, uid=uid):
                    self.store.submit_nowait(
                        MarkReceipt(msg, uid, status, ts), self._on_receipt(effect)
                    )
                case FetchBacklog(conn=conn_id, uid=uid):
                    self.store.submit_nowait(LoadBacklog(uid), self._on_backlog(conn_id))
                case PushBacklog(server=server, uid=uid, token=token):
                    self.store.submit_nowait(LoadBacklog(uid), self._on_push(server, uid, token))
                case SaveLastSeen(uid=uid, ts=ts):
                    self.store.submit_nowait(StoreLastSeen(uid, ts), _ignore)
                case DropBacklog(uid=uid, ts=ts):
                    self.store.submit_nowait(DiscardBacklog(uid, ts), _ignore)
                case OweReceipts(receipts=receipts):
                    self.store.submit_nowait(MarkReceiptsOwed(receipts, owed=True), _ignore)
                case ReceiptsTold(receipts=receipts):
                    self.store.submit_nowait(MarkReceiptsOwed(receipts, owed=False), _ignore)
                case OweToPeer(server=server, receipt=receipt):
                    self.store.submit_nowait(KeepForPeer(server, receipt), _ignore)
                case SendOwedToPeer(server=server):
                    self.store.submit_nowait(TakeKeptForPeer(server), self._on_kept(server))
                case StoreAccounts(records=records):
                    self.store.submit_nowait(AddAccounts(records), _ignore)
                case ClaimSettled(rid=rid):
                    waiter = self._claims.get(rid)
                    if waiter is not None:
                        waiter.set()
                case AfterStored():
                    self._started(effect.conn)
                    self.store.submit_nowait(Barrier(), self._after_stored(effect))
                case ToPeers(servers=servers, message=message):
                    if self.peers is not None:
                        self.peers.send(servers, message)
                case Close(conn=conn_id, bye=bye):
                    conn = self.connections.get(conn_id)
                    if conn is not None:
                        conn.close(bye)

    def _deliver(self, effect: Deliver) -> None:
        # Encode once per mode, not once per recipient (protocol.md "Fan-out").
        encoded: dict[bool, bytes] = {}
        for conn_id in effect.conns:
            conn = self.connections.get(conn_id)
            if conn is None:
                continue
            text = conn.session.text_mode
            data = encoded.get(text)
            if data is None:
                data = encoded[text] = conn.session.render(effect.event)
            conn.send_bytes(data)

    def _started(self, conn_id: int) -> None:
        conn = self.connections.get(conn_id)
        if conn is not None:
            conn.store_started()

    def _finished(self, conn_id: int) -> None:
        conn = self.connections.get(conn_id)
        if conn is not None:
            conn.store_finished()

    def _after_stored(self, effect: AfterStored) -> Any:
        def done(_result: object) -> None:
            self.apply(effect.effects)
            self._finished(effect.conn)

        return done

    def _insert(self, effect: StoreMessage) -> tuple[InsertMessage, Any]:
        """The storage operation for a message and its callback."""
        self._started(effect.conn)
        since = effect.message.ts - self.settings.dedup_window_s * 1000
        return InsertMessage(effect.message, effect.seq, since), self._on_stored(effect)

    def _on_stored(self, effect: StoreMessage) -> Any:
        def done(result: Inserted | StoreError) -> None:
            if isinstance(result, StoreError):
                self.apply([Reply(effect.conn, _storage_error(), effect.req_id)])
            else:
                self.apply(
                    self.hub.message_stored(
                        result.message,
                        effect.conn,
                        effect.req_id,
                        duplicate=result.duplicate,
                        now=now_ms(),
                    )
                )
            self._finished(effect.conn)

        return done

    def _on_receipt(self, effect: StoreReceipt) -> Any:
        def done(news: tuple[str, str] | StoreError | None) -> None:
            if isinstance(news, tuple):
                sender, sender_uid = news
                self.apply(
                    self.hub.receipt_stored(
                        effect.msg, sender, sender_uid, effect.by, effect.status, effect.ts
                    )
                )

        return done

    def _on_backlog(self, conn_id: int) -> Any:
        def done(backlog: Backlog | StoreError) -> None:
            if isinstance(backlog, StoreError):
                backlog = Backlog()  # offered again at the next login
            self.apply(self.hub.backlog_loaded(conn_id, backlog, now_ms()))

        return done

    def _on_push(self, server: str, uid: str, token: int) -> Any:
        def done(backlog: Backlog | StoreError) -> None:
            if isinstance(backlog, StoreError):
                backlog = Backlog()  # offered again at the recipient's next appearance
            self.apply(self.hub.backlog_for_peer(server, uid, token, backlog))

        return done

    def _on_kept(self, server: str) -> Any:
        def done(receipts: list[PeerReceipt] | StoreError) -> None:
            if not isinstance(receipts, StoreError):
                self.apply(self.hub.owed_loaded(server, receipts))

        return done


def _storage_error() -> Error:
    return Error(errors.UNAVAILABLE, "the message could not be stored; send it again")


def _ignore(_result: object) -> None:
    pass
