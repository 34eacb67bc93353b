"""How long to wait before the next upstream attempt.

Everything here is pure: the caller passes in the random jitter and the wall
clock, so every delay the proxy will ever choose can be pinned down in a test.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime

#: Jitter spreads retries of many requests apart: +/- this share of the delay.
JITTER_SPREAD = 0.25

#: Above this retry number the doubling is past any sane cap; stop doubling so
#: the arithmetic cannot overflow.
_MAX_EXPONENT = 62


def delay_for(retry_number: int, base: float, cap: float, jitter: float) -> float:
    """The wait before retry ``retry_number`` (1 for the first retry).

    Exponential: ``base * 2**(n-1)``, then moved by +/-25 % according to
    ``jitter`` (0 -> -25 %, 0.5 -> unchanged, 1 -> +25 %), then capped at ``cap``.
    The cap comes last so a configured ``max_delay`` is never exceeded.
    """
    exponent = min(max(retry_number, 1) - 1, _MAX_EXPONENT)
    jitter = min(max(jitter, 0.0), 1.0)
    raw = base * float(2**exponent) * (1.0 - JITTER_SPREAD + 2 * JITTER_SPREAD * jitter)
    return max(0.0, min(raw, cap))


def most_attempts(max_retries: int, base: float, cap: float, budget: float | None) -> int:
    """How many attempts a failing request can make at most: ``max_retries`` + 1, or
    fewer when the shortest backoff waits (jitter at its lowest) outgrow ``budget``.

    For the keep-alive comments: "attempt 3 of 7" must count attempts that can happen.
    """
    if budget is None:
        return max_retries + 1
    waited = 0.0
    for n in range(1, max_retries + 1):
        waited += delay_for(n, base, cap, 0.0)
        if waited > budget:
            return n
    return max_retries + 1


def _number(text: str) -> float | None:
    """``text`` as a finite number, or None."""
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_retry_after(value: str | None, now: float | None) -> float | None:
    """Seconds to wait according to a ``Retry-After`` header value.

    Accepts delta-seconds (``"30"``, also ``"1.5"`` which some proxies send) or
    an HTTP date, compared with ``now`` (Unix time). A time in the past means
    "now": 0. Anything unreadable is ``None`` so the caller falls back to its
    own backoff rather than trusting garbage; so is a date when ``now`` is None.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    seconds = _number(text)
    if seconds is not None:
        return max(seconds, 0.0)
    if now is None:
        return None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(when.timestamp() - now, 0.0)


def retry_after_from_headers(headers: Mapping[str, str], now: float | None) -> float | None:
    """The upstream's requested wait, from lowercase response headers.

    ``retry-after-ms`` (sent by OpenAI-style APIs, more precise) wins over
    ``retry-after``. Without a wall clock (``now`` is None) an HTTP-date value
    cannot be evaluated and is ignored.
    """
    millis = headers.get("retry-after-ms")
    if millis is not None:
        value = _number(millis)
        if value is not None:
            return max(value / 1000.0, 0.0)
    return parse_retry_after(headers.get("retry-after"), now)
