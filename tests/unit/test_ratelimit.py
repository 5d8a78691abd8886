"""TokenBucket: bursts allowed, then a steady rate; time is passed in."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from trichat.ratelimit import TokenBucket


def takes(bucket: TokenBucket, now: float, n: int) -> list[bool]:
    return [bucket.try_take(now) for _ in range(n)]


def test_a_burst_is_allowed_then_refused() -> None:
    bucket = TokenBucket(rate=2, burst=3, now=100.0)
    assert takes(bucket, 100.0, 4) == [True, True, True, False]


def test_tokens_come_back_at_the_rate() -> None:
    bucket = TokenBucket(rate=2, burst=3, now=0.0)
    takes(bucket, 0.0, 3)
    assert bucket.try_take(0.25) is False  # half a token
    assert bucket.try_take(0.5) is True  # one token by now
    assert bucket.try_take(0.5) is False


def test_a_long_quiet_spell_gives_at_most_the_burst() -> None:
    bucket = TokenBucket(rate=10, burst=2, now=0.0)
    assert takes(bucket, 3600.0, 3) == [True, True, False]


def test_rate_zero_is_unlimited() -> None:
    bucket = TokenBucket(rate=0, burst=1, now=0.0)
    assert all(takes(bucket, 0.0, 10_000))


def test_a_clock_going_backwards_gives_nothing() -> None:
    bucket = TokenBucket(rate=1, burst=1, now=10.0)
    assert bucket.try_take(10.0) is True
    assert bucket.try_take(5.0) is False
    assert bucket.try_take(10.5) is False
    assert bucket.try_take(11.0) is True


@given(
    rate=st.integers(1, 50),
    burst=st.integers(1, 20),
    gaps=st.lists(st.floats(0, 2, allow_nan=False), max_size=200),
)
def test_never_more_than_burst_plus_rate_times_elapsed(
    rate: int, burst: int, gaps: list[float]
) -> None:
    bucket = TokenBucket(rate=rate, burst=burst, now=0.0)
    now, allowed = 0.0, 0
    for gap in gaps:
        now += gap
        allowed += bucket.try_take(now)
        assert allowed <= burst + rate * now + 1e-6
