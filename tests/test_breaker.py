"""The circuit breaker's state machine, driven with explicit times (no sleeping)."""

from __future__ import annotations

from typing import Any

import pytest

from first_hop_proxy.breaker import RETRY, CircuitBreaker, Permit, State, Transition
from first_hop_proxy.config import CircuitBreaker as CircuitBreakerConfig


def tripped(threshold: int = 3, recovery: float = 60.0, half_open_max: int = 1) -> CircuitBreaker:
    """A breaker opened at t=100."""
    breaker = CircuitBreaker(threshold, recovery, half_open_max)
    for _ in range(threshold):
        breaker.record_failure(100.0)
    assert breaker.state is State.OPEN
    return breaker


def test_from_config() -> None:
    cfg = CircuitBreakerConfig(
        enabled=True, failure_threshold=7, recovery_timeout=12, half_open_max_requests=2
    )
    breaker = CircuitBreaker.from_config(cfg)
    assert (breaker.threshold, breaker.recovery_timeout, breaker.half_open_max) == (7, 12.0, 2)
    assert breaker.enabled


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"threshold": 0}, id="threshold-zero"),
        pytest.param({"half_open_max": 0}, id="half-open-zero"),
        pytest.param({"recovery_timeout": -1.0}, id="negative-timeout"),
    ],
)
def test_rejects_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(**kwargs)


@pytest.mark.parametrize(
    ("failures", "state", "transition"),
    [
        pytest.param(1, State.CLOSED, None, id="one-below"),
        pytest.param(2, State.CLOSED, None, id="two-below"),
        pytest.param(
            3,
            State.OPEN,
            Transition(State.CLOSED, State.OPEN, "3 consecutive failures"),
            id="opens-at-threshold",
        ),
    ],
)
def test_closed_to_open_at_threshold(
    failures: int, state: State, transition: Transition | None
) -> None:
    breaker = CircuitBreaker(3, 60.0, 1)
    results = [breaker.record_failure(10.0 + i) for i in range(failures)]
    assert breaker.state is state
    assert results[-1] == transition
    assert all(r is None for r in results[:-1])
    assert breaker.consecutive_failures == failures


def test_success_resets_the_count() -> None:
    breaker = CircuitBreaker(3, 60.0, 1)
    breaker.record_failure(1.0)
    breaker.record_failure(2.0)
    assert breaker.record_success(3.0) is None
    assert breaker.consecutive_failures == 0
    breaker.record_failure(4.0)
    breaker.record_failure(5.0)
    assert breaker.state is State.CLOSED


def test_closed_allows_everything() -> None:
    breaker = CircuitBreaker(3, 60.0, 1)
    permits = [breaker.acquire(float(t)) for t in range(20)]
    assert all(permits)
    assert not any(p.probe for p in permits)
    assert breaker.retry_in(5.0) == 0.0


@pytest.mark.parametrize(
    ("now", "allowed", "retry_in"),
    [
        pytest.param(100.0, False, 60.0, id="just-opened"),
        pytest.param(130.0, False, 30.0, id="half-way"),
        pytest.param(159.9, False, 0.1, id="just-before"),
        pytest.param(160.0, True, 0.0, id="timeout-passed"),
        pytest.param(500.0, True, 0.0, id="long-after"),
    ],
)
def test_open_rejects_until_recovery_timeout(now: float, allowed: bool, retry_in: float) -> None:
    breaker = tripped()
    assert breaker.next_probe_at == 160.0
    assert breaker.retry_in(now) == pytest.approx(retry_in)
    permit = breaker.acquire(now)
    assert bool(permit) is allowed
    if not allowed:
        assert permit.retry_in == pytest.approx(retry_in)
        assert breaker.state is State.OPEN
        assert permit.transition is None


def test_open_to_half_open_reports_transition() -> None:
    breaker = tripped()
    permit = breaker.acquire(160.0)
    assert permit.allowed and permit.probe
    assert permit.transition == Transition(
        State.OPEN, State.HALF_OPEN, "recovery timeout of 60 s passed"
    )
    assert breaker.state is State.HALF_OPEN
    assert breaker.next_probe_at is None
    assert breaker.probes_in_flight == 1


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_half_open_limits_probes(limit: int) -> None:
    breaker = tripped(half_open_max=limit)
    permits = [breaker.acquire(161.0) for _ in range(limit + 2)]
    assert [bool(p) for p in permits] == [True] * limit + [False, False]
    assert all(p.probe for p in permits[:limit])
    assert breaker.probes_in_flight == limit
    # A refused caller is told to wait for the probe window to run out.
    assert permits[-1].retry_in == pytest.approx(60.0)


def test_probe_success_closes() -> None:
    breaker = tripped()
    permit = breaker.acquire(170.0)
    transition = breaker.record_success(171.0, permit)
    assert transition == Transition(State.HALF_OPEN, State.CLOSED, "probe succeeded")
    assert breaker.state is State.CLOSED
    assert breaker.consecutive_failures == 0
    assert breaker.acquire(172.0)


def test_probe_failure_reopens_with_fresh_timeout() -> None:
    breaker = tripped()
    permit = breaker.acquire(170.0)
    transition = breaker.record_failure(175.0, permit)
    assert transition == Transition(State.HALF_OPEN, State.OPEN, "probe failed")
    assert breaker.state is State.OPEN
    assert breaker.next_probe_at == 235.0
    assert not breaker.acquire(234.0)
    assert breaker.acquire(235.0).probe


def test_record_without_permit_counts_as_probe_when_half_open() -> None:
    breaker = tripped()
    breaker.acquire(170.0)
    assert breaker.record_success(171.0) is not None
    assert breaker.state is State.CLOSED


def test_stale_results_are_ignored() -> None:
    breaker = CircuitBreaker(2, 60.0, 1)
    early = breaker.acquire(0.0)  # goes out while closed
    breaker.record_failure(1.0)
    breaker.record_failure(2.0)
    assert breaker.state is State.OPEN
    # A late result from before the circuit opened changes nothing while OPEN ...
    assert breaker.record_success(3.0, early) is None
    assert breaker.record_failure(3.0, early) is None
    assert breaker.state is State.OPEN
    assert breaker.next_probe_at == 62.0
    # ... nor while HALF_OPEN: only the probe's verdict counts.
    probe = breaker.acquire(62.0)
    assert breaker.record_success(63.0, early) is None
    assert breaker.state is State.HALF_OPEN
    assert breaker.record_success(64.0, probe) is not None


def test_probe_from_an_earlier_half_open_period_is_stale() -> None:
    breaker = tripped(half_open_max=2)
    first = breaker.acquire(160.0)
    second = breaker.acquire(160.0)
    breaker.record_failure(161.0, first)  # reopens
    fresh = breaker.acquire(221.0)
    assert breaker.record_success(222.0, second) is None
    assert breaker.state is State.HALF_OPEN
    assert breaker.record_failure(223.0, fresh) is not None


def test_release_gives_the_probe_slot_back() -> None:
    breaker = tripped()
    permit = breaker.acquire(160.0)
    assert not breaker.acquire(160.5)
    breaker.release(161.0, permit)
    assert breaker.probes_in_flight == 0
    assert breaker.state is State.HALF_OPEN
    assert breaker.acquire(161.5).probe


def test_lost_probe_is_presumed_gone_after_recovery_timeout() -> None:
    breaker = tripped()
    assert breaker.acquire(160.0)
    assert not breaker.acquire(219.0)
    assert breaker.retry_in(219.0) == pytest.approx(1.0)
    assert breaker.acquire(220.0).probe


def test_disabled_always_allows() -> None:
    breaker = CircuitBreaker(1, 60.0, 1, enabled=False)
    for t in range(10):
        assert breaker.record_failure(float(t)) is None
    assert breaker.state is State.CLOSED
    assert breaker.acquire(10.0) == Permit(True)
    assert breaker.retry_in(10.0) == 0.0
    assert breaker.record_success(11.0) is None


def test_retries_are_never_refused_and_a_retry_that_succeeds_closes() -> None:
    """A request the breaker admitted keeps its retry budget: the breaker protects the
    next requests, not the one whose failures opened it."""
    breaker = CircuitBreaker(threshold=2, recovery_timeout=60)
    first = breaker.acquire(0.0)
    assert first
    breaker.record_failure(0.0, first, "503 Service Unavailable")
    moved = breaker.record_failure(1.0, RETRY, "503 Service Unavailable: busy")
    assert moved is not None and moved.new is State.OPEN
    assert not breaker.acquire(2.0)  # the next request is refused
    assert breaker.record_failure(3.0, RETRY, "still busy") is None  # counts nothing more
    assert breaker.state is State.OPEN and breaker.consecutive_failures == 2
    assert breaker.last_failure == "still busy"
    closed = breaker.record_success(4.0, RETRY)
    assert closed == Transition(State.OPEN, State.CLOSED, "a retry succeeded")
    assert breaker.acquire(5.0)


def test_a_retry_is_no_probe() -> None:
    breaker = tripped()
    probe = breaker.acquire(170.0)
    assert probe.probe
    assert breaker.record_failure(171.0, RETRY) is None
    assert breaker.state is State.HALF_OPEN and breaker.probes_in_flight == 1


def test_snapshot() -> None:
    breaker = tripped()
    snap = breaker.snapshot(130.0)
    assert snap == {
        "enabled": True,
        "state": "open",
        "consecutive_failures": 3,
        "failure_threshold": 3,
        "recovery_timeout": 60.0,
        "half_open_max_requests": 1,
        "probes_in_flight": 0,
        "opened_at": 100.0,
        "next_probe_at": 160.0,
        "last_failure": None,
        "retry_in": 30.0,
    }
    assert "retry_in" not in breaker.snapshot()
    closed = CircuitBreaker().snapshot()
    assert closed["state"] == "closed"
    assert closed["opened_at"] is None and closed["next_probe_at"] is None


def test_transition_str() -> None:
    text = str(Transition(State.CLOSED, State.OPEN, "5 consecutive failures"))
    assert text == "circuit closed -> open (5 consecutive failures)"
