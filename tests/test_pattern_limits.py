"""Hard-stop and recategorization patterns run under a time limit, like rewrite rules;
the decision core masks upstream texts before it cuts them."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import regex  # type: ignore[import-untyped, unused-ignore]

from first_hop_proxy.config import Config, parse_config
from first_hop_proxy.decisions import MESSAGE_LIMIT, Action, History, Outcome, Policy, decide
from first_hop_proxy.patterns import RuleTimeout, nested_repetition, required_literal
from first_hop_proxy.redact import Redactor, mask

from .keys import assert_no_leak, random_key

CATASTROPHIC = "x" * 40 + "!"  # (x|xx)+$ tries every way to split the x's: hours


@pytest.mark.parametrize(
    ("pattern", "nested"),
    [
        ("(x|xx)+$", True),
        ("(a+)+", True),
        (r"(\w+\s?)*$", True),
        ("(?:a*b?)*c", True),
        ("((ab)+c)+", True),
        ("(a{1,3})+", True),
        ("(a{2,})*", True),
        ("(?:cat|dog)+", True),  # disjoint alternatives are harmless, but told apart only by hand
        ("model.*capacity", False),
        ("(abc)+", False),
        ("(a|b)c+", False),  # the alternation is not repeated
        ("(a{2})+", False),  # a fixed count does not multiply the ways to match
        ("(a+)?", False),  # optional once is not repetition
        (r"\(a+\)+", False),  # escaped parentheses are not a group
        ("[(+)]+", False),  # neither are parentheses in a class
        ("(?i)The model is overloaded", False),
        ("(a|b){3}", False),
        ("(?x) (a+)+  # verbose: not scanned", False),
    ],
)
def test_nested_repetition(pattern: str, nested: bool) -> None:
    assert nested_repetition(pattern) is nested


def policy(**sections: Any) -> Policy:
    return Policy.from_config(Config.model_validate(sections))


RUNAWAY = policy(
    error_handling={
        "hard_stop_conditions": {
            "timeout_ms": 50,
            "rules": [
                {"pattern": "(x|xx)+$", "description": "runaway"},
                {"pattern": "x!", "user_message": "stopped by the second rule"},
            ],
        }
    }
)


def test_timed_out_hard_stop_is_skipped_and_named() -> None:
    start = time.perf_counter()
    decision = decide(Outcome(status=400, body=CATASTROPHIC), History(), RUNAWAY)
    assert time.perf_counter() - start < 1
    # the runaway rule is skipped; the next rule still runs
    assert decision.action is Action.HARD_STOP
    assert decision.hard_stop_rule is not None
    assert decision.hard_stop_rule.user_message == "stopped by the second rule"
    timeout = RuleTimeout("error_handling.hard_stop_conditions", 0, "runaway", None)
    assert decision.timeouts == (timeout,)
    assert str(timeout).endswith(".hard_stop_conditions.rules[0] (runaway) timed out; skipped")
    assert RUNAWAY.can_run_away


def test_timed_out_recategorization_is_skipped_and_named() -> None:
    recats = policy(
        response_parsing={
            "status_recategorization": {
                "timeout_ms": 50,
                "rules": [
                    {"pattern": "(x|xx)+$", "original_status": 400, "new_status": 429},
                    {"pattern": "x!", "new_status": 503},
                ],
            }
        }
    )
    start = time.perf_counter()
    decision = decide(Outcome(status=400, body=CATASTROPHIC), History(), recats)
    assert time.perf_counter() - start < 1
    assert decision.recategorized is not None and decision.recategorized.new == 503
    assert decision.action is Action.RETRY
    assert decision.timeouts == (
        RuleTimeout("response_parsing.status_recategorization", 0, "", None),
    )


def test_patterns_without_repetition_have_no_limit_and_stay_inline() -> None:
    """A bounded pattern runs to the end however short the limit; the shell can
    then decide on the event loop."""
    bounded = policy(
        error_handling={
            "hard_stop_conditions": {"timeout_ms": 0.001, "rules": [{"pattern": "a|b!"}]}
        },
        response_parsing={
            "status_recategorization": {
                "timeout_ms": 0.001,
                "rules": [{"pattern": "The model is overloaded", "new_status": 429}],
            }
        },
    )
    assert not bounded.can_run_away
    decision = decide(Outcome(status=500, body="c" * 8000 + "b!"), History(), bounded)
    assert decision.action is Action.HARD_STOP and decision.timeouts == ()


def test_a_good_reply_is_delivered_without_timeouts() -> None:
    body = '{"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]}'
    decision = decide(Outcome(status=200, body=body), History(), RUNAWAY)
    assert decision.action is Action.DELIVER and decision.timeouts == ()


@pytest.mark.parametrize("at", [MESSAGE_LIMIT - 20, MESSAGE_LIMIT - 40, MESSAGE_LIMIT - 10])
def test_upstream_message_masked_before_it_is_cut(at: int) -> None:
    """The request's mask runs before the cut at MESSAGE_LIMIT: no stump survives."""
    client_key = random_key("cl-", 45)
    body = '{"error": {"message": "%s"}}' % ("y" * at + client_key + " and more")
    outcome = Outcome(status=401, body=body)
    decision = decide(outcome, History(), POLICY_PLAIN, mask=Redactor([client_key]).text)
    assert_no_leak(decision.upstream_message, client_key)
    assert mask(client_key) in decision.upstream_message
    unmasked = decide(outcome, History(), POLICY_PLAIN, mask=lambda text: text)
    stump = client_key[: MESSAGE_LIMIT - 1 - at]  # what cutting first would have kept
    assert unmasked.upstream_message.endswith(stump + "…")


def test_snippet_of_a_reply_that_is_not_json_masked_before_it_is_cut() -> None:
    key = random_key("sk-test-", 40)
    decision = decide(Outcome(status=200, body="x" * 84 + key), History(), POLICY_PLAIN)
    assert_no_leak(decision.reason + decision.upstream_message, key)
    assert "x" * 84 + mask(key) in decision.upstream_message


POLICY_PLAIN = policy()


def test_config_warns_about_nested_repetition(tmp_path: Path) -> None:
    loaded = parse_config(
        {
            "regex_replacement": {"rules": [{"pattern": "(a+)+b"}, {"pattern": "a+b"}]},
            "response_processing": {"rules": [{"pattern": r"(\w+\s?)*$"}]},
            "error_handling": {"hard_stop_conditions": {"rules": [{"pattern": "(x|xx)+$"}]}},
            "response_parsing": {
                "status_recategorization": {"rules": [{"pattern": "(ab*)*c", "new_status": 429}]}
            },
        },
        base_dir=tmp_path,
        env={},
    )
    nested = [w.split(":")[0] for w in loaded.warnings if "repeats a group" in w]
    assert nested == [
        "regex_replacement.rules[0].pattern",
        "response_processing.rules[0].pattern",
        "error_handling.hard_stop_conditions.rules[0].pattern",
        "response_parsing.status_recategorization.rules[0].pattern",
    ]
    hard_stop = next(w for w in loaded.warnings if w.startswith("error_handling"))
    assert "error_handling.hard_stop_conditions.timeout_ms" in hard_stop


def test_title_of_an_error_sent_as_a_reply_masked_before_it_is_cut() -> None:
    """A community proxy's error title (here its finish_reason) is cut only after masking."""
    client_key = random_key("cl-", 45)
    finish = "Proxy error " + "y" * 170 + client_key
    message = {"content": "The queue was closed."}
    body = orjson.dumps({"choices": [{"message": message, "finish_reason": finish}]}).decode()
    decision = decide(
        Outcome(status=200, body=body), History(), POLICY_PLAIN, mask=Redactor([client_key]).text
    )
    assert decision.action is not Action.DELIVER
    assert_no_leak(decision.upstream_message, client_key)
    assert mask(client_key) in decision.upstream_message


@pytest.mark.parametrize(
    ("pattern", "needle"),
    [
        (
            "googleAIBlockingResponseHandler.*Cannot read properties",
            "googleAIBlockingResponseHandler",
        ),
        ("model.*capacity", "capacity"),
        ("ab*cde", "cde"),  # the b may be absent: it ends the run before it
        ("rate.limit(ed)?\\s+exceeded", "exceeded"),
        (r"foo\.bar.*baz", "foo.bar"),  # an escaped dot is a dot
        ("hello{2,}", "hell"),
        ("abc+?xyz", "xyz"),  # a lazy quantifier: its "?" is not another quantifier
        ("x{3}yz", None),  # two characters are too few to tell texts apart
        ("a|bcd", None),  # another branch need not contain it
        ("(x|xx)+$", None),
        ("(?i)hello world", None),  # inline flags are not followed
        ("(?P<name>abc)def", None),
        ("[abc]+", None),
        ("(abc", None),
        ("abc)", None),
    ],
)
def test_required_literal(pattern: str, needle: str | None) -> None:
    assert required_literal(pattern) == needle


@pytest.mark.parametrize(
    ("pattern", "example"),
    [
        ("ab*cde", "abbcde"),
        ("a.b+cdd?eff", "axbbcdeff"),
        ("(ab)?cdde+f", "abcddeef"),
        ("xy[ab]zz.*qqq", "xyazz--qqq"),
        ("c?ddd(e|f)+ggg", "cdddefggg"),
        (r"ab\.c*de", "ab.ccde"),
    ],
)
def test_every_match_contains_the_required_literal(pattern: str, example: str) -> None:
    """Texts made by mutating a match at random: wherever the pattern matches one, the
    literal is in the match."""
    needle = required_literal(pattern)
    assert needle is not None
    compiled = regex.compile(pattern)
    assert compiled.fullmatch(example)
    alphabet = sorted(set(example))
    rng = random.Random(1)
    matched = 0
    for _ in range(3000):
        text = list(example)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(text) + 1)
            kind = rng.random()
            if kind < 0.4 and text:
                del text[min(at, len(text) - 1)]
            elif kind < 0.8:
                text.insert(at, rng.choice(alphabet))
            elif text:
                text.insert(at, text[min(at, len(text) - 1)])  # a doubled character
        found = compiled.search("".join(text))
        if found is not None:
            matched += 1
            assert needle in found.group(), (pattern, text)
    assert matched > 100, matched  # the check did check something


def policy_with(patterns: list[str], flags: str = "") -> Policy:
    return policy(
        error_handling={
            "hard_stop_conditions": {
                "rules": [{"pattern": p, "flags": flags} for p in patterns],
            }
        }
    )


def test_a_reply_without_a_runaway_patterns_literal_is_judged_on_the_event_loop() -> None:
    stops = policy_with(["googleAIBlocking.*Cannot read properties", "model.*capacity"], "i")
    assert stops.can_run_away
    plain = '{"choices": [{"message": {"content": "The night was calm."}}]}'
    assert not stops.may_run_away(Outcome(status=200, body=plain))
    for body in (
        '{"error": "MODEL at CAPACITY"}',  # the patterns ignore case
        '{"error": "x: cannot read PROPERTIES of undefined"}',
        '{"error": "\\u0063apacity"}',  # an escape could spell it: the worker thread
        '{"error": "caf\u00e9"}',  # case folding beyond ASCII: the worker thread
    ):
        assert stops.may_run_away(Outcome(status=500, body=body)), body
    assert stops.may_run_away(Outcome(status=200, body=plain, stream_error_event="capacity!"))
    # What is judged inline is judged the same: the pattern still runs, under its limit.
    decision = decide(Outcome(status=500, body='{"error": "model at capacity"}'), History(), stops)
    assert decision.action is Action.HARD_STOP


def test_a_runaway_pattern_without_a_literal_always_goes_to_the_worker_thread() -> None:
    assert RUNAWAY.run_away_needles is None
    assert RUNAWAY.may_run_away(Outcome(status=200, body="{}"))
    no_quotes = policy_with(['said ".*"'])  # a quote can be escaped in the raw JSON
    assert no_quotes.may_run_away(Outcome(status=200, body="{}"))
    bounded = policy_with(["The model is overloaded"])
    assert not bounded.can_run_away and not bounded.may_run_away(Outcome(status=500, body="x"))


def test_a_text_without_a_patterns_literal_is_not_searched_and_the_answers_stay_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recats = policy(
        response_parsing={
            "status_recategorization": {
                "rules": [
                    {"pattern": "model.*capacity", "original_status": 200, "new_status": 503},
                    {"pattern": "The model is overloaded", "new_status": 429},
                ],
            }
        }
    )
    searched: list[str] = []
    real = type(recats.recategorize_any[0]).finds

    def spy(self: Any, text: str, limit: float) -> bool:
        searched.append(text)
        return bool(real(self, text, limit))

    monkeypatch.setattr(type(recats.recategorize_any[0]), "finds", spy)
    good = '{"choices": [{"message": {"content": "A calm night."}, "finish_reason": "stop"}]}'
    assert decide(Outcome(status=200, body=good), History(), recats).action is Action.DELIVER
    assert searched == []  # neither literal is in the reply
    for text, new in (
        ("MODEL is at Capacity", 503),
        ("the model is OVERLOADED", 429),
        ("mod\u00e8l at capacity", None),  # searched (not ASCII), no match
    ):
        reply = {"choices": [{"message": {"content": text}, "finish_reason": "stop"}]}
        body = orjson.dumps(reply).decode()
        searched.clear()
        decision = decide(Outcome(status=200, body=body), History(), recats)
        assert searched, body
        found = decision.recategorized.new if decision.recategorized else None
        assert found == new, body
