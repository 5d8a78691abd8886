"""Per-connection flood control: a token bucket (protocol.md "Flood control").

Must never: read a clock itself; ``now`` (seconds, monotonic) is passed in.
"""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens a second, holding at most ``burst``; rate 0 means unlimited.

    Args:
        rate: requests per second allowed on average.
        burst: how many requests may come at once after a quiet spell.
        now: the current monotonic time in seconds.
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp = now

    def try_take(self, now: float, cost: float = 1.0) -> bool:
        """Spend ``cost`` tokens if there are that many; False means over budget."""
        if self.rate <= 0:
            return True
        elapsed = now - self._stamp
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._stamp = now
        if self._tokens >= cost:
            # Rounded so that ten acknowledgements (0.1 each) cost exactly one request:
            # 0.1 has no exact binary form, and the error would otherwise accumulate.
            self._tokens = round(self._tokens - cost, 9)
            return True
        return False
