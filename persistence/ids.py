"""Public object ids: a type prefix, then a time-ordered, random suffix (like a ULID).

Ids that sort by creation time make cursor pagination a plain `WHERE id < :after`
without a lookup, and they stay unique across processes without coordination.
"""
from __future__ import annotations

import re
import secrets
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case: sorts like the numbers
_SUFFIX = re.compile(f"[{_ALPHABET}]{{22}}")


def _base32(value: int, width: int) -> str:
    out = []
    for _ in range(width):
        value, digit = divmod(value, 32)
        out.append(_ALPHABET[digit])
    return "".join(reversed(out))


def new_id(prefix: str) -> str:
    """`prefix_` + 10 characters of milliseconds since the epoch + 12 random characters."""
    millis = time.time_ns() // 1_000_000
    return f"{prefix}_{_base32(millis, 10)}{_base32(secrets.randbits(60), 12)}"


def is_id(value: str, prefix: str) -> bool:
    """Whether `value` has the shape of an id made by `new_id(prefix)`."""
    head, sep, suffix = value.partition("_")
    return sep == "_" and head == prefix and _SUFFIX.fullmatch(suffix) is not None
