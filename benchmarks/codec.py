#!/usr/bin/env python3
"""Micro-benchmark: stdlib json vs orjson on trichat's two hottest shapes.

Per private message the server decodes one `send` request line and encodes one `message`
event (plus a `sent` reply), so these two operations bound its per-message codec cost.
Prints the best-of-repeats time per operation in ns, and orjson's speed-up.
"""

from __future__ import annotations

import argparse
import json
import timeit
from collections.abc import Callable
from functools import partial
from typing import Any

import orjson


def send_line(text: str) -> bytes:
    """A `send` request as it arrives on the wire (bytes with the newline)."""
    request = {"type": "send", "to": "c18", "text": text, "id": 5}
    return json.dumps(request, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def message_event(text: str) -> dict[str, Any]:
    """The `message` event the recipient gets, before encoding."""
    return {
        "type": "message",
        "msg": "bench:123456",
        "from": "c17",
        "to": "c18",
        "text": text,
        "ts": 1_732_600_000_000,
    }


def stdlib_encode(event: dict[str, Any]) -> bytes:
    # Compact separators and raw UTF-8: what a server on the stdlib would actually send.
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def orjson_encode(event: dict[str, Any]) -> bytes:
    return orjson.dumps(event) + b"\n"


def best_ns(func: Callable[[], object], number: int, repeat: int) -> float:
    """Best of `repeat` runs: the least disturbed by other processes (timeit's advice)."""
    return min(timeit.repeat(func, number=number, repeat=repeat)) / number * 1e9


def compare(
    label: str, stdlib: Callable[[], object], fast: Callable[[], object], args: Any
) -> None:
    slow_ns = best_ns(stdlib, args.number, args.repeat)
    fast_ns = best_ns(fast, args.number, args.repeat)
    print(f"{label:<34} {slow_ns:9.0f} {fast_ns:9.0f} {slow_ns / fast_ns:8.1f}x")


def texts(size: int) -> dict[str, str]:
    """Text bodies to try: short ASCII, `size` ASCII, and `size` non-ASCII characters."""
    return {
        "16 ascii": "hello there, c18",
        f"{size} ascii": "x" * size,
        f"{size} utf-8": "é" * size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=100_000, help="calls per timing")
    parser.add_argument("--repeat", type=int, default=5, help="timings; the best is shown")
    parser.add_argument("--size", type=int, default=1000, help="characters of the long texts")
    args = parser.parse_args()
    print(f"{'operation (text)':<34} {'json ns':>9} {'orjson ns':>9} {'speed-up':>9}")
    for name, text in texts(args.size).items():
        # partial binds this iteration's values (a lambda would see the last ones).
        line = send_line(text)
        compare(
            f"decode send ({name})", partial(json.loads, line), partial(orjson.loads, line), args
        )
        event = message_event(text)
        compare(
            f"encode message ({name})",
            partial(stdlib_encode, event),
            partial(orjson_encode, event),
            args,
        )


if __name__ == "__main__":
    main()
