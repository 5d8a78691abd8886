"""Password hashing: scrypt, salted, and never fooled or crashed by a bad stored hash."""

from __future__ import annotations

import pytest

from trichat.passwords import hash_password, verify_password


def test_the_right_password_verifies_and_a_wrong_one_does_not() -> None:
    stored = hash_password("correct horse")
    assert verify_password("correct horse", stored)
    assert not verify_password("correct hors", stored)
    assert not verify_password("Correct horse", stored)
    assert not verify_password("", stored)


def test_non_ascii_passwords_work() -> None:
    stored = hash_password("p\u00e4ssw\u00f6rd \U0001f511")
    assert verify_password("p\u00e4ssw\u00f6rd \U0001f511", stored)
    assert not verify_password("passwOrd", stored)


def test_hashes_are_salted_and_do_not_contain_the_password() -> None:
    first, second = hash_password("hunter22"), hash_password("hunter22")
    assert first != second
    assert "hunter22" not in first
    assert first.startswith("scrypt$")
    assert verify_password("hunter22", second)


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "hunter22",
        "scrypt$",
        "bcrypt$16384$8$1$c2FsdA==$a2V5",
        "scrypt$x$8$1$c2FsdA==$a2V5",
        "scrypt$16384$8$1$not base64!$a2V5",
        "scrypt$16384$8$1$c2FsdA==$",
        "scrypt$3$8$1$c2FsdA==$a2V5",  # n must be a power of two
        "scrypt$16384$8$1$c2FsdA==$a2V5$extra",
    ],
)
def test_a_malformed_stored_hash_never_verifies_and_never_raises(stored: str) -> None:
    assert verify_password("hunter22", stored) is False


def test_a_tampered_hash_does_not_verify() -> None:
    stored = hash_password("hunter22")
    head, key = stored.rsplit("$", 1)
    flipped = ("B" if key[0] == "A" else "A") + key[1:]
    assert not verify_password("hunter22", f"{head}${flipped}")
