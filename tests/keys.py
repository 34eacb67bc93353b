"""Test keys, and the check that no piece of one ever shows up where it must not."""

from __future__ import annotations

import secrets
import string

ALNUM = string.ascii_letters + string.digits
WINDOW = 12  # no 12-character piece of a key may appear anywhere


def random_key(prefix: str = "sk-test-", length: int = 40) -> str:
    return prefix + "".join(secrets.choice(ALNUM) for _ in range(length))


def windows(key: str) -> set[str]:
    """Every 12-character piece of ``key``."""
    return {key[i : i + WINDOW] for i in range(len(key) - WINDOW + 1)}


def assert_no_leak(text: str, secret: str) -> None:
    assert secret not in text
    for piece in windows(secret):
        assert piece not in text, f"12-char piece {piece!r} leaked"
