"""Backoff delays and Retry-After parsing: pure functions, pinned by tables."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from first_hop_proxy.backoff import (
    delay_for,
    most_attempts,
    parse_retry_after,
    retry_after_from_headers,
)

NOW = 1_700_000_000.0


def http_date(offset: float) -> str:
    return format_datetime(datetime.fromtimestamp(NOW + offset, UTC), usegmt=True)


@pytest.mark.parametrize(
    ("n", "base", "cap", "jitter", "expected"),
    [
        pytest.param(1, 1.0, 60.0, 0.5, 1.0, id="first-retry-exact"),
        pytest.param(2, 1.0, 60.0, 0.5, 2.0, id="second-doubles"),
        pytest.param(3, 1.0, 60.0, 0.5, 4.0, id="third-doubles-again"),
        pytest.param(4, 2.0, 60.0, 0.5, 16.0, id="base-scales"),
        pytest.param(1, 1.0, 60.0, 0.0, 0.75, id="jitter-0-is-minus-25pct"),
        pytest.param(1, 1.0, 60.0, 1.0, 1.25, id="jitter-1-is-plus-25pct"),
        pytest.param(3, 1.0, 60.0, 0.25, 3.5, id="jitter-quarter"),
        pytest.param(7, 1.0, 60.0, 0.5, 60.0, id="capped"),
        pytest.param(6, 1.0, 40.0, 1.0, 40.0, id="cap-after-jitter-never-exceeded"),
        pytest.param(6, 1.0, 40.0, 0.0, 24.0, id="below-cap-with-jitter"),
        pytest.param(5000, 1.0, 60.0, 0.5, 60.0, id="huge-retry-number-no-overflow"),
        pytest.param(0, 1.0, 60.0, 0.5, 1.0, id="zero-treated-as-first"),
        pytest.param(3, 0.0, 60.0, 0.9, 0.0, id="zero-base"),
        pytest.param(3, 1.0, 0.0, 0.5, 0.0, id="zero-cap"),
        pytest.param(1, 1.0, 60.0, 7.0, 1.25, id="jitter-clamped-high"),
        pytest.param(1, 1.0, 60.0, -3.0, 0.75, id="jitter-clamped-low"),
    ],
)
def test_delay_for(n: int, base: float, cap: float, jitter: float, expected: float) -> None:
    assert delay_for(n, base, cap, jitter) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(None, None, id="absent"),
        pytest.param("", None, id="empty"),
        pytest.param("   ", None, id="blank"),
        pytest.param("30", 30.0, id="seconds"),
        pytest.param(" 7 ", 7.0, id="seconds-padded"),
        pytest.param("1.5", 1.5, id="fractional-seconds"),
        pytest.param("0", 0.0, id="zero"),
        pytest.param("-5", 0.0, id="negative-is-now"),
        pytest.param("soon", None, id="garbage"),
        pytest.param("nan", None, id="nan"),
        pytest.param("inf", None, id="infinite"),
        pytest.param(http_date(120), 120.0, id="http-date-future"),
        pytest.param(http_date(-300), 0.0, id="http-date-past"),
        pytest.param("Wed, 21 Oct 2015 07:28:00 -0000", 0.0, id="http-date-naive-past"),
        pytest.param("Mon, 99 Foo 2015 99:99:99 GMT", None, id="broken-date"),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    result = parse_retry_after(value, NOW)
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected, abs=1.0)


@pytest.mark.parametrize(
    ("headers", "now", "expected"),
    [
        pytest.param({}, NOW, None, id="none"),
        pytest.param({"retry-after": "12"}, NOW, 12.0, id="seconds"),
        pytest.param({"retry-after-ms": "1500"}, NOW, 1.5, id="milliseconds"),
        pytest.param({"retry-after-ms": "250", "retry-after": "9"}, NOW, 0.25, id="ms-wins"),
        pytest.param({"retry-after-ms": "x", "retry-after": "9"}, NOW, 9.0, id="bad-ms-falls-back"),
        pytest.param({"retry-after": http_date(60)}, NOW, 60.0, id="date-with-clock"),
        pytest.param({"retry-after": http_date(60)}, None, None, id="date-without-clock-ignored"),
        pytest.param({"retry-after": "8"}, None, 8.0, id="seconds-without-clock"),
        pytest.param({"retry-after": "-8"}, None, 0.0, id="negative-without-clock"),
        pytest.param({"retry-after": "junk"}, NOW, None, id="garbage"),
    ],
)
def test_retry_after_from_headers(
    headers: dict[str, str], now: float | None, expected: float | None
) -> None:
    result = retry_after_from_headers(headers, now)
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected, abs=1.0)


@pytest.mark.parametrize(
    ("max_retries", "base", "cap", "budget", "expected"),
    [
        pytest.param(10, 1.0, 60.0, None, 11, id="no-budget"),
        # shortest waits 0.75, 1.5, 3, 6, 12, 24 (47.25 s), then 48: 95.25 s > 60
        pytest.param(10, 1.0, 60.0, 60.0, 7, id="defaults"),
        pytest.param(3, 1.0, 60.0, 60.0, 4, id="retries-run-out-first"),
        pytest.param(10, 0.01, 0.05, 60.0, 11, id="tiny-delays"),
        pytest.param(10, 100.0, 100.0, 60.0, 1, id="no-retry-fits"),
        pytest.param(0, 1.0, 60.0, 60.0, 1, id="no-retries"),
    ],
)
def test_most_attempts(
    max_retries: int, base: float, cap: float, budget: float | None, expected: int
) -> None:
    assert most_attempts(max_retries, base, cap, budget) == expected
