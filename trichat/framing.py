"""Splitting a byte stream into lines, with a hard memory bound.

Owns: the line limit of protocol.md "Framing". Must never: decode, parse or hold more than
``max_line_bytes`` of a line that has not ended. A line that grows past the limit is reported
once as ``TOO_LONG`` and the rest of it, up to the next newline, is discarded as it arrives.
Like h11's receive buffer, it remembers how far it has scanned so a slow trickle of bytes is
never rescanned.
"""

from __future__ import annotations

import enum
from typing import Final


class Marker(enum.Enum):
    NEED_DATA = "need_data"
    TOO_LONG = "too_long"


NEED_DATA: Final = Marker.NEED_DATA
TOO_LONG: Final = Marker.TOO_LONG

TELNET_IAC: Final = 0xFF


class LineFramer:
    """Feed bytes in, take complete lines out.

    Lines end at ``\\n``; one trailing ``\\r`` is removed too (telnet sends CR LF). A line's
    length is counted without its terminator.

    Args:
        max_line_bytes: the longest line accepted; longer ones become one ``TOO_LONG``.
    """

    def __init__(self, max_line_bytes: int) -> None:
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be at least 1")
        self._max = max_line_bytes
        self._buf = bytearray()
        self._scanned = 0
        self._discarding = False
        self._too_long = 0

    def set_limit(self, max_line_bytes: int) -> None:
        """Change the limit for lines not yet complete (a peer link raises it once the peer
        has proved who it is)."""
        self._max = max_line_bytes
        self._trim_overlong()

    @property
    def buffered_bytes(self) -> int:
        """How many bytes are held now (never more than max_line_bytes + 1)."""
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        """Add bytes received from the peer."""
        if not data:
            return
        if self._discarding:
            nl = data.find(b"\n")
            if nl < 0:
                return
            self._discarding = False
            data = data[nl + 1 :]
        self._buf += data
        self._trim_overlong()

    def _trim_overlong(self) -> None:
        # Only acts while no newline is known within the limit: keep at most max + 1 bytes
        # (the +1 tells "over the limit" from "exactly at it", which a trailing \r needs).
        # A loop, not recursion: one read may hold thousands of short overlong lines.
        while len(self._buf) > self._max + 1:
            if self._buf.find(b"\n", self._scanned, self._max + 2) >= 0:
                return
            # No newline within the limit: the line is too long. Drop what we have of it and
            # skip to its end; anything after a later newline in this chunk is kept.
            nl = self._buf.find(b"\n", self._max + 2)
            self._too_long += 1
            self._scanned = 0
            if nl < 0:
                self._buf.clear()
                self._discarding = True
                return
            del self._buf[: nl + 1]

    def next_line(self) -> bytes | Marker:
        """Return the next complete line, ``TOO_LONG`` once per overlong line, or ``NEED_DATA``."""
        if self._too_long:
            self._too_long -= 1
            return TOO_LONG
        nl = self._buf.find(b"\n", self._scanned)
        if nl < 0:
            self._scanned = len(self._buf)
            return NEED_DATA
        end = nl - 1 if nl > 0 and self._buf[nl - 1] == 0x0D else nl
        self._scanned = 0
        line = bytes(self._buf[:end]) if end <= self._max else TOO_LONG
        del self._buf[: nl + 1]
        # What followed may be an unterminated overlong line: bound it now. A complete line
        # is judged when it is taken, by the limit in force then (a peer link raises its
        # limit after the handshake, and the next line may already be here).
        if self._buf.find(b"\n") < 0:
            self._trim_overlong()
        return line


def strip_telnet(line: bytes) -> bytes:
    """Remove telnet option negotiation (IAC sequences) from a line.

    0xFF never occurs in UTF-8, so this can't change a valid line; it makes a telnet user's
    first line (which may start with IAC DO/WILL ...) read as what they typed.
    """
    if TELNET_IAC not in line:
        return line
    out = bytearray()
    i, n = 0, len(line)
    while i < n:
        b = line[i]
        if b != TELNET_IAC:
            out.append(b)
            i += 1
            continue
        cmd = line[i + 1] if i + 1 < n else None
        if cmd is None:
            i += 1
        elif 251 <= cmd <= 254:  # WILL, WONT, DO, DONT + one option byte
            i += 3
        elif cmd == 250:  # SB ... IAC SE
            se = line.find(b"\xff\xf0", i + 2)
            i = n if se < 0 else se + 2
        else:  # a two-byte command (NOP, IP, AYT, ...), or IAC IAC
            i += 2
    return bytes(out)
