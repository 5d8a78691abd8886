"""Outbox: bounded outgoing bytes, flushed at once or handed to the one writer task."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trichat.outbox import Outbox, SlowConsumer


def test_queued_chunks_are_taken_at_once_in_order() -> None:
    box = Outbox(100)
    assert box.take_nowait() == b""
    box.put(b"one\n")
    box.put(b"two\n")
    assert box.queued_bytes == 8
    assert box.take_nowait() == b"one\ntwo\n"
    assert box.queued_bytes == 0
    assert box.take_nowait() == b""


def test_bytes_the_kernel_did_not_take_go_back_first() -> None:
    box = Outbox(100)
    box.put(b"abcdef")
    data = box.take_nowait()
    box.put(b"later")
    box.put_back(data[3:])  # the socket took only "abc"
    assert box.queued_bytes == 8
    assert box.take_nowait() == b"deflater"


def test_a_slow_reader_is_detected_at_the_limit() -> None:
    box = Outbox(10)
    box.put(b"12345")
    box.put(b"67890")  # exactly the limit is fine
    with pytest.raises(SlowConsumer):
        box.put(b"x")
    assert box.queued_bytes == 10  # the refused chunk was not queued
    assert box.take_nowait() == b"1234567890"
    box.put(b"fits again")
    with pytest.raises(SlowConsumer):
        Outbox(4).put(b"too big")


async def test_the_writer_sleeps_until_woken_then_takes_everything() -> None:
    box = Outbox(100)
    got: list[bytes] = []

    async def writer() -> None:
        got.append(await box.take())

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            box.put(b"late\n")
            box.put(b"r\n")
            box.wake_writer()
    assert got == [b"late\nr\n"]


async def test_take_returns_at_once_when_bytes_are_waiting() -> None:
    box = Outbox(100)
    box.put(b"ready\n")
    with trio.fail_after(5):
        assert await box.take() == b"ready\n"


async def test_a_writer_loop_sees_every_byte_in_order_then_stops_on_close() -> None:
    box = Outbox(1000)
    received = bytearray()

    async def writer() -> None:
        while data := await box.take():
            received.extend(data)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            for i in range(50):
                box.put(b"%d\n" % i)
                if i % 7 == 0:
                    box.wake_writer()
                    await trio.testing.wait_all_tasks_blocked()
            box.close()
    assert bytes(received) == b"".join(b"%d\n" % i for i in range(50))


async def test_close_drains_what_is_queued_then_says_done() -> None:
    box = Outbox(100)
    box.put(b"bye\n")
    box.close()
    box.put(b"ignored\n")  # nothing more after close
    with trio.fail_after(5):
        assert await box.take() == b"bye\n"
        assert await box.take() == b""
        assert await box.take() == b""


async def test_close_wakes_a_waiting_writer() -> None:
    box = Outbox(100)
    got: list[bytes] = []

    async def writer() -> None:
        got.append(await box.take())

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()
            box.close()
    assert got == [b""]
