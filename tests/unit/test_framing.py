"""LineFramer: same lines whatever the chunking, a hard memory bound, and telnet clean-up."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trichat.framing import NEED_DATA, TOO_LONG, LineFramer, Marker, strip_telnet


def drain(framer: LineFramer) -> list[bytes | Marker]:
    out: list[bytes | Marker] = []
    while (item := framer.next_line()) is not NEED_DATA:
        out.append(item)
    return out


def reference_lines(stream: bytes, limit: int) -> list[bytes | Marker]:
    """What the framer must produce for the whole stream: the obvious, unbounded way."""
    *ended, tail = stream.split(b"\n")
    out: list[bytes | Marker] = []
    for piece in ended:
        line = piece[:-1] if piece.endswith(b"\r") else piece
        out.append(TOO_LONG if len(line) > limit else line)
    # An unfinished line is reported as soon as it is certainly too long: limit + 1 bytes
    # could still be a full line followed by its CR LF, limit + 2 can't.
    if len(tail) >= limit + 2:
        out.append(TOO_LONG)
    return out


def feed_all(limit: int, *chunks: bytes) -> list[bytes | Marker]:
    framer = LineFramer(limit)
    out: list[bytes | Marker] = []
    for chunk in chunks:
        framer.feed(chunk)
        out += drain(framer)
    return out


# Streams rich in newlines, CRs and runs around the limit, so every edge is hit often.
_pieces = st.one_of(
    st.sampled_from([b"\n", b"\r\n", b"\r", b"a", b"\xff", b"{"]),
    st.binary(max_size=12),
    st.integers(0, 40).map(lambda n: b"x" * n),
)
_streams = st.lists(_pieces, max_size=40).map(b"".join)


@st.composite
def chunkings(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    stream = draw(_streams)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    bounds = [0, *cuts, len(stream)]
    return stream, [stream[a:b] for a, b in itertools.pairwise(bounds)]


@given(limit=st.integers(1, 20), case=chunkings(), drains=st.lists(st.booleans()))
def test_any_chunking_gives_the_lines_of_the_whole_stream(
    limit: int, case: tuple[bytes, list[bytes]], drains: list[bool]
) -> None:
    stream, chunks = case
    framer = LineFramer(limit)
    got: list[bytes | Marker] = []
    for i, chunk in enumerate(chunks):
        framer.feed(chunk)
        # Sometimes the shell reads again before taking lines out; order must not change.
        if i >= len(drains) or drains[i]:
            got += drain(framer)
            assert framer.buffered_bytes <= limit + 1
    got += drain(framer)
    assert got == reference_lines(stream, limit)
    assert framer.buffered_bytes <= limit + 1


@given(limit=st.integers(1, 20), case=chunkings())
def test_memory_stays_bounded_byte_by_byte(limit: int, case: tuple[bytes, list[bytes]]) -> None:
    stream, _ = case
    framer = LineFramer(limit)
    got: list[bytes | Marker] = []
    for i in range(len(stream)):
        framer.feed(stream[i : i + 1])
        got += drain(framer)
        assert framer.buffered_bytes <= limit + 1
    assert got == reference_lines(stream, limit)


def test_line_of_exactly_the_limit_is_accepted() -> None:
    assert feed_all(8, b"12345678\n") == [b"12345678"]


def test_line_of_limit_plus_one_is_too_long_and_the_next_line_is_intact() -> None:
    assert feed_all(8, b"123456789\nnext\n") == [TOO_LONG, b"next"]


@pytest.mark.parametrize("line", [b"12345678", b"123456789"])
def test_limit_split_across_reads_gives_the_same_answer(line: bytes) -> None:
    expected = [line] if len(line) <= 8 else [TOO_LONG]
    data = line + b"\nafter\n"
    for cut in range(len(data) + 1):
        assert feed_all(8, data[:cut], data[cut:]) == [*expected, b"after"], cut


def test_crlf_is_one_terminator_even_at_the_limit() -> None:
    assert feed_all(4, b"abcd\r\n") == [b"abcd"]
    # The CR arrives alone first: at that moment the framer holds limit + 1 bytes.
    assert feed_all(4, b"abcd", b"\r", b"\n") == [b"abcd"]
    assert feed_all(4, b"abcde\r\n") == [TOO_LONG]


def test_only_one_trailing_cr_is_removed_and_inner_crs_are_kept() -> None:
    assert feed_all(10, b"a\rb\n", b"c\r\r\n", b"\r\n") == [b"a\rb", b"c\r", b""]


def test_blank_lines_are_lines() -> None:
    assert feed_all(4, b"\n\n") == [b"", b""]


def test_partial_line_waits_for_more() -> None:
    framer = LineFramer(16)
    framer.feed(b"hel")
    assert framer.next_line() is NEED_DATA
    assert framer.next_line() is NEED_DATA
    framer.feed(b"lo\nwor")
    assert framer.next_line() == b"hello"
    assert framer.next_line() is NEED_DATA
    assert framer.buffered_bytes == 3


def test_a_huge_line_trickling_in_is_reported_once_and_never_held() -> None:
    framer = LineFramer(16)
    reported = []
    for _ in range(1000):
        framer.feed(b"y" * 7)
        reported += drain(framer)
        assert framer.buffered_bytes <= 17
    framer.feed(b"\nok\n")
    reported += drain(framer)
    assert reported == [TOO_LONG, b"ok"]


def test_a_huge_line_in_one_read_is_not_kept() -> None:
    framer = LineFramer(16)
    framer.feed(b"z" * 1_000_000)
    assert framer.buffered_bytes <= 17
    assert drain(framer) == [TOO_LONG]
    framer.feed(b"zzz\r\nfine\r\n")
    assert drain(framer) == [b"fine"]


def test_several_too_long_lines_are_each_reported_in_order() -> None:
    data = b"a" * 20 + b"\nok1\n" + b"b" * 20 + b"\n" + b"c" * 20 + b"\nok2\n"
    assert feed_all(8, data) == [TOO_LONG, b"ok1", TOO_LONG, TOO_LONG, b"ok2"]


def test_thousands_of_too_long_lines_in_one_read_do_not_crash() -> None:
    # _trim_overlong is a loop: one read of many short overlong lines must not recurse.
    framer = LineFramer(1)
    framer.feed(b"xxx\n" * 5000)
    assert framer.buffered_bytes <= 2
    assert drain(framer) == [TOO_LONG] * 5000


def test_overlong_lines_between_good_ones_in_one_read_keep_their_order() -> None:
    framer = LineFramer(4)
    framer.feed(b"ok\n" + b"longer\n" * 3000 + b"end\n" + b"tail-unfinished")
    assert drain(framer) == [b"ok", *[TOO_LONG] * 3000, b"end", TOO_LONG]
    assert framer.buffered_bytes == 0  # the unfinished overlong tail is being discarded
    framer.feed(b"...still\nnext\n")
    assert drain(framer) == [b"next"]


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError):
        LineFramer(0)


# --- telnet ------------------------------------------------------------------------

IAC = b"\xff"


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        (b"/login bob", b"/login bob"),
        (IAC + b"\xfb\x01/login bob", b"/login bob"),  # IAC WILL ECHO
        (IAC + b"\xfd\x03" + IAC + b"\xfc\x22hi", b"hi"),  # IAC DO SGA, IAC WONT LINEMODE
        (b"a" + IAC + b"\xfa\x18\x00xterm" + IAC + b"\xf0b", b"ab"),  # SB ... IAC SE
        (b"a" + IAC + b"\xfa\x18 never ends", b"a"),
        (b"a" + IAC + b"\xf1b", b"ab"),  # IAC NOP
        (b"a" + IAC + IAC + b"b", b"ab"),
        (b"ab" + IAC, b"ab"),
    ],
)
def test_strip_telnet(raw: bytes, clean: bytes) -> None:
    assert strip_telnet(raw) == clean


@given(st.binary())
def test_strip_telnet_never_leaves_an_iac_and_keeps_clean_lines(raw: bytes) -> None:
    out = strip_telnet(raw)
    assert b"\xff" not in out
    if b"\xff" not in raw:
        assert out == raw
    # What is left is what the user typed, in order: a subsequence of the input.
    it = iter(raw)
    assert all(b in it for b in out)
