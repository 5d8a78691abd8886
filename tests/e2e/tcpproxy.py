"""A small threaded TCP forwarder on 127.0.0.1 for partition tests.

``TcpProxy(target)`` listens on a free port and forwards every connection to ``target``
(HOST, PORT), byte for byte, both ways. ``cut()`` makes a network partition: every
connection it carries is closed and new ones are refused (accepted, then reset at once),
or, with ``mode="blackhole"``, held open without a byte going through; with
``mode="silent"`` the connections it carries stay open but everything on them is dropped
from then on (nobody is told: only a heartbeat timeout notices). ``heal()`` forwards again.
``close()`` stops it all; every thread is a daemon and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from types import TracebackType

OPEN = "open"
REFUSE = "refuse"
BLACKHOLE = "blackhole"
SILENT = "silent"
MODES = (REFUSE, BLACKHOLE, SILENT)
POLL_S = 0.05
CONNECT_TIMEOUT_S = 3.0


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0): the other end sees the connection die at once."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Pair:
    """One forwarded connection: the accepted side and the side dialed to the target."""

    def __init__(self, proxy: TcpProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.closed = threading.Event()
        self.silent = False

    def run(self) -> None:
        peers = {self.client: self.upstream, self.upstream: self.client}
        try:
            while not self.closed.is_set():
                try:
                    readable, _, _ = select.select(list(peers), [], [], POLL_S)
                except (OSError, ValueError):
                    return
                for sock in readable:
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        return
                    if not data or self.closed.is_set():
                        return
                    if self.silent or self.proxy.mode != OPEN:
                        continue  # dropped on the floor: a partition that says nothing
                    try:
                        peers[sock].sendall(data)
                    except OSError:
                        return
        finally:
            self.closed.set()
            _reset(self.client)
            _reset(self.upstream)
            self.proxy._forget(self)

    def close(self) -> None:
        """Ask the forwarding thread to close both sides (it owns the sockets)."""
        self.closed.set()
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class TcpProxy:
    """Forward 127.0.0.1:``port`` to ``target``; see the module docstring.

    Args:
        target: (host, port) to forward to; may be set later (``proxy.target = ...``)
            as long as it is set before the first connection arrives.
    """

    def __init__(self, target: tuple[str, int] | None = None, host: str = "127.0.0.1") -> None:
        self.target = target
        self.host = host
        self.mode = OPEN
        self.accepted = 0  # connections accepted so far, in any mode
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._held: set[socket.socket] = set()  # blackholed connections
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- control --------------------------------------------------------------------

    def cut(self, mode: str = REFUSE) -> None:
        """Partition: see the module docstring for the modes."""
        assert mode in MODES, mode
        with self._lock:
            self.mode = mode
            pairs = list(self._pairs)
        if mode == SILENT:
            for pair in pairs:
                pair.silent = True
        else:
            for pair in pairs:
                pair.close()

    def heal(self) -> None:
        """Forward new connections again; blackholed and silenced ones are closed (their
        bytes are lost, so the ends must start over, as after a real partition)."""
        with self._lock:
            self.mode = OPEN
            held, self._held = list(self._held), set()
            silenced = [pair for pair in self._pairs if pair.silent]
        for sock in held:
            _reset(sock)
        for pair in silenced:
            pair.close()

    def connections(self) -> int:
        """How many connections are being forwarded now."""
        with self._lock:
            return len(self._pairs)

    def close(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            pairs, self._pairs = list(self._pairs), set()
            held, self._held = list(self._held), set()
        for pair in pairs:
            pair.close()
        for sock in held:
            _reset(sock)
        self._thread.join(timeout=2)
        for thread in self._threads:
            thread.join(timeout=2)

    # --- the threads ----------------------------------------------------------------

    def _forget(self, pair: _Pair) -> None:
        with self._lock:
            self._pairs.discard(pair)

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                readable, _, _ = select.select([self._listener], [], [], POLL_S)
                if not readable:
                    continue
                client, _ = self._listener.accept()
            except (OSError, ValueError):
                return
            self.accepted += 1
            mode = self.mode
            if mode == REFUSE:
                _reset(client)
            elif mode in (BLACKHOLE, SILENT):
                with self._lock:
                    self._held.add(client)  # never read: the dialer's handshake times out
            else:
                thread = threading.Thread(target=self._forward, args=(client,), daemon=True)
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
                thread.start()

    def _forward(self, client: socket.socket) -> None:
        target = self.target
        if target is None:
            _reset(client)
            return
        try:
            upstream = socket.create_connection(target, timeout=CONNECT_TIMEOUT_S)
        except OSError:
            _reset(client)
            return
        upstream.settimeout(None)
        client.settimeout(None)
        pair = _Pair(self, client, upstream)
        with self._lock:
            if self._stopped.is_set() or self.mode != OPEN:
                pair.closed.set()
                _reset(client)
                _reset(upstream)
                return
            self._pairs.add(pair)
        pair.run()
