"""The resilience rules: every rule, every precedence, every budget, as tables."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import orjson
import pytest

from first_hop_proxy.config import Config, HardStopRule, load_config
from first_hop_proxy.decisions import (
    MESSAGE_LIMIT,
    SCAN_LIMIT,
    Action,
    Decision,
    History,
    Outcome,
    Policy,
    Recategorized,
    circuit_open,
    decide,
    error_body,
    extract,
    parse_path,
    upstream_message,
)

from .conftest import LEGACY_CONFIG

NOW = 1_700_000_000.0


def make_policy(
    error_handling: dict[str, Any] | None = None, response_parsing: dict[str, Any] | None = None
) -> Policy:
    """A small, readable policy; overrides are merged one level deep."""
    eh: dict[str, Any] = {
        "retry_codes": [429, 502, 503, 504, 409, 418],
        "fail_codes": [400, 401, 403, 418],
        "conditional_retry_codes": [404, 409, 418],
        "max_retries": 3,
        "base_delay": 1,
        "max_delay": 60,
        "conditional_retry_max_attempts": 2,
        "conditional_retry_delay_multiplier": 0.5,
        "max_total_seconds": None,
        "hard_stop_conditions": {
            "rules": [{"pattern": "FATAL-[0-9]+", "user_message": "Stop!", "description": "fatal"}]
        },
        "empty_response": {"max_retries": 2},
    }
    rp: dict[str, Any] = {
        "status_recategorization": {
            "rules": [
                {"pattern": "The model is overloaded", "original_status": 200, "new_status": 429},
                {"pattern": "quota exceeded", "new_status": 429},
                {"pattern": "not really found", "original_status": 404, "new_status": 400},
                {"pattern": "^blocked_by_proxy$", "original_status": 200, "new_status": 503},
            ]
        },
        "json_extraction": {
            "paths": ["error.message", "proxy_note", "choices[0].finish_reason"],
        },
    }
    for base, extra in ((eh, error_handling), (rp, response_parsing)):
        for key, value in (extra or {}).items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
    config = Config.model_validate({"error_handling": eh, "response_parsing": rp})
    return Policy.from_config(config)


POLICY = make_policy()


def completion(content: Any = "Hello there.", finish: str | None = "stop", **message: Any) -> str:
    choice = {"index": 0, "message": {"role": "assistant", "content": content, **message}}
    choice["finish_reason"] = finish
    return orjson.dumps({"id": "c1", "object": "chat.completion", "choices": [choice]}).decode()


def error_json(message: str, **fields: Any) -> str:
    return orjson.dumps({"error": {"message": message, **fields}}).decode()


def run(
    outcome: Outcome,
    history: History | None = None,
    policy: Policy = POLICY,
    *,
    jitter: float = 0.5,
    now: float | None = NOW,
) -> Decision:
    return decide(outcome, history or History(), policy, jitter=jitter, now=now)


def play(outcomes: Sequence[Outcome], policy: Policy = POLICY) -> tuple[list[Decision], History]:
    """Run the forwarding loop's bookkeeping: the last outcome repeats."""
    history = History()
    decisions: list[Decision] = []
    for i in range(100):
        outcome = outcomes[min(i, len(outcomes) - 1)]
        decision = decide(outcome, history, policy, jitter=0.5, now=NOW)
        decisions.append(decision)
        if decision.action is not Action.RETRY:
            return decisions, history
        history = history.after(decision).at(history.elapsed + decision.delay)
    raise AssertionError("never stopped retrying")


OK = Outcome(200, body=completion())
HARD = "upstream crashed: FATAL-42 in handler"

# -- one attempt, every rule -------------------------------------------------

# (outcome, expected action, status, client_status, error_type, budget, counts_as_failure)
CASES = [
    # 1. client gone
    pytest.param(
        Outcome(503, client_gone=True),
        Action.ABANDON,
        503,
        499,
        None,
        None,
        False,
        id="client-gone",
    ),
    pytest.param(
        Outcome(None, client_gone=True, transport_error="timeout"),
        Action.ABANDON,
        499,
        499,
        None,
        None,
        False,
        id="client-gone-no-status",
    ),
    pytest.param(
        Outcome(200, body=HARD, client_gone=True),
        Action.ABANDON,
        200,
        499,
        None,
        None,
        False,
        id="client-gone-beats-hard-stop",
    ),
    # 2. hard stop
    pytest.param(
        Outcome(200, body=HARD),
        Action.HARD_STOP,
        502,
        502,
        "hard_stop_error",
        None,
        False,
        id="hard-stop-on-200",
    ),
    pytest.param(
        Outcome(500, body=HARD),
        Action.HARD_STOP,
        500,
        500,
        "hard_stop_error",
        None,
        False,
        id="hard-stop-keeps-error-status",
    ),
    pytest.param(
        Outcome(429, body=HARD),
        Action.HARD_STOP,
        429,
        503,
        "hard_stop_error",
        None,
        False,
        id="hard-stop-429-answers-503",
    ),
    pytest.param(
        Outcome(200, body="fatal-7"),
        Action.HARD_STOP,
        502,
        502,
        "hard_stop_error",
        None,
        False,
        id="hard-stop-case-insensitive",
    ),
    pytest.param(
        Outcome(200, stream=True, stream_error_event=error_json(HARD)),
        Action.HARD_STOP,
        502,
        502,
        "hard_stop_error",
        None,
        False,
        id="hard-stop-in-stream-event",
    ),
    pytest.param(
        Outcome(200, body="The model is overloaded. " + HARD),
        Action.HARD_STOP,
        502,
        502,
        "hard_stop_error",
        None,
        False,
        id="hard-stop-beats-recategorization",
    ),
    pytest.param(
        Outcome(400, body=HARD),
        Action.HARD_STOP,
        400,
        400,
        "hard_stop_error",
        None,
        False,
        id="hard-stop-beats-fail-code",
    ),
    pytest.param(
        Outcome(503, body=HARD),
        Action.HARD_STOP,
        503,
        503,
        "hard_stop_error",
        None,
        False,
        id="hard-stop-beats-retry-code",
    ),
    pytest.param(
        Outcome(None, body="FATAL-1", transport_error="cut_short"),
        Action.HARD_STOP,
        502,
        502,
        "hard_stop_error",
        None,
        False,
        id="hard-stop-in-partial-body",
    ),
    # 3. recategorization, flowing into the later rules
    pytest.param(
        Outcome(200, body=error_json("The model is overloaded.")),
        Action.RETRY,
        429,
        429,
        "rate_limited",
        "retry",
        True,
        id="recat-200-overloaded-to-429",
    ),
    pytest.param(
        Outcome(
            200,
            body=orjson.dumps({"choices": [], "proxy_note": "the MODEL is Overloaded"}).decode(),
        ),
        Action.RETRY,
        429,
        429,
        "rate_limited",
        "retry",
        True,
        id="recat-beats-empty",
    ),
    pytest.param(
        Outcome(500, body="Quota Exceeded for today"),
        Action.RETRY,
        429,
        429,
        "rate_limited",
        "retry",
        True,
        id="recat-any-status-500",
    ),
    pytest.param(
        Outcome(200, body=error_json("quota exceeded")),
        Action.RETRY,
        429,
        429,
        "rate_limited",
        "retry",
        True,
        id="recat-any-status-200",
    ),
    pytest.param(
        Outcome(404, body="it is not really found"),
        Action.FAIL,
        400,
        400,
        "upstream_error",
        None,
        False,
        id="recat-into-fail-code",
    ),
    pytest.param(
        Outcome(503, body="The model is overloaded"),
        Action.RETRY,
        503,
        503,
        "upstream_error",
        "retry",
        True,
        id="recat-original-status-differs",
    ),
    pytest.param(
        Outcome(200, body=completion("Hi", finish="blocked_by_proxy")),
        Action.RETRY,
        503,
        503,
        "upstream_error",
        "retry",
        True,
        id="recat-via-finish-reason-path",
    ),
    pytest.param(
        Outcome(200, stream=True, stream_error_event=error_json("The model is overloaded")),
        Action.RETRY,
        429,
        429,
        "rate_limited",
        "retry",
        True,
        id="recat-stream-error-event",
    ),
    pytest.param(
        Outcome(
            200, stream=True, first_content=True, body='{"proxy_note":"The model is overloaded"}'
        ),
        Action.RETRY,
        429,
        429,
        "rate_limited",
        "retry",
        True,
        id="recat-stream-early-payload",
    ),
    # 4. in-band errors and empty replies on a 2xx
    pytest.param(
        Outcome(200, body=error_json("boom")),
        Action.RETRY,
        502,
        502,
        "upstream_error",
        "retry",
        True,
        id="inband-error-no-code-is-502",
    ),
    pytest.param(
        Outcome(200, body=error_json("slow down", code="429")),
        Action.RETRY,
        429,
        429,
        "rate_limited",
        "retry",
        True,
        id="inband-error-string-code",
    ),
    pytest.param(
        Outcome(200, body=error_json("bad key", code=401)),
        Action.FAIL,
        401,
        401,
        "upstream_error",
        None,
        False,
        id="inband-error-fail-code",
    ),
    pytest.param(
        Outcome(200, body=error_json("odd", code="model_not_found", status=True)),
        Action.RETRY,
        502,
        502,
        "upstream_error",
        "retry",
        True,
        id="inband-error-junk-code",
    ),
    pytest.param(
        Outcome(200, body=orjson.dumps({"object": "chat.completion", "choices": []}).decode()),
        Action.RETRY,
        502,
        502,
        "empty_response",
        "empty",
        False,
        id="empty-no-choices",
    ),
    pytest.param(
        Outcome(200, body='{"id": "x"}'),
        Action.RETRY,
        502,
        502,
        "empty_response",
        "empty",
        False,
        id="empty-choices-missing",
    ),
    pytest.param(
        Outcome(200, body=completion("  \n ")),
        Action.RETRY,
        502,
        502,
        "empty_response",
        "empty",
        False,
        id="empty-whitespace-content",
    ),
    pytest.param(
        Outcome(200, body=completion(None)),
        Action.RETRY,
        502,
        502,
        "empty_response",
        "empty",
        False,
        id="empty-null-content",
    ),
    pytest.param(
        Outcome(200, body=completion([{"type": "text", "text": " "}])),
        Action.RETRY,
        502,
        502,
        "empty_response",
        "empty",
        False,
        id="empty-blank-text-parts",
    ),
    pytest.param(
        Outcome(200, body=completion([{"type": "text", "text": "Hi"}])),
        Action.DELIVER,
        200,
        200,
        None,
        None,
        False,
        id="text-parts-deliver",
    ),
    pytest.param(
        Outcome(200, body=completion(None, tool_calls=[{"id": "t", "type": "function"}])),
        Action.DELIVER,
        200,
        200,
        None,
        None,
        False,
        id="tool-calls-deliver",
    ),
    pytest.param(
        Outcome(200, body=completion("", function_call={"name": "f", "arguments": "{}"})),
        Action.DELIVER,
        200,
        200,
        None,
        None,
        False,
        id="function-call-deliver",
    ),
    pytest.param(
        Outcome(200, body=completion("partial", finish="SAFETY")),
        Action.RETRY,
        502,
        502,
        "empty_response",
        "empty",
        False,
        id="empty-finish-reason-safety",
    ),
    pytest.param(
        Outcome(200, body=completion("partial", finish="recitation")),
        Action.RETRY,
        502,
        502,
        "empty_response",
        "empty",
        False,
        id="empty-finish-reason-nocase",
    ),
    pytest.param(
        Outcome(200, body=completion("done", finish="length")),
        Action.DELIVER,
        200,
        200,
        None,
        None,
        False,
        id="finish-length-delivers",
    ),
    pytest.param(
        Outcome(200, body=""),
        Action.RETRY,
        502,
        502,
        "empty_response",
        "empty",
        False,
        id="empty-body",
    ),
    pytest.param(
        Outcome(200, body='"just a string"'),
        Action.RETRY,
        502,
        502,
        "empty_response",
        "empty",
        False,
        id="json-but-not-an-object",
    ),
    pytest.param(
        Outcome(200, stream=True),
        Action.RETRY,
        502,
        502,
        "empty_response",
        "empty",
        False,
        id="stream-ended-empty",
    ),
    pytest.param(
        Outcome(
            200,
            stream=True,
            first_content=True,
            body='{"choices":[{"delta":{"role":"assistant"}}]}',
        ),
        Action.DELIVER,
        200,
        200,
        None,
        None,
        False,
        id="stream-with-content",
    ),
    pytest.param(
        Outcome(200, stream=True, stream_error_event=error_json("busy", code=503)),
        Action.RETRY,
        503,
        503,
        "upstream_error",
        "retry",
        True,
        id="stream-error-event-code",
    ),
    pytest.param(
        Outcome(200, stream=True, stream_error_event=error_json("busy")),
        Action.RETRY,
        502,
        502,
        "upstream_error",
        "retry",
        True,
        id="stream-error-event-no-code",
    ),
    pytest.param(
        Outcome(200, stream=True, stream_error_event=error_json("no", code=403)),
        Action.FAIL,
        403,
        403,
        "upstream_error",
        None,
        False,
        id="stream-error-event-fail-code",
    ),
    pytest.param(
        Outcome(200, stream=True, stream_error_event="not json at all"),
        Action.RETRY,
        502,
        502,
        "upstream_error",
        "retry",
        True,
        id="stream-error-event-not-json",
    ),
    pytest.param(
        Outcome(503, stream=True, body=error_json("down")),
        Action.RETRY,
        503,
        503,
        "upstream_error",
        "retry",
        True,
        id="stream-request-503",
    ),
    # 5-7. status lists and their precedence
    pytest.param(
        Outcome(400, body=error_json("bad")),
        Action.FAIL,
        400,
        400,
        "upstream_error",
        None,
        False,
        id="fail-code",
    ),
    pytest.param(
        Outcome(418),
        Action.FAIL,
        418,
        418,
        "upstream_error",
        None,
        False,
        id="fail-beats-retry-and-conditional",
    ),
    pytest.param(
        Outcome(409),
        Action.RETRY,
        409,
        409,
        "upstream_error",
        "retry",
        True,
        id="retry-beats-conditional",
    ),
    pytest.param(
        Outcome(503),
        Action.RETRY,
        503,
        503,
        "upstream_error",
        "retry",
        True,
        id="retry-code",
    ),
    pytest.param(
        Outcome(429),
        Action.RETRY,
        429,
        429,
        "rate_limited",
        "retry",
        True,
        id="retry-429",
    ),
    pytest.param(
        Outcome(404),
        Action.RETRY,
        404,
        404,
        "upstream_error",
        "conditional",
        False,
        id="conditional-code",
    ),
    # 8. transport failures
    pytest.param(
        Outcome(None, transport_error="timeout", transport_message="read timed out"),
        Action.RETRY,
        504,
        504,
        "timeout",
        "retry",
        True,
        id="timeout",
    ),
    pytest.param(
        Outcome(None, transport_error="connection_error", transport_message="refused"),
        Action.RETRY,
        502,
        502,
        "connection_error",
        "retry",
        True,
        id="connection-error",
    ),
    pytest.param(
        Outcome(200, stream=True, transport_error="cut_short"),
        Action.RETRY,
        502,
        502,
        "connection_error",
        "retry",
        True,
        id="stream-cut-short",
    ),
    pytest.param(
        Outcome(200, stream=True, transport_error="timeout"),
        Action.RETRY,
        504,
        504,
        "timeout",
        "retry",
        True,
        id="stream-stalled",
    ),
    pytest.param(
        Outcome(200, body="{not json", transport_error="invalid_json"),
        Action.RETRY,
        502,
        502,
        "connection_error",
        "retry",
        True,
        id="invalid-json-flagged",
    ),
    pytest.param(
        Outcome(200, body="<html>oops</html>"),
        Action.RETRY,
        502,
        502,
        "connection_error",
        "retry",
        True,
        id="invalid-json-detected",
    ),
    pytest.param(
        Outcome(None),
        Action.RETRY,
        502,
        502,
        "connection_error",
        "retry",
        True,
        id="no-status-no-error",
    ),
    pytest.param(
        Outcome(503, body="Service Unavail", transport_error="cut_short"),
        Action.RETRY,
        503,
        503,
        "upstream_error",
        "retry",
        True,
        id="status-wins-over-cut-body",
    ),
    pytest.param(
        Outcome(401, transport_error="timeout"),
        Action.FAIL,
        401,
        401,
        "upstream_error",
        None,
        False,
        id="fail-status-wins-over-timeout",
    ),
    # 9. everything else
    pytest.param(
        Outcome(500, body="oops"),
        Action.FAIL,
        500,
        500,
        "upstream_error",
        None,
        True,
        id="unlisted-5xx-fails-and-counts",
    ),
    pytest.param(
        Outcome(422, body="nope"),
        Action.FAIL,
        422,
        422,
        "upstream_error",
        None,
        False,
        id="unlisted-4xx-fails",
    ),
    pytest.param(
        Outcome(302),
        Action.FAIL,
        302,
        502,
        "upstream_error",
        None,
        False,
        id="redirect-answers-502",
    ),
    pytest.param(OK, Action.DELIVER, 200, 200, None, None, False, id="good-reply"),
    pytest.param(
        Outcome(201, body=completion()),
        Action.DELIVER,
        201,
        201,
        None,
        None,
        False,
        id="other-2xx-delivers",
    ),
]


@pytest.mark.parametrize(
    ("outcome", "action", "status", "client_status", "error_type", "budget", "failure"), CASES
)
def test_rules(
    outcome: Outcome,
    action: Action,
    status: int,
    client_status: int,
    error_type: str | None,
    budget: str | None,
    failure: bool,
) -> None:
    d = run(outcome)
    assert (d.action, d.status, d.client_status, d.error_type, d.budget, d.counts_as_failure) == (
        action,
        status,
        client_status,
        error_type,
        budget,
        failure,
    ), d.reason
    assert d.reason
    assert d.upstream_status == outcome.status
    assert d.counts_as_success is (action is not Action.ABANDON and not failure)
    if action is not Action.RETRY:
        assert d.delay == 0.0
    else:
        assert d.delay > 0


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        pytest.param(
            Outcome(200, body=error_json("The model is overloaded")),
            Recategorized(200, 429, "The model is overloaded"),
            id="specific-status",
        ),
        pytest.param(
            Outcome(502, body="QUOTA EXCEEDED"),
            Recategorized(502, 429, "quota exceeded"),
            id="any-status",
        ),
        pytest.param(
            Outcome(200, body=completion("x", finish="blocked_by_proxy")),
            Recategorized(200, 503, "^blocked_by_proxy$"),
            id="json-path",
        ),
        pytest.param(Outcome(503, body="The model is overloaded"), None, id="none"),
        pytest.param(OK, None, id="good-reply"),
    ],
)
def test_recategorization_is_recorded(outcome: Outcome, expected: Recategorized | None) -> None:
    d = run(outcome)
    if expected is None:
        assert d.recategorized is None
    else:
        assert d.recategorized == expected
        assert d.recategorized is not None
        old, new, pattern = d.recategorized
        assert d.status == new and d.upstream_status == old and pattern


@pytest.mark.parametrize(
    ("policy", "outcome", "action", "status"),
    [
        pytest.param(
            make_policy({"hard_stop_conditions": {"enabled": False}}),
            Outcome(200, body=completion(HARD)),
            Action.DELIVER,
            200,
            id="hard-stop-disabled",
        ),
        pytest.param(
            make_policy(response_parsing={"enabled": False}),
            Outcome(200, body=error_json("The model is overloaded")),
            Action.RETRY,
            502,
            id="response-parsing-disabled",
        ),
        pytest.param(
            make_policy(response_parsing={"status_recategorization": {"enabled": False}}),
            Outcome(500, body="quota exceeded"),
            Action.FAIL,
            500,
            id="recategorization-disabled",
        ),
        pytest.param(
            make_policy(response_parsing={"json_extraction": {"enabled": False}}),
            Outcome(200, body=completion("Hi", finish="blocked_by_proxy")),
            Action.DELIVER,
            200,
            id="json-extraction-disabled",
        ),
        pytest.param(
            make_policy({"empty_response": {"enabled": False}}),
            Outcome(200, body=completion("")),
            Action.DELIVER,
            200,
            id="empty-rule-disabled",
        ),
        pytest.param(
            make_policy({"empty_response": {"finish_reasons": []}}),
            Outcome(200, body=completion("partial", finish="SAFETY")),
            Action.DELIVER,
            200,
            id="no-empty-finish-reasons",
        ),
        pytest.param(
            make_policy({"conditional_retry_enabled": False}),
            Outcome(404),
            Action.FAIL,
            404,
            id="conditional-disabled",
        ),
        pytest.param(
            make_policy({"retry_codes": [], "fail_codes": []}),
            Outcome(503),
            Action.FAIL,
            503,
            id="empty-code-lists",
        ),
    ],
)
def test_switches(policy: Policy, outcome: Outcome, action: Action, status: int) -> None:
    d = run(outcome, policy=policy)
    assert (d.action, d.status) == (action, status), d.reason


def test_json_passed_in_is_not_parsed_again() -> None:
    # The body is deliberately not JSON: only the parsed value may be looked at.
    parsed = orjson.loads(completion("from the parsed value"))
    d = run(Outcome(200, body="<<unparseable>>", json=parsed))
    assert d.action is Action.DELIVER


def test_passed_in_json_feeds_recategorization() -> None:
    parsed = {"error": {"message": "The model is overloaded"}}
    d = run(Outcome(200, body="", json=parsed))
    assert (d.action, d.status) == (Action.RETRY, 429)


def test_invalid_json_message_shows_the_body() -> None:
    d = run(Outcome(200, body="<html><title>Gateway hiccup</title></html>"))
    assert d.upstream_message == "the reply body is not valid JSON: Gateway hiccup"


def test_patterns_scan_only_the_head_of_long_texts() -> None:
    long_reply = completion("x" * SCAN_LIMIT + " The model is overloaded FATAL-1")
    assert run(Outcome(200, body=long_reply)).action is Action.DELIVER
    short_reply = completion("The model is overloaded " + "x" * SCAN_LIMIT)
    assert run(Outcome(200, body=short_reply)).status == 429


def test_backtracking_pattern_on_a_long_reply_stays_cheap() -> None:
    import time

    policy = make_policy(
        response_parsing={
            "status_recategorization": {
                "rules": [{"pattern": "model.*capacity", "original_status": 200, "new_status": 429}]
            },
            "json_extraction": {"paths": ["choices[0].message.content"]},
        }
    )
    outcome = Outcome(200, body=completion("the model said " * 10_000))
    started = time.perf_counter()
    assert run(outcome, policy=policy).action is Action.DELIVER
    assert time.perf_counter() - started < 0.5


def test_hard_stop_decision_carries_rule_and_original() -> None:
    d = run(Outcome(500, body=HARD))
    assert d.hard_stop_rule is not None and d.hard_stop_rule.pattern == "FATAL-[0-9]+"
    assert d.original_response == HARD
    event = error_json(HARD)
    d = run(Outcome(200, stream=True, stream_error_event=event))
    assert d.original_response == event


def test_empty_records_finish_reason() -> None:
    assert run(Outcome(200, body=completion("", finish="OTHER"))).finish_reason == "OTHER"
    stream = Outcome(200, stream=True, finish_reason="SAFETY")
    d = run(stream)
    assert (d.finish_reason, d.count, d.upstream_message) == ("SAFETY", 1, "")


# -- budgets, played out ---------------------------------------------------


def test_retry_budget_exactly_max_retries() -> None:
    decisions, history = play([Outcome(503, body=error_json("overloaded"))])
    assert [d.action for d in decisions] == [Action.RETRY] * 3 + [Action.FAIL]
    assert history.attempts == 4 and history.retries == 3
    final = decisions[-1]
    assert (final.gave_up, final.error_type, final.client_status) == (
        "retries_exhausted",
        "upstream_error",
        503,
    )
    assert final.counts_as_failure


def test_429_exhausted_answers_configured_status() -> None:
    decisions, _ = play([Outcome(429, body=error_json("Too many"))])
    final = decisions[-1]
    assert (final.action, final.status, final.client_status, final.error_type) == (
        Action.FAIL,
        429,
        503,
        "rate_limited",
    )
    policy = make_policy({"exhausted_429_status": 529})
    final = play([Outcome(429)], policy)[0][-1]
    assert (final.status, final.client_status) == (429, 529)


def test_429_in_fail_codes_still_answers_replacement() -> None:
    policy = make_policy({"fail_codes": [429], "retry_codes": []})
    d = run(Outcome(429), policy=policy)
    assert (d.action, d.status, d.client_status, d.error_type) == (
        Action.FAIL,
        429,
        503,
        "rate_limited",
    )


@pytest.mark.parametrize(
    ("max_attempts", "calls"),
    [
        pytest.param(2, 3, id="default-2-is-3-calls"),
        pytest.param(0, 1, id="zero"),
        pytest.param(5, 6, id="five"),
    ],
)
def test_conditional_budget(max_attempts: int, calls: int) -> None:
    policy = make_policy({"conditional_retry_max_attempts": max_attempts})
    decisions, history = play([Outcome(404, body="missing")], policy)
    assert len(decisions) == calls
    assert history.conditional_retries == calls - 1 and history.retries == 0
    assert decisions[-1].action is Action.FAIL
    if calls > 1:
        assert decisions[-1].gave_up == "retries_exhausted"


@pytest.mark.parametrize(
    ("max_retries", "deliver_last", "final"),
    [
        pytest.param(2, False, Action.FAIL, id="fail-after-3"),
        pytest.param(0, False, Action.FAIL, id="no-retries"),
        pytest.param(2, True, Action.DELIVER, id="deliver-last"),
    ],
)
def test_empty_budget(max_retries: int, deliver_last: bool, final: Action) -> None:
    policy = make_policy(
        {"empty_response": {"max_retries": max_retries, "deliver_last": deliver_last}}
    )
    decisions, history = play([Outcome(200, body=completion("", finish="SAFETY"))], policy)
    assert len(decisions) == max_retries + 1
    assert history.empty_retries == max_retries and history.retries == 0
    last = decisions[-1]
    assert last.action is final
    if final is Action.FAIL:
        assert (last.status, last.client_status, last.error_type, last.count) == (
            502,
            502,
            "empty_response",
            max_retries + 1,
        )
        assert last.finish_reason == "SAFETY"
        assert not last.counts_as_failure


def test_transport_budget() -> None:
    decisions, _ = play([Outcome(None, transport_error="timeout", transport_message="30 s")])
    assert [d.action for d in decisions] == [Action.RETRY] * 3 + [Action.FAIL]
    assert (decisions[-1].status, decisions[-1].error_type) == (504, "timeout")
    assert decisions[-1].upstream_message == "30 s"


def test_zero_max_retries_fails_at_once() -> None:
    decisions, _ = play([Outcome(503)], make_policy({"max_retries": 0}))
    assert [d.action for d in decisions] == [Action.FAIL]


def test_budgets_are_separate() -> None:
    empty = Outcome(200, body=completion(""))
    busy = Outcome(503)
    missing = Outcome(404)
    decisions, history = play([empty, busy, missing, empty, busy, missing, OK])
    assert [d.budget for d in decisions[:-1]] == [
        "empty",
        "retry",
        "conditional",
        "empty",
        "retry",
        "conditional",
    ]
    assert decisions[-1].action is Action.DELIVER
    assert (history.attempts, history.retries, history.conditional_retries) == (7, 2, 2)
    assert history.empty_retries == 2


def test_success_after_retries_delivers() -> None:
    decisions, history = play([Outcome(502), Outcome(None, transport_error="timeout"), OK])
    assert [d.action for d in decisions] == [Action.RETRY, Action.RETRY, Action.DELIVER]
    assert history.retries == 2


# -- delays ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "history", "jitter", "delay"),
    [
        pytest.param(Outcome(503), History(), 0.5, 1.0, id="retry-1"),
        pytest.param(Outcome(503), History(retries=1), 0.5, 2.0, id="retry-2"),
        pytest.param(Outcome(503), History(retries=2), 0.5, 4.0, id="retry-3"),
        pytest.param(Outcome(503), History(retries=2), 0.0, 3.0, id="retry-3-low-jitter"),
        pytest.param(Outcome(503), History(retries=2), 1.0, 5.0, id="retry-3-high-jitter"),
        pytest.param(Outcome(404), History(), 0.5, 0.5, id="conditional-1-halved"),
        pytest.param(Outcome(404), History(conditional_retries=1), 0.5, 1.0, id="conditional-2"),
        pytest.param(Outcome(200, body=""), History(), 0.5, 1.0, id="empty-1"),
        pytest.param(Outcome(200, body=""), History(empty_retries=1), 0.5, 2.0, id="empty-2"),
        pytest.param(
            Outcome(None, transport_error="timeout"), History(retries=1), 0.5, 2.0, id="transport-2"
        ),
    ],
)
def test_delays(outcome: Outcome, history: History, jitter: float, delay: float) -> None:
    d = run(outcome, history, jitter=jitter)
    assert d.action is Action.RETRY
    assert d.delay == pytest.approx(delay)


def test_delay_capped_by_max_delay() -> None:
    policy = make_policy({"max_retries": 20, "max_delay": 5})
    d = run(Outcome(503), History(retries=10), policy, jitter=1.0)
    assert d.delay == 5.0


def test_history_after_and_at() -> None:
    d = run(Outcome(404))
    h = History(elapsed=3.0).after(d)
    assert (h.attempts, h.conditional_retries, h.last_delay, h.elapsed) == (2, 1, d.delay, 3.0)
    assert h.at(9.5).elapsed == 9.5


# -- Retry-After -----------------------------------------------------------


def http_date(offset: float) -> str:
    return format_datetime(datetime.fromtimestamp(NOW + offset, UTC), usegmt=True)


@pytest.mark.parametrize(
    ("outcome", "now", "action", "delay", "retry_after", "gave_up"),
    [
        pytest.param(
            Outcome(503, {"retry-after": "5"}),
            NOW,
            Action.RETRY,
            5.0,
            5.0,
            None,
            id="seconds-obeyed",
        ),
        pytest.param(
            Outcome(429, {"retry-after": "0"}), NOW, Action.RETRY, 0.0, 0.0, None, id="zero-obeyed"
        ),
        pytest.param(
            Outcome(429, {"retry-after": http_date(30)}),
            NOW,
            Action.RETRY,
            30.0,
            30.0,
            None,
            id="http-date",
        ),
        pytest.param(
            Outcome(429, {"retry-after": http_date(30)}),
            None,
            Action.RETRY,
            1.0,
            None,
            None,
            id="http-date-without-clock-ignored",
        ),
        pytest.param(
            Outcome(503, {"retry-after": "soon"}),
            NOW,
            Action.RETRY,
            1.0,
            None,
            None,
            id="garbage-falls-back-to-backoff",
        ),
        pytest.param(
            Outcome(503, {"retry-after": "60"}),
            NOW,
            Action.RETRY,
            60.0,
            60.0,
            None,
            id="equal-to-max-delay-obeyed",
        ),
        pytest.param(
            Outcome(429, {"retry-after": "120"}),
            NOW,
            Action.FAIL,
            0.0,
            120.0,
            "retry_after_too_long",
            id="too-long-fails-at-once",
        ),
        pytest.param(
            Outcome(404, {"retry-after": "3"}),
            NOW,
            Action.RETRY,
            3.0,
            3.0,
            None,
            id="conditional-obeys-unscaled",
        ),
        pytest.param(
            Outcome(401, {"retry-after": "3"}),
            NOW,
            Action.FAIL,
            0.0,
            3.0,
            None,
            id="exposed-on-fail-code",
        ),
        pytest.param(
            Outcome(200, {"retry-after": "3"}, body=completion()),
            NOW,
            Action.DELIVER,
            0.0,
            None,
            None,
            id="ignored-on-delivery",
        ),
    ],
)
def test_retry_after(
    outcome: Outcome,
    now: float | None,
    action: Action,
    delay: float,
    retry_after: float | None,
    gave_up: str | None,
) -> None:
    d = run(outcome, now=now)
    assert (d.action, d.gave_up) == (action, gave_up), d.reason
    assert d.delay == pytest.approx(delay, abs=1.0)
    if retry_after is None:
        assert d.retry_after is None
    else:
        assert d.retry_after == pytest.approx(retry_after, abs=1.0)


def test_retry_after_too_long_on_429_answers_503() -> None:
    d = run(Outcome(429, {"retry-after": "3600"}))
    assert (d.client_status, d.error_type, d.retry_after) == (503, "rate_limited", 3600.0)


def test_retry_after_on_exhausted_is_kept() -> None:
    d = run(Outcome(503, {"retry-after": "7"}), History(retries=3))
    assert (d.action, d.gave_up, d.retry_after) == (Action.FAIL, "retries_exhausted", 7.0)


# -- max_total_seconds -----------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "elapsed", "action"),
    [
        pytest.param(Outcome(503), 8.0, Action.RETRY, id="fits"),
        pytest.param(Outcome(503), 9.0, Action.RETRY, id="exactly-at-limit"),
        pytest.param(Outcome(503), 9.5, Action.FAIL, id="would-pass"),
        pytest.param(Outcome(503, {"retry-after": "5"}), 6.0, Action.FAIL, id="retry-after-passes"),
        pytest.param(Outcome(404), 9.5, Action.RETRY, id="conditional-shorter-delay-fits"),
        pytest.param(Outcome(404), 9.6, Action.FAIL, id="conditional-passes"),
        pytest.param(Outcome(None, transport_error="timeout"), 9.5, Action.FAIL, id="transport"),
        pytest.param(Outcome(200, body=""), 9.5, Action.FAIL, id="empty"),
    ],
)
def test_max_total_seconds(outcome: Outcome, elapsed: float, action: Action) -> None:
    policy = make_policy({"max_total_seconds": 10})
    d = run(outcome, History(elapsed=elapsed), policy)
    assert d.action is action, d.reason
    if action is Action.FAIL:
        assert d.gave_up == "time_budget"
        assert "max_total_seconds" in d.reason


def test_without_max_total_seconds_time_is_no_limit() -> None:
    d = run(Outcome(503), History(elapsed=1e9))
    assert d.action is Action.RETRY


# -- the upstream's own message -------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            error_json("The model is overloaded."), "The model is overloaded.", id="error-message"
        ),
        pytest.param('{"error": "plain string"}', "plain string", id="error-string"),
        pytest.param('{"detail": "Not Found"}', "Not Found", id="detail"),
        pytest.param('{"message": "went wrong"}', "went wrong", id="message"),
        pytest.param(
            "<html><head><title>502 Bad Gateway</title></head><body>x</body></html>",
            "502 Bad Gateway",
            id="html-title",
        ),
        pytest.param(
            "<html><body><h1>Oops</h1>  broke</body></html>", "Oops broke", id="html-no-title"
        ),
        pytest.param(
            "<html><title>Bad Gateway &amp; Co &#8212; &quot;edge&quot;&nbsp;&lt;3</title></html>",
            'Bad Gateway & Co — "edge" <3',
            id="html-title-entities",
        ),
        pytest.param("<p>Tom &amp; Jerry&#39;s</p>", "Tom & Jerry's", id="html-entities-no-title"),
        pytest.param("plain\n\ntext   here", "plain text here", id="text-collapsed"),
        pytest.param("", "", id="empty"),
    ],
)
def test_upstream_message(body: str, expected: str) -> None:
    doc = orjson.loads(body) if body.startswith("{") else None
    assert upstream_message(doc, body) == expected


def test_upstream_message_trimmed() -> None:
    message = upstream_message(None, "x" * 5000)
    assert len(message) <= MESSAGE_LIMIT and message.endswith("…")


def test_decision_carries_upstream_message() -> None:
    assert run(Outcome(503, body=error_json("busy"))).upstream_message == "busy"
    assert (
        run(Outcome(200, stream=True, stream_error_event=error_json("ev"))).upstream_message == "ev"
    )
    conn = Outcome(None, transport_error="connection_error", transport_message="Connection refused")
    assert run(conn).upstream_message == "Connection refused"
    assert run(OK).upstream_message == ""


# -- JSON paths ----------------------------------------------------------------

DOC = {
    "error": {"message": "boom", "code": 503},
    "proxy_note": "note",
    "choices": [
        {"finish_reason": "stop", "message": {"content": "Hi", "parts": [[1, 2], [3]]}},
        {"finish_reason": "length"},
    ],
    "flag": False,
}


@pytest.mark.parametrize(
    ("path", "parts", "value"),
    [
        pytest.param("error.message", ("error", "message"), "boom", id="dotted"),
        pytest.param("proxy_note", ("proxy_note",), "note", id="top-level"),
        pytest.param(
            "choices[0].finish_reason", ("choices", 0, "finish_reason"), "stop", id="index"
        ),
        pytest.param(
            "choices[0].message.content", ("choices", 0, "message", "content"), "Hi", id="deep"
        ),
        pytest.param(
            "choices[1].finish_reason", ("choices", 1, "finish_reason"), "length", id="second"
        ),
        pytest.param(
            "choices[-1].finish_reason",
            ("choices", -1, "finish_reason"),
            "length",
            id="negative-index",
        ),
        pytest.param(
            "choices[0].message.parts[0][1]",
            ("choices", 0, "message", "parts", 0, 1),
            2,
            id="double-index",
        ),
        pytest.param(
            "choices[5].finish_reason",
            ("choices", 5, "finish_reason"),
            None,
            id="index-out-of-range",
        ),
        pytest.param("error[0]", ("error", 0), None, id="index-into-object"),
        pytest.param("proxy_note.x", ("proxy_note", "x"), None, id="key-into-string"),
        pytest.param("missing.key", ("missing", "key"), None, id="missing"),
        pytest.param("error.code", ("error", "code"), 503, id="number"),
        pytest.param("flag", ("flag",), False, id="false-is-a-value"),
        pytest.param("a[x]", ("a[x]",), None, id="odd-segment-is-literal"),
    ],
)
def test_extract(path: str, parts: tuple[str | int, ...], value: Any) -> None:
    assert parse_path(path) == parts
    assert extract(DOC, path) == value
    assert extract(DOC, parts) == value


def test_extract_from_non_container() -> None:
    assert extract("text", "a") is None
    assert extract(None, "choices[0]") is None
    assert extract([1, 2], "[1]") == 2


# -- the client's error body -------------------------------------------------


def test_error_body_exhausted_retry_code() -> None:
    d = play(
        [Outcome(503, body=error_json("The model is overloaded."))],
        make_policy({"max_retries": 10}),
    )[0][-1]
    body = error_body(d, 11, 42.1)
    assert body == {
        "error": {
            "message": "The upstream kept answering 503 Service Unavailable: gave up after "
            "11 attempts over 42.1 s. Upstream said: The model is overloaded.",
            "type": "upstream_error",
            "code": "retries_exhausted",
            "attempts": 11,
        }
    }


def test_error_body_rate_limited_with_retry_after() -> None:
    d = run(Outcome(429, {"retry-after": "2.2"}, body=error_json("Slow down")), History(retries=3))
    body = error_body(d, 4, 9.0)["error"]
    assert body["type"] == "rate_limited"
    assert body["code"] == "retries_exhausted"
    assert body["retry_after"] == 3
    assert body["message"].startswith("The upstream kept answering 429 Too Many Requests")
    assert body["message"].endswith("Upstream said: Slow down")


@pytest.mark.parametrize(
    ("decision", "attempts", "elapsed", "message", "error_type", "code"),
    [
        pytest.param(
            run(Outcome(401, body=error_json("Invalid API key"))),
            1,
            0.4,
            "The upstream answered 401 Unauthorized. Upstream said: Invalid API key",
            "upstream_error",
            "upstream_401",
            id="fail-code-first-attempt",
        ),
        pytest.param(
            run(Outcome(400, body="bad")),
            3,
            5.0,
            "The upstream answered 400 Bad Request (after 3 attempts over 5.0 s). "
            "Upstream said: bad",
            "upstream_error",
            "upstream_400",
            id="fail-code-after-retries",
        ),
        pytest.param(
            run(Outcome(599)),
            1,
            0.1,
            "The upstream answered 599.",
            "upstream_error",
            "upstream_599",
            id="unknown-status",
        ),
        pytest.param(
            run(Outcome(200, body=error_json("The model is overloaded")), History(retries=3)),
            4,
            12.5,
            "The upstream kept answering 200 with an error treated as 429 Too Many Requests: "
            "gave up after 4 attempts over 12.5 s. Upstream said: The model is overloaded",
            "rate_limited",
            "retries_exhausted",
            id="recategorized",
        ),
        pytest.param(
            run(Outcome(200, body=error_json("oops")), History(retries=3)),
            4,
            3.0,
            "The upstream kept answering 200 with an error treated as 502 Bad Gateway: "
            "gave up after 4 attempts over 3.0 s. Upstream said: oops",
            "upstream_error",
            "retries_exhausted",
            id="inband-error",
        ),
        pytest.param(
            run(Outcome(503), History(elapsed=9.5), make_policy({"max_total_seconds": 10})),
            5,
            9.5,
            "The upstream answered 503 Service Unavailable: stopped after 5 attempts over 9.5 s "
            "because the time limit (error_handling.max_total_seconds) ran out.",
            "upstream_error",
            "time_budget_exhausted",
            id="time-budget",
        ),
        pytest.param(
            run(Outcome(429, {"retry-after": "90"})),
            1,
            0.2,
            "The upstream answered 429 Too Many Requests: it asks to wait 90 s before trying "
            "again, longer than error_handling.max_delay allows; stopped after 1 attempt over "
            "0.2 s.",
            "rate_limited",
            "retry_after_too_long",
            id="retry-after-too-long",
        ),
        pytest.param(
            run(
                Outcome(None, transport_error="timeout", transport_message="no answer in 30 s"),
                History(retries=3),
            ),
            4,
            121.0,
            "The upstream did not answer in time: gave up after 4 attempts over 121.0 s. "
            "Details: no answer in 30 s",
            "timeout",
            "timeout",
            id="timeout",
        ),
        pytest.param(
            run(
                Outcome(
                    None,
                    transport_error="connection_error",
                    transport_message="Cannot connect to host",
                ),
                History(retries=3),
            ),
            4,
            7.0,
            "Could not get a complete answer from the upstream: gave up after 4 attempts over "
            "7.0 s. Details: Cannot connect to host",
            "connection_error",
            "connection_error",
            id="connection-error",
        ),
        pytest.param(
            run(Outcome(200, body=completion("", finish="SAFETY")), History(empty_retries=2)),
            3,
            6.0,
            "The upstream sent an empty reply 3 times in a row (finish reason: SAFETY); gave up "
            "after 3 attempts over 6.0 s. The model may be refusing this prompt: try "
            "regenerating or rephrasing.",
            "empty_response",
            "empty_response",
            id="empty",
        ),
        pytest.param(
            circuit_open(42.2, 5, "503 Service Unavailable: overloaded"),
            0,
            0.0,
            "The upstream failed 5 times in a row, so the proxy is giving it time to recover: "
            "it sends the next request to it in 43 s. Try again in 43 s. The last error: "
            "503 Service Unavailable: overloaded",
            "circuit_open",
            "circuit_open",
            id="circuit-open",
        ),
    ],
)
def test_error_body_messages(
    decision: Decision, attempts: int, elapsed: float, message: str, error_type: str, code: str
) -> None:
    error = error_body(decision, attempts, elapsed)["error"]
    assert error["message"] == message
    assert (error["type"], error["code"], error["attempts"]) == (error_type, code, attempts)


def test_failure_summary() -> None:
    from first_hop_proxy.decisions import failure_summary

    http = run(Outcome(503, body=error_json("Service Unavailable")))
    assert failure_summary(http) == "503 Service Unavailable: Service Unavailable"
    hung = run(Outcome(transport_error="timeout", transport_message="The upstream hung."))
    assert failure_summary(hung) == "no answer in time: The upstream hung."
    assert "The upstream hung." not in hung.reason  # said once, in upstream_message


def test_circuit_open_decision() -> None:
    d = circuit_open(10.0, 5)
    assert (d.action, d.status, d.client_status, d.error_type, d.retry_after) == (
        Action.FAIL,
        503,
        503,
        "circuit_open",
        10.0,
    )
    assert error_body(d, 0, 0.0)["error"]["retry_after"] == 10


def hard_stop_policy(**rule: Any) -> Policy:
    base = {"pattern": "FATAL", "user_message": "Rephrase it.", "description": "crash"}
    return make_policy({"hard_stop_conditions": {"rules": [{**base, **rule}]}})


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        pytest.param(
            {},
            {
                "message": "Rephrase it.",
                "type": "hard_stop_error",
                "code": "hard_stop_condition_met",
                "original_response": "x FATAL y",
            },
            id="user-message-and-original",
        ),
        pytest.param(
            {"preserve_original_response": False},
            {
                "message": "Rephrase it.",
                "type": "hard_stop_error",
                "code": "hard_stop_condition_met",
            },
            id="no-original",
        ),
        pytest.param(
            {"add_user_message": False},
            {
                "message": "The upstream's reply matched a hard-stop rule, so the proxy stopped "
                "without retrying (crash).",
                "type": "hard_stop_error",
                "code": "hard_stop_condition_met",
                "original_response": "x FATAL y",
            },
            id="generic-message",
        ),
        pytest.param(
            {"user_message": "", "description": "", "preserve_original_response": False},
            {
                "message": "The upstream's reply matched a hard-stop rule, so the proxy stopped "
                "without retrying.",
                "type": "hard_stop_error",
                "code": "hard_stop_condition_met",
            },
            id="generic-no-description",
        ),
    ],
)
def test_error_body_hard_stop(rule: dict[str, Any], expected: dict[str, Any]) -> None:
    d = run(Outcome(500, body="x FATAL y"), policy=hard_stop_policy(**rule))
    assert d.action is Action.HARD_STOP
    assert error_body(d, 1, 0.3) == {"error": expected}


def test_hard_stop_rule_type() -> None:
    d = run(Outcome(500, body="x FATAL y"), policy=hard_stop_policy())
    assert isinstance(d.hard_stop_rule, HardStopRule)


# -- a legacy config --------------------------------------------------------


@pytest.fixture(scope="module")
def spec_policy() -> Policy:
    loaded = load_config(LEGACY_CONFIG)
    return Policy.from_config(loaded.config)


GOOGLE_CRASH = (
    "Error in googleAIBlockingResponseHandler: TypeError: Cannot read properties of "
    "undefined (reading 'parts')"
)


@pytest.mark.parametrize(
    ("outcome", "action", "status", "pattern"),
    [
        pytest.param(
            Outcome(200, body=error_json("The model is overloaded. Try later.")),
            Action.RETRY,
            429,
            "The model is overloaded",
            id="overloaded",
        ),
        pytest.param(
            Outcome(200, body=completion("The model is overloaded.")),
            Action.RETRY,
            429,
            "The model is overloaded",
            id="overloaded-in-content",
        ),
        pytest.param(
            Outcome(200, body='{"proxy_note": "Service Unavailable, sorry"}'),
            Action.RETRY,
            429,
            "service unavailable",
            id="service-unavailable",
        ),
        pytest.param(
            Outcome(200, body=error_json("model is at capacity right now")),
            Action.RETRY,
            429,
            "model.*capacity",
            id="capacity",
        ),
        # "service unavailable" comes earlier in the file and matches case-insensitively,
        # so it claims the proxy-wrapped 503 and upstream-unavailable texts too.
        pytest.param(
            Outcome(200, body=error_json("HTTP 503 Service Unavailable")),
            Action.RETRY,
            429,
            "service unavailable",
            id="wrapped-503",
        ),
        pytest.param(
            Outcome(200, body=error_json("Upstream service unavailable")),
            Action.RETRY,
            429,
            "service unavailable",
            id="upstream-unavailable",
        ),
        pytest.param(
            Outcome(200, stream=True, stream_error_event=error_json("model capacity")),
            Action.RETRY,
            429,
            "model.*capacity",
            id="stream-event",
        ),
        pytest.param(
            Outcome(503, body="The model is overloaded"), Action.RETRY, 503, None, id="only-for-200"
        ),
        pytest.param(
            Outcome(200, body=completion("A fine reply.")),
            Action.DELIVER,
            200,
            None,
            id="good-reply",
        ),
    ],
)
def test_spec_config_recategorization(
    spec_policy: Policy, outcome: Outcome, action: Action, status: int, pattern: str | None
) -> None:
    d = run(outcome, policy=spec_policy)
    assert (d.action, d.status) == (action, status), d.reason
    assert (d.recategorized.pattern if d.recategorized else None) == pattern


@pytest.mark.parametrize(
    "outcome",
    [
        pytest.param(Outcome(500, body=error_json(GOOGLE_CRASH)), id="500"),
        pytest.param(Outcome(200, body=error_json(GOOGLE_CRASH.upper())), id="200-any-case"),
        pytest.param(
            Outcome(200, stream=True, stream_error_event=error_json(GOOGLE_CRASH)),
            id="stream-event",
        ),
        pytest.param(
            Outcome(503, body=GOOGLE_CRASH + " The model is overloaded"), id="beats-retry"
        ),
    ],
)
def test_spec_config_hard_stop(spec_policy: Policy, outcome: Outcome) -> None:
    d = run(outcome, policy=spec_policy)
    assert d.action is Action.HARD_STOP
    error = error_body(d, 1, 0.5)["error"]
    assert error["message"].startswith("The upstream could not process your last message")
    assert error["code"] == "hard_stop_condition_met"
    assert GOOGLE_CRASH.split(":")[0].lower() in error["original_response"].lower()


def test_spec_config_hard_stop_needs_both_parts(spec_policy: Policy) -> None:
    d = run(Outcome(500, body="googleAIBlockingResponseHandler failed"), policy=spec_policy)
    assert d.action is Action.FAIL


@pytest.mark.parametrize(
    ("status", "action", "budget"),
    [
        pytest.param(411, Action.FAIL, None, id="411-fail-beats-conditional"),
        pytest.param(423, Action.RETRY, "retry", id="423-retry-beats-conditional"),
        pytest.param(404, Action.RETRY, "conditional", id="404-conditional"),
        pytest.param(400, Action.FAIL, None, id="400-fail"),
        pytest.param(503, Action.RETRY, "retry", id="503-retry"),
        pytest.param(500, Action.FAIL, None, id="500-unlisted"),
    ],
)
def test_spec_config_code_lists(
    spec_policy: Policy, status: int, action: Action, budget: str | None
) -> None:
    d = run(Outcome(status), policy=spec_policy)
    assert (d.action, d.budget) == (action, budget)


def test_spec_config_budgets(spec_policy: Policy) -> None:
    # The default time budget (60 s) ends the backoff 1+2+4+8+16 s before the 32 s wait.
    decisions, _ = play([Outcome(503)], spec_policy)
    assert len(decisions) == 6
    assert decisions[-1].gave_up == "time_budget"
    unlimited = replace(spec_policy, max_total_seconds=None)
    decisions, _ = play([Outcome(503)], unlimited)
    assert len(decisions) == 11
    decisions, _ = play([Outcome(404)], spec_policy)
    assert len(decisions) == 3
    decisions, _ = play([Outcome(429)], spec_policy)
    assert (decisions[-1].client_status, decisions[-1].error_type) == (503, "rate_limited")
