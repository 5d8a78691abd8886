"""One client connection's state machine: bytes in, requests or refusals out.

Owns: framing, telnet clean-up, choosing JSON or text mode from the first line, flood control,
and what a connection may ask in each state (protocol.md "Sessions"). Must never: route,
store, read a clock or touch a socket. The shell feeds it bytes with ``now`` and carries out
what it returns; it calls :meth:`Session.logged_in` once the hub has accepted a login.
"""

from __future__ import annotations

import enum
from typing import Final

import attrs

from trichat import codec, errors, textmode
from trichat.codec import RequestId
from trichat.errors import ProtocolError
from trichat.framing import NEED_DATA, TOO_LONG, LineFramer, strip_telnet
from trichat.messages import (
    ANONYMOUS_TYPES,
    Bye,
    Error,
    Event,
    Request,
)
from trichat.ratelimit import TokenBucket


class State(enum.Enum):
    ANONYMOUS = "anonymous"
    LOGGED_IN = "logged_in"
    CLOSED = "closed"


class Mode(enum.Enum):
    UNDECIDED = "undecided"
    JSON = "json"
    TEXT = "text"


_LOGIN_TYPES: Final = frozenset({"register", "login"})

# Acknowledgements cost a tenth of a request (protocol.md "Flood control"): a client that
# acknowledges a backlog of stored messages at once must not be taken for a flooder.
_COST: Final = {"received": 0.1, "read": 0.1}


@attrs.define
class Incoming:
    """A request the hub should serve; ``req_id`` is echoed in its direct reply."""

    request: Request
    req_id: RequestId


@attrs.define
class Refused:
    """A reply the shell sends as it is, without asking the hub."""

    event: Error
    req_id: RequestId = None


@attrs.define
class Kick:
    """Close the connection after sending ``bye``."""

    bye: Bye


Inbound = Incoming | Refused | Kick


class Session:
    """Per-connection protocol state.

    Args:
        max_line_bytes: the line limit (protocol.md "Limits and settings").
        rate: requests per second allowed (0 = unlimited).
        burst: requests allowed at once after a quiet spell.
        strikes: refusals in a row before the connection is kicked.
        now: the monotonic time, seconds.
    """

    def __init__(
        self, *, max_line_bytes: int, rate: float, burst: float, strikes: int, now: float
    ) -> None:
        self.state = State.ANONYMOUS
        self.mode = Mode.UNDECIDED
        self.user: str | None = None
        self._framer = LineFramer(max_line_bytes)
        self._max_line = max_line_bytes
        self._bucket = TokenBucket(rate, burst, now)
        self._strikes_allowed = strikes
        self._strikes = 0

    def feed(self, data: bytes) -> None:
        """Add bytes from the client; take what they mean with :meth:`next_inbound`."""
        self._framer.feed(data)

    def next_inbound(self, now: float) -> Inbound | None:
        """The next thing to do, or None when more bytes are needed.

        One at a time, as h11 does: a login must be served before the next line is checked
        against the connection's state.
        """
        while self.state is not State.CLOSED:
            line = self._framer.next_line()
            if line is NEED_DATA:
                return None
            item = self._handle_line(line, now)
            if item is not None:
                if isinstance(item, Kick):
                    self.state = State.CLOSED
                return item
        return None

    def _handle_line(self, line: bytes | object, now: float) -> Inbound | None:
        if line is TOO_LONG:
            if not self._allow(now, 1.0):
                return self._over_budget()
            return Refused(
                Error(errors.LINE_TOO_LONG, f"a line may be at most {self._max_line} bytes")
            )
        assert isinstance(line, bytes)
        # Telnet option bytes may come on any line (IAC IP for Ctrl-C); removing them can only
        # make a line what the client could have sent anyway (0xFF never occurs in UTF-8).
        line = strip_telnet(line).strip()
        if not line:
            return None  # blank lines (a telnet user pressing Enter) are not requests
        if self.mode is Mode.UNDECIDED:
            self.mode = Mode.JSON if line.startswith(b"{") else Mode.TEXT
        try:
            request, req_id = self._parse(line)
        except ProtocolError as exc:
            if not self._allow(now, 1.0):
                return self._over_budget(getattr(exc, "req_id", None))
            return Refused(Error(exc.code, exc.message), getattr(exc, "req_id", None))
        if not self._allow(now, _COST.get(request.TYPE, 1.0)):
            return self._over_budget(req_id)
        return self._check_state(request, req_id)

    def _parse(self, line: bytes) -> tuple[Request, RequestId]:
        if line.startswith(b"{"):
            return codec.decode(line)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(errors.BAD_JSON, "the line is not valid UTF-8") from None
        return textmode.parse_command(text), None

    def _check_state(self, request: Request, req_id: RequestId) -> Inbound:
        # Contract "Before login": only register, login and ping (and text mode's /help and
        # /quit) before; no second login after.
        if self.state is State.ANONYMOUS and request.TYPE not in ANONYMOUS_TYPES:
            why = "log in first: login or register (in text mode /login NAME)"
            return Refused(Error(errors.NOT_LOGGED_IN, why), req_id)
        if self.state is State.LOGGED_IN and request.TYPE in _LOGIN_TYPES:
            why = "this connection is already logged in"
            return Refused(Error(errors.ALREADY_LOGGED_IN, why), req_id)
        return Incoming(request, req_id)

    def _allow(self, now: float, cost: float) -> bool:
        if self._bucket.try_take(now, cost):
            self._strikes = 0
            return True
        self._strikes += 1
        return False

    def _over_budget(self, req_id: RequestId = None) -> Inbound:
        if self._strikes >= self._strikes_allowed:
            return Kick(Bye("rate_limited", "too many requests; closing this connection"))
        return Refused(Error(errors.RATE_LIMITED, "too many requests; slow down"), req_id)

    def logged_in(self, user: str) -> None:
        """The hub accepted a login or register for ``user``."""
        self.state = State.LOGGED_IN
        self.user = user

    def close(self) -> None:
        self.state = State.CLOSED

    @property
    def text_mode(self) -> bool:
        return self.mode is Mode.TEXT

    def render(self, event: Event, req_id: RequestId = None) -> bytes:
        """The bytes for one reply or event in this connection's mode."""
        if self.mode is Mode.TEXT:
            return textmode.render(event)
        return codec.encode(event, req_id)
