"""Peer links: the Trio shell that keeps this server linked to every other one.

Owns: the peer listener's connections, one dial loop per known peer address (backoff with
jitter), membership (learned from ``members`` messages: joining through any one live member
is enough), the rule that keeps one link per pair of servers, and moving bytes for
:class:`~trichat.peerproto.PeerLink`. Must never: decide routing (the hub does) or parse a
peer message itself (peerproto does). protocol.md "Peer links" is the specification.
"""

from __future__ import annotations

import contextlib
import logging
import random
import sys
from typing import TYPE_CHECKING, TextIO

import attrs
import trio

from trichat import peerproto
from trichat.peerproto import LinkDown, LinkUp, PeerLink, Received

if TYPE_CHECKING:
    from trichat.service import ChatService

log = logging.getLogger(__name__)

DIAL_TIMEOUT_S = 3.0
BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 5.0
MAX_PEER_OUTBOX_BYTES = 64 * 1024 * 1024  # a peer this far behind is cut off and relinks
RECEIVE_BYTES = 256 * 1024
YIELD_EVERY = 64  # peer messages handled from one read before other tasks get a turn


@attrs.define(eq=False)
class Link:
    """One live (or handshaking) peer connection."""

    proto: PeerLink
    stream: trio.abc.Stream
    dialed_by: str = ""
    wake: trio.Event = attrs.Factory(trio.Event)
    queued: int = 0
    cancel_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    up: bool = False
    sending: trio.Lock = attrs.Factory(trio.Lock)  # the writer and a refusal both write

    async def write(self, data: bytes) -> None:
        async with self.sending:
            await self.stream.send_all(data)

    def send(self, line: bytes) -> None:
        self.proto.send_encoded(line, trio.current_time())
        self.queued += len(line)
        if self.queued > MAX_PEER_OUTBOX_BYTES:
            log.warning("peer %s is %d bytes behind: relinking", self.proto.peer, self.queued)
            self.cancel_scope.cancel()
        self.wake.set()


class PeerManager:
    """Every peer link of this server.

    Args:
        service: the chat service whose hub receives what peers say.
        me: this server's name.
        my_addr: HOST:PORT of this server's peer listener, as told to peers.
        secret: the cluster secret.
        seeds: HOST:PORT addresses to join through (``--peer``).
        out: where ``linked`` lines go (stdout by default).
    """

    def __init__(
        self,
        service: ChatService,
        me: str,
        my_addr: str,
        secret: str,
        seeds: tuple[str, ...],
        out: TextIO | None = None,
    ) -> None:
        self.service = service
        self.me = me
        self.my_addr = my_addr
        self._secret = secret
        self._seeds = seeds
        self.links: dict[str, Link] = {}
        self.members: dict[str, str] = {}  # server name -> its peer address
        self._addr_names: dict[str, str] = {}  # an address we dialed -> who answered there
        self._dialing: set[str] = set()
        self._linked = trio.Event()  # replaced after each link change, for dial loops
        self._nursery: trio.Nursery | None = None
        self._out = out

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Dial the seeds and keep every known member linked, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for addr in self._seeds:
                self._start_dialing(addr)
            task_status.started()
            await trio.sleep_forever()

    # --- sending ------------------------------------------------------------------

    def send(self, servers: list[str], message: peerproto.PeerMessage) -> None:
        """Queue ``message`` for each linked server in ``servers`` (encoded once)."""
        line = peerproto.encode_peer(message)
        for server in servers:
            link = self.links.get(server)
            if link is not None:
                link.send(line)

    # --- dialing ------------------------------------------------------------------

    def _start_dialing(self, addr: str) -> None:
        if addr == self.my_addr or addr in self._dialing or self._nursery is None:
            return
        self._dialing.add(addr)
        self._nursery.start_soon(self._dial_loop, addr)

    def _is_linked(self, addr: str) -> bool:
        name = self._addr_names.get(addr)
        return name is not None and name in self.links and self.links[name].up

    async def _dial_loop(self, addr: str) -> None:
        backoff = BACKOFF_MIN_S
        failing = False
        host, _, port = addr.rpartition(":")
        while True:
            while self._is_linked(addr):
                await self._linked.wait()
            try:
                with trio.fail_after(DIAL_TIMEOUT_S):
                    stream = await trio.open_tcp_stream(host, int(port))
            except (OSError, trio.TooSlowError) as exc:
                if not failing:  # log state changes, not every attempt of a flapping peer
                    log.warning("can't reach peer %s: %s (retrying with backoff)", addr, exc)
                    failing = True
            else:
                if failing:
                    log.info("peer %s is reachable again", addr)
                    failing = False
                reason = await self._run_link(stream, dialer=True, addr=addr)
                if reason is not None and "itself" in reason:
                    return  # our own address under another spelling
                if reason is None:
                    backoff = BACKOFF_MIN_S  # it was up: start again from the short delay
            await trio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def serve_incoming(self, stream: trio.SocketStream) -> None:
        """A connection to the peer port."""
        await self._run_link(stream, dialer=False, addr=None)

    # --- one link -----------------------------------------------------------------

    async def _run_link(
        self, stream: trio.abc.Stream, *, dialer: bool, addr: str | None
    ) -> str | None:
        """Run a link until it ends; why it ended (None after a clean run while up)."""
        proto = PeerLink(
            self.me, self.my_addr, self._secret, dialer=dialer, now=trio.current_time()
        )
        link = Link(proto, stream)
        proto.start()
        link.wake.set()  # the dialer's hello goes out now, not at the first heartbeat tick
        reason: str | None = None
        try:
            with link.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_loop, link)
                    nursery.start_soon(self._tick_loop, link)
                    reason = await self._read_loop(link, addr)
                    nursery.cancel_scope.cancel()
        finally:
            self._link_ended(link, reason)
            with trio.move_on_after(1, shield=True):
                await stream.aclose()
        return reason

    async def _read_loop(self, link: Link, addr: str | None) -> str | None:
        while True:
            try:
                data = await link.stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                return f"connection lost: {exc}"
            if not data:
                return "the peer closed the link"
            events = link.proto.receive_data(bytes(data), trio.current_time())
            for n, event in enumerate(events, 1):
                if n % YIELD_EVERY == 0:
                    # A read may hold thousands of relays and broadcasts, each fanned out to
                    # many clients: let clients and heartbeats have a turn meanwhile.
                    await trio.lowlevel.checkpoint()
                match event:
                    case LinkUp(server=server, addr=peer_addr):
                        if not self._link_up(link, server, peer_addr, addr):
                            return "a duplicate link"
                    case Received(message=message):
                        self._received(link, message)
                    case LinkDown(reason=why):
                        link.wake.set()
                        await self._flush_refusal(link)
                        if link.proto.peer is None or "secret" in why:
                            log.warning("peer link refused (%s): %s", addr or "incoming", why)
                        return why
            link.wake.set()

    async def _flush_refusal(self, link: Link) -> None:
        data = link.proto.data_to_send()
        if data:
            with trio.move_on_after(1):
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await link.write(data)

    async def _write_loop(self, link: Link) -> None:
        try:
            while True:
                await link.wake.wait()
                link.wake = trio.Event()
                data = link.proto.data_to_send()
                link.queued = 0
                if data:
                    await link.write(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            link.cancel_scope.cancel()

    async def _tick_loop(self, link: Link) -> None:
        while True:
            await trio.sleep(peerproto.HEARTBEAT_S / 2)
            down = link.proto.tick(trio.current_time())
            if down is not None:
                log.warning("peer %s: %s", link.proto.peer or "?", down.reason)
                link.cancel_scope.cancel()
                return
            link.wake.set()

    # --- membership -----------------------------------------------------------------

    def _link_up(self, link: Link, server: str, peer_addr: str, dialed: str | None) -> bool:
        """Register a link that finished its handshake; False if it must close."""
        link.dialed_by = self.me if link.proto.dialer else server
        if dialed is not None:
            self._addr_names[dialed] = server
        existing = self.links.get(server)
        if existing is not None and existing.up:
            # Both sides dialed at once: keep the link dialed by the name that sorts first;
            # both servers apply the same rule, so they keep the same one.
            if existing.dialed_by == min(self.me, server):
                return False
            existing.up = False
            existing.cancel_scope.cancel()
        link.up = True
        self.links[server] = link
        self.members[server] = peer_addr
        log.info("linked to peer %s (%s)", server, peer_addr)
        self._announce_change()
        members = [peerproto.Member(self.me, self.my_addr)] + [
            peerproto.Member(name, a) for name, a in sorted(self.members.items())
        ]
        link.send(peerproto.encode_peer(peerproto.Members(members)))
        self.service.apply(self.service.hub.peer_up(server, _now_ms()))
        return True

    def _received(self, link: Link, message: peerproto.PeerMessage) -> None:
        server = link.proto.peer
        assert server is not None
        if isinstance(message, peerproto.Members):
            for member in message.members:
                if member.server != self.me and member.server not in self.links:
                    self.members.setdefault(member.server, member.addr)
                    self._start_dialing(member.addr)
            return
        self.service.apply(self.service.hub.peer_message(server, message, _now_ms()))

    def _link_ended(self, link: Link, reason: str | None) -> None:
        server = link.proto.peer
        if server is None or not link.up or self.links.get(server) is not link:
            return
        link.up = False
        del self.links[server]
        log.warning("link to peer %s down: %s", server, reason or "closed")
        self._announce_change()
        self.service.apply(self.service.hub.peer_down(server, _now_ms()))

    def _announce_change(self) -> None:
        self._linked.set()
        self._linked = trio.Event()
        # A line on stdout like ``ready``: `trichat cluster` and scripts follow the mesh.
        print(
            f"linked peers={','.join(sorted(self.links))}", file=self._out or sys.stdout, flush=True
        )


def _now_ms() -> int:
    from trichat.service import now_ms

    return now_ms()
