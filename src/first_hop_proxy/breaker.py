"""A circuit breaker per upstream: a small state machine with time passed in.

When the upstream keeps failing, every retry of every request only adds load to
something that is down and makes each person wait the whole retry budget. The
breaker notices a run of failed attempts, stops sending for a while (OPEN),
then lets a few probe attempts through (HALF_OPEN) to find out whether the
upstream is back.

No clock is read here: every method takes ``now`` (any monotonic seconds), so
tests drive it without sleeping. Every state change is returned to the caller
as a :class:`Transition` so it can be logged; nothing is kept in a list.

The breaker protects the *next* requests, not the one running: a request it
admitted keeps its whole retry budget (its retries carry :data:`RETRY`, which
the breaker never refuses), so a request is never stalled on, or cut short by,
a breaker its own failures opened. A retry that succeeds closes the breaker:
the upstream answered.

Contract for the caller: every attempt that :meth:`CircuitBreaker.acquire`
allowed ends with exactly one of :meth:`~CircuitBreaker.record_success`,
:meth:`~CircuitBreaker.record_failure` or :meth:`~CircuitBreaker.release`,
passing back the :class:`Permit`; otherwise a half-open probe slot stays taken
until it is presumed lost (after ``recovery_timeout``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from first_hop_proxy.config import CircuitBreaker as CircuitBreakerConfig


class State(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class Transition:
    """One state change, for the log: ``closed -> open (5 consecutive failures)``."""

    old: State
    new: State
    reason: str

    def __str__(self) -> str:
        return f"circuit {self.old} -> {self.new} ({self.reason})"


@dataclass(frozen=True, slots=True)
class Permit:
    """The answer to "may an attempt go out now?".

    Truthy when allowed. ``probe`` marks a half-open probe: its result decides
    whether the circuit closes or reopens. ``retry_in`` is how long a refused
    caller should wait before asking again. ``transition`` is set when asking
    moved the breaker (OPEN -> HALF_OPEN). ``generation`` tells a probe of the
    current half-open period from a late one of an earlier period. ``retry``
    marks a retry of a request the breaker already admitted.
    """

    allowed: bool
    probe: bool = False
    retry_in: float = 0.0
    transition: Transition | None = None
    generation: int = 0
    retry: bool = False

    def __bool__(self) -> bool:
        return self.allowed


_ALLOWED = Permit(True)
#: The permit of a retry: a request the breaker admitted is never refused later.
RETRY = Permit(True, retry=True)


class CircuitBreaker:
    """Consecutive-failure circuit breaker for one upstream."""

    __slots__ = (
        "_failures",
        "_generation",
        "_in_flight",
        "_last_failure",
        "_opened_at",
        "_probe_window_start",
        "_state",
        "enabled",
        "half_open_max",
        "recovery_timeout",
        "threshold",
    )

    def __init__(
        self,
        threshold: int = 5,
        recovery_timeout: float = 60.0,
        half_open_max: int = 1,
        *,
        enabled: bool = True,
    ) -> None:
        if threshold < 1:
            raise ValueError("threshold must be at least 1")
        if half_open_max < 1:
            raise ValueError("half_open_max must be at least 1")
        if recovery_timeout < 0:
            raise ValueError("recovery_timeout must not be negative")
        self.threshold = threshold
        self.recovery_timeout = float(recovery_timeout)
        self.half_open_max = half_open_max
        self.enabled = enabled
        self._state = State.CLOSED
        self._failures = 0
        self._opened_at: float | None = None
        self._in_flight = 0
        self._probe_window_start = 0.0
        self._generation = 0
        self._last_failure = ""

    @classmethod
    def from_config(cls, config: CircuitBreakerConfig) -> CircuitBreaker:
        """Build from the ``circuit_breaker`` config section."""
        return cls(
            config.failure_threshold,
            config.recovery_timeout,
            config.half_open_max_requests,
            enabled=config.enabled,
        )

    # -- read-only views -------------------------------------------------

    @property
    def state(self) -> State:
        """The stored state. An OPEN breaker whose timeout has passed turns
        HALF_OPEN on the next :meth:`acquire`, not by itself."""
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    @property
    def last_failure(self) -> str:
        """What the last failed attempt was (as the caller described it), for the person."""
        return self._last_failure

    @property
    def probes_in_flight(self) -> int:
        return self._in_flight

    @property
    def next_probe_at(self) -> float | None:
        """When OPEN: the time (on the caller's clock) the first probe may go."""
        if self._state is State.OPEN and self._opened_at is not None:
            return self._opened_at + self.recovery_timeout
        return None

    def retry_in(self, now: float) -> float:
        """Seconds until an attempt may go out (0: now). For ``Retry-After``."""
        if not self.enabled or self._state is State.CLOSED:
            return 0.0
        if self._state is State.OPEN:
            at = self.next_probe_at
            return 0.0 if at is None else max(at - now, 0.0)
        if self._in_flight < self.half_open_max:
            return 0.0
        return max(self._probe_window_start + self.recovery_timeout - now, 0.0)

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """The breaker's state for ``/health/detailed``."""
        data: dict[str, Any] = {
            "enabled": self.enabled,
            "state": str(self._state),
            "consecutive_failures": self._failures,
            "failure_threshold": self.threshold,
            "recovery_timeout": self.recovery_timeout,
            "half_open_max_requests": self.half_open_max,
            "probes_in_flight": self._in_flight,
            "opened_at": self._opened_at if self._state is not State.CLOSED else None,
            "next_probe_at": self.next_probe_at,
            "last_failure": self._last_failure or None,
        }
        if now is not None:
            data["retry_in"] = round(self.retry_in(now), 3)
        return data

    # -- the state machine -----------------------------------------------

    def acquire(self, now: float) -> Permit:
        """May a new attempt go out now? Takes a probe slot when HALF_OPEN."""
        if not self.enabled or self._state is State.CLOSED:
            return _ALLOWED
        transition = None
        if self._state is State.OPEN:
            at = self.next_probe_at
            if at is not None and now < at:
                return Permit(False, retry_in=at - now)
            transition = self._move(
                State.HALF_OPEN, f"recovery timeout of {self.recovery_timeout:g} s passed"
            )
            self._in_flight = 0
            self._probe_window_start = now
            self._generation += 1
        elif (
            self._in_flight >= self.half_open_max
            and now >= self._probe_window_start + self.recovery_timeout
        ):
            # The probes never reported back (a caller forgot its permit): do
            # not stay half-open forever; presume them lost and probe again.
            self._in_flight = 0
            self._probe_window_start = now
        if self._in_flight >= self.half_open_max:
            return Permit(False, retry_in=self.retry_in(now))
        self._in_flight += 1
        return Permit(True, probe=True, transition=transition, generation=self._generation)

    def record_success(self, now: float, permit: Permit | None = None) -> Transition | None:
        """An attempt got an answer from the upstream: resets the failure count;
        a successful probe, or retry, closes the circuit."""
        if not self.enabled:
            return None
        if self._state is State.CLOSED:
            self._failures = 0
            return None
        retried = permit is not None and permit.retry
        if retried or (self._state is State.HALF_OPEN and self._is_probe(permit)):
            self._failures = 0
            self._in_flight = 0
            self._opened_at = None
            return self._move(State.CLOSED, "a retry succeeded" if retried else "probe succeeded")
        # OPEN, or a result from before the circuit opened: stale, ignored.
        return None

    def record_failure(
        self, now: float, permit: Permit | None = None, reason: str = ""
    ) -> Transition | None:
        """An attempt failed (``reason``: how, for the person): counts towards opening;
        a failed probe reopens. A retry's failure while open changes nothing."""
        if not self.enabled:
            return None
        if reason:
            self._last_failure = reason
        if self._state is State.CLOSED:
            self._failures += 1
            if self._failures >= self.threshold:
                self._opened_at = now
                return self._move(State.OPEN, f"{self._failures} consecutive failures")
            return None
        if self._state is State.HALF_OPEN and self._is_probe(permit):
            self._failures += 1
            self._in_flight = 0
            self._opened_at = now
            return self._move(State.OPEN, "probe failed")
        return None

    def release(self, now: float, permit: Permit | None) -> None:
        """An allowed attempt ended without a verdict (the client went away):
        give its probe slot back."""
        if (
            self.enabled
            and self._state is State.HALF_OPEN
            and permit is not None
            and self._is_probe(permit)
            and self._in_flight > 0
        ):
            self._in_flight -= 1

    def _is_probe(self, permit: Permit | None) -> bool:
        if permit is not None and permit.retry:
            return False
        # Without a permit the caller has opted out of tracking: in HALF_OPEN
        # only probes go out, so take the result as a probe's.
        if permit is None:
            return True
        return permit.probe and permit.generation == self._generation

    def _move(self, new: State, reason: str) -> Transition:
        old, self._state = self._state, new
        return Transition(old, new, reason)
