"""Which upstream a request tries, and when it moves on to the next (``routing``).

Pure: the attempt loop asks :class:`Route` where to go and :func:`failover_cause`
whether a decision is one that retrying on the same upstream cannot fix soon.
The failover causes are the ones ``routing.failover_on`` names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .config import FailoverOn
from .decisions import Action, Decision

T = TypeVar("T")


def failover_cause(decision: Decision, failures_here: int, per_upstream: int) -> FailoverOn | None:
    """Why this decision may move the request on to another upstream, if it may.

    ``failures_here`` counts the retryable failures on the current upstream so
    far, this one included; ``per_upstream`` is ``routing.retries_per_upstream``.
    """
    if decision.action is Action.HARD_STOP:
        return "hard_stop"
    if decision.action is Action.RETRY:
        if decision.error_type in ("connection_error", "timeout"):
            return decision.error_type
        if decision.status == 404:
            return "model_not_found"
        if decision.error_type == "empty_response":
            return None  # a model refusing this prompt: its own budget, on the same upstream
        return "retries_exhausted" if failures_here >= per_upstream else None
    if decision.action is not Action.FAIL:
        return None
    if decision.error_type == "circuit_open":
        return "circuit_open"
    if decision.error_type == "no_key":  # a key pool with no key left: refused, or limited
        return "fail_code" if decision.status == 401 else "retries_exhausted"
    if decision.gave_up == "retry_after_too_long":
        return "retries_exhausted"
    if decision.gave_up is not None:
        # The request's own budgets (max_retries, the time budget) are spent: nowhere to go.
        return "empty_response" if decision.error_type == "empty_response" else None
    if decision.status == 404:
        return "model_not_found"
    return "fail_code"


@dataclass(eq=False)
class Route(Generic[T]):
    """The upstreams one request may use, in the order it tries them.

    After a retryable failure the request moves on round the list, starting
    again from the first once every one was tried (a new round, after the
    backoff delay). After a failure that is not retried it only moves on to
    upstreams it has not tried yet: a round of fail codes must not repeat.
    """

    order: Sequence[T]
    position: int = 0
    tried: set[int] = field(default_factory=set)

    @property
    def current(self) -> T:
        return self.order[self.position]

    def mark_tried(self) -> None:
        self.tried.add(self.position)

    def next_round(self) -> bool:
        """Move on, wrapping around; True when that started a new round."""
        self.position = (self.position + 1) % len(self.order)
        return self.position == 0

    def next_untried(self) -> bool:
        """Move on to an upstream not tried yet; False when there is none."""
        for step in range(1, len(self.order)):
            candidate = (self.position + step) % len(self.order)
            if candidate not in self.tried:
                self.position = candidate
                return True
        return False

    @property
    def alternatives(self) -> bool:
        return len(self.order) > 1


def start_order(items: Sequence[T], start: int) -> list[T]:
    """``items`` rotated to begin at ``start`` (round robin), order otherwise kept."""
    if not items:
        return []
    start %= len(items)
    return [*items[start:], *items[:start]]
