"""User names (protocol.md "Names"): what is allowed and how two names compare.

Must never: know who is online; that is hub.py.
"""

from __future__ import annotations

import re
from typing import Final

from trichat import errors
from trichat.errors import ProtocolError

MAX_NAME_CHARS: Final = 32
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,32}")


def is_valid_name(name: str) -> bool:
    """True for 1-32 characters from letters, digits, ``_``, ``-`` and ``.``."""
    return _NAME_RE.fullmatch(name) is not None


def name_key(name: str) -> str:
    """The form two names are compared in: names are unique ignoring case."""
    return name.lower()


def describe_name_rule() -> str:
    return "a name is 1-32 characters: letters, digits, '_', '-' or '.'"


def check_name(name: str) -> None:
    """Raises ProtocolError ``bad_name`` unless ``name`` follows the rule."""
    if not is_valid_name(name):
        raise ProtocolError(errors.BAD_NAME, describe_name_rule())
