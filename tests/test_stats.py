"""The running figures behind the dashboard and /metrics: windows, medians, histograms."""

from __future__ import annotations

import pytest

from first_hop_proxy.stats import HISTOGRAM_BOUNDS, WINDOW_MINUTES, Histogram, Stats, is_failure

T0 = 1_800_000_000.0  # a minute boundary (divisible by 60)


def test_histogram_buckets_are_cumulative_and_end_with_inf() -> None:
    h = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        h.observe(value)
    assert h.cumulative() == [("0.1", 2), ("1.0", 4), ("+Inf", 5)]
    assert h.count == 5
    assert h.sum == pytest.approx(8.65)


def test_default_histogram_has_every_bound() -> None:
    h = Histogram()
    assert [b for b, _ in h.cumulative()][:-1] == [str(b) for b in HISTOGRAM_BOUNDS]


def test_requests_per_minute_for_the_last_hour() -> None:
    stats = Stats()
    stats.request("default", 200, T0 + 1)
    stats.request("default", 503, T0 + 2)
    stats.request("default", 499, T0 + 3)  # a client that left is no failure
    stats.request("default", 200, T0 - 120)
    minutes = stats.per_minute(T0 + 30)
    assert len(minutes) == WINDOW_MINUTES
    assert minutes[-1] == {"t": int(T0), "requests": 3, "failures": 1}
    assert minutes[-3] == {"t": int(T0 - 120), "requests": 1, "failures": 0}
    assert sum(m["requests"] for m in minutes) == 4
    later = stats.per_minute(T0 + 3600)  # an hour on: all of it has rolled out
    assert sum(m["requests"] for m in later) == 0


def test_counters_add_up() -> None:
    stats = Stats()
    stats.attempt("a", action="retry", duration=0.2, retry_reason="503")
    stats.attempt("a", action="retry", duration=0.2, retry_reason="timeout")
    stats.attempt("b", action="retry", duration=0.2, retry_reason="503", recategorized=True)
    stats.attempt("b", action="retry", duration=0.2, retry_reason="empty_response", empty=True)
    stats.attempt("b", action="hard_stop", duration=0.2)
    stats.request("b", 200, T0, first_token=0.4)
    stats.request("", 499, T0)
    counters = stats.counters()
    assert counters["requests"] == 2
    assert counters["by_status"] == {"200": 1, "499": 1}
    assert counters["retries"] == 4
    assert counters["retries_by_reason"] == {"503": 2, "timeout": 1, "empty_response": 1}
    assert counters["recategorizations"] == 1
    assert counters["empty_replies"] == 1
    assert counters["hard_stops"] == 1
    assert counters["client_aborts"] == 1
    assert stats.attempts["b", "retry"] == 2 and stats.attempts["a", "retry"] == 2
    assert stats.first_token["b"].count == 1
    assert stats.latency["a"].count == 2 and stats.latency["b"].count == 3


@pytest.mark.parametrize(
    ("status", "failed"), [(200, False), (399, False), (400, True), (499, False), (503, True)]
)
def test_what_counts_as_a_failure(status: int, failed: bool) -> None:
    assert is_failure(status) is failed
