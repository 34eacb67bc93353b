"""routing: which upstream a request tries next, and what may move it on (pure, table-tested)."""

from __future__ import annotations

import pytest

from first_hop_proxy.decisions import (
    Action,
    Decision,
    History,
    Outcome,
    circuit_open,
    decide,
    no_key,
)
from first_hop_proxy.routing import Route, failover_cause, start_order

from .test_decisions import hard_stop_policy, make_policy


def judge(outcome: Outcome, **policy: object) -> Decision:
    return decide(outcome, History(), make_policy(policy or None), jitter=0.5, now=0.0)


EMPTY = '{"choices": [{"message": {"content": ""}, "finish_reason": "stop"}]}'


@pytest.mark.parametrize(
    ("decision", "failures", "expected"),
    [
        pytest.param(
            judge(Outcome(200, body='{"choices": [{"message": {"content": "hi"}}]}')),
            1,
            None,
            id="delivered",
        ),
        pytest.param(
            judge(Outcome(transport_error="connection_error")),
            1,
            "connection_error",
            id="refused-connection",
        ),
        pytest.param(judge(Outcome(transport_error="timeout")), 1, "timeout", id="timeout"),
        pytest.param(judge(Outcome(404)), 1, "model_not_found", id="404-conditional"),
        pytest.param(judge(Outcome(503)), 1, "retries_exhausted", id="503-at-the-limit"),
        pytest.param(judge(Outcome(503)), 0, None, id="503-below-the-limit"),
        pytest.param(judge(Outcome(200, body=EMPTY)), 5, None, id="empty-retried-in-place"),
        pytest.param(judge(Outcome(401)), 1, "fail_code", id="401"),
        pytest.param(judge(Outcome(500)), 1, "fail_code", id="500-unlisted"),
        pytest.param(
            judge(Outcome(429, headers={"retry-after": "999"})),
            1,
            "retries_exhausted",
            id="retry-after-too-long",
        ),
        pytest.param(judge(Outcome(503), max_retries=0), 1, None, id="budget-spent"),
        pytest.param(circuit_open(3.0, 5), 0, "circuit_open", id="breaker-open"),
        pytest.param(no_key("refused", 0.0, "all refused"), 0, "fail_code", id="keys-refused"),
        pytest.param(no_key("out", 3600.0, "all out"), 0, "retries_exhausted", id="keys-out"),
        pytest.param(
            no_key("cooling", 30.0, "all cooling"), 0, "retries_exhausted", id="keys-cooling"
        ),
        pytest.param(
            decide(Outcome(500, body="x FATAL y"), History(), hard_stop_policy()),
            0,
            "hard_stop",
            id="hard-stop",
        ),
    ],
)
def test_failover_cause(decision: Decision, failures: int, expected: str | None) -> None:
    assert failover_cause(decision, failures, 1) == expected


def test_empty_budget_spent_may_move_on() -> None:
    empty = judge(Outcome(200, body=EMPTY), empty_response={"max_retries": 0})
    assert (empty.action, failover_cause(empty, 0, 1)) == (Action.FAIL, "empty_response")


def test_route_rounds_and_untried() -> None:
    route = Route(["a", "b", "c"])
    route.mark_tried()
    assert route.next_round() is False and route.current == "b"
    route.mark_tried()
    assert route.next_untried() is True and route.current == "c"
    route.mark_tried()
    assert route.next_untried() is False and route.current == "c"
    assert route.next_round() is True and route.current == "a"
    assert Route(["only"]).alternatives is False
    assert start_order(["a", "b", "c"], 4) == ["b", "c", "a"]
    assert start_order([], 3) == []
