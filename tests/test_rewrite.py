"""Rewrite rules: outgoing messages, replies, streamed replies, the real user's config."""

from __future__ import annotations

import asyncio
import random
import re
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from first_hop_proxy.config import (
    Config,
    ConfigError,
    MessageRule,
    RewriteRule,
    load_config,
    parse_config,
)
from first_hop_proxy.rewrite import Rewriter, RuleTimeout, _bounded, trial

from .conftest import LEGACY_CONFIG

CATASTROPHIC = "a" * 40 + "b"


def out_rule(pattern: str, replacement: str = "", **kw: Any) -> MessageRule:
    return MessageRule(pattern=pattern, replacement=replacement, **kw)


def in_rule(pattern: str, replacement: str = "", **kw: Any) -> RewriteRule:
    return RewriteRule(pattern=pattern, replacement=replacement, **kw)


def one(rewriter: Rewriter, text: str, role: str = "user") -> str:
    payload: dict[str, Any] = {"messages": [{"role": role, "content": text}]}
    rewriter.rewrite_messages(payload)
    return str(payload["messages"][0]["content"])


@pytest.fixture(scope="module")
def user_config() -> Config:
    return load_config(LEGACY_CONFIG).config


# -- outgoing ---------------------------------------------------------------------


def test_roles_filter_messages() -> None:
    rw = Rewriter(
        [
            out_rule("x", "U", apply_to="user"),
            out_rule("y", "S", apply_to=["system", "assistant"]),
            out_rule("z", "A", apply_to="all"),
        ]
    )
    payload: dict[str, Any] = {
        "messages": [
            {"role": "system", "content": "xyz"},
            {"role": "user", "content": "xyz"},
            {"role": "assistant", "content": "xyz"},
            {"role": "tool", "content": "xyz"},
            {"role": "function", "content": "xyz"},
        ]
    }
    result = rw.rewrite_messages(payload)
    assert [m["content"] for m in payload["messages"]] == ["xSA", "UyA", "xSA", "xyA", "xyA"]
    assert result.changed
    assert result.counts == [1, 2, 5]


@pytest.mark.parametrize(
    ("flags", "pattern", "text", "expected"),
    [
        ("", "hello", "Hello hello", "Hello X"),
        ("i", "hello", "Hello hello", "X X"),
        ("", "^b", "a\nb", "a\nb"),
        ("m", "^b", "a\nb", "a\nX"),
        ("", "a.b", "a\nb", "a\nb"),
        ("s", "a.b", "a\nb", "X"),
        ("x", "a b  # spaces and comments are ignored", "ab a b", "X a b"),
    ],
)
def test_flags(flags: str, pattern: str, text: str, expected: str) -> None:
    assert one(Rewriter([out_rule(pattern, "X", flags=flags)]), text) == expected


def test_backreferences_numbered_and_named() -> None:
    rw = Rewriter(
        [
            out_rule(r"(\w+)@(\w+)", r"\2 at \1"),
            out_rule(r"(?P<word>cat)", r"<\g<word>>"),
            out_rule(r"(dog)", r"\g<0>\g<1>"),
        ]
    )
    assert one(rw, "me@home cat dog") == "home at me <cat> dogdog"


def test_replacement_with_missing_group_is_refused_at_load() -> None:
    rules = [{"pattern": "a", "replacement": "b"}, {"pattern": "(a)", "replacement": r"\2"}]
    with pytest.raises(ConfigError) as info:
        parse_config({"regex_replacement": {"rules": rules}}, base_dir=Path("."), env={})
    assert info.value.problems == [
        "regex_replacement.rules[1].replacement: invalid replacement '\\\\2': no such group"
    ]


def test_list_content_text_parts_only() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,cat="}}
    payload: dict[str, Any] = {
        "model": "cat",
        "messages": [
            {
                "role": "user",
                "name": "cat",
                "content": [
                    {"type": "text", "text": "a cat"},
                    image,
                    {"type": "text", "text": "cat"},
                ],
            }
        ],
    }
    Rewriter([out_rule("cat", "dog")]).rewrite_messages(payload)
    assert payload["model"] == "cat"
    message = payload["messages"][0]
    assert message["name"] == "cat"
    assert message["content"] == [
        {"type": "text", "text": "a dog"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,cat="}},
        {"type": "text", "text": "dog"},
    ]


def test_rules_apply_in_order() -> None:
    assert one(Rewriter([out_rule("a", "b"), out_rule("b", "c")]), "ab") == "cc"
    assert one(Rewriter([out_rule("b", "c"), out_rule("a", "b")]), "ab") == "bc"


def test_literal_and_regex_rules_agree_across_many_messages() -> None:
    """Literal rules run over all messages at once; results must match one by one."""
    rules = [out_rule("a", "aa"), out_rule(r"\[", "<"), out_rule("x+", "X"), out_rule("^b", "B")]
    texts = ["abc", "", "b[a]", "xxa\x01", "ba\x02b"]
    payload: dict[str, Any] = {"messages": [{"role": "user", "content": t} for t in texts]}
    Rewriter(rules).rewrite_messages(payload)
    assert [m["content"] for m in payload["messages"]] == [one(Rewriter(rules), t) for t in texts]
    assert [m["content"] for m in payload["messages"]] == [
        "aabc",
        "",
        "B<aa]",
        "Xaa\x01",
        "Baa\x02b",
    ]


@pytest.mark.parametrize("seed", range(20))
def test_many_messages_at_once_equal_one_by_one(seed: int) -> None:
    """Literal rules and prefilters work on all messages joined; that must not show."""
    rules = [
        out_rule("ab", "b"),  # a deletion that makes new "ab"s: a later rule must see them
        out_rule("b", "cc"),
        out_rule("ccc", "\x01"),  # writes the character texts are joined with
        out_rule("^c", "S"),
        out_rule(r"(?<!a)c\b", "E"),
        out_rule(r"(?<=a)b|d$", "D"),
        out_rule("a", ""),
        out_rule("cE", "ab"),
        out_rule("ab", "X"),
    ]
    rnd = random.Random(seed)
    alphabet = "abcd \x01" if seed % 4 == 0 else "abcd "
    texts = ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 12))) for _ in range(8)]
    payload: dict[str, Any] = {"messages": [{"role": "user", "content": t} for t in texts]}
    rw = Rewriter(rules)
    rw.rewrite_messages(payload)
    assert [m["content"] for m in payload["messages"]] == [one(Rewriter(rules), t) for t in texts]


def test_empty_matching_rule_inserts_between_every_character() -> None:
    """Like re.sub: an unescaped "|" matches the empty string everywhere."""
    rw = Rewriter([out_rule("|", "_")])
    assert one(rw, "a|b") == "_a_|_b_"
    assert one(rw, "") == "_"


@pytest.mark.parametrize(
    ("pattern", "bounded"),
    [
        ("|", True),
        ("cat|dog", True),
        (r"\[", True),
        ("[*+?{]", True),  # quantifier characters inside a class are literal
        ("(?i)ab", True),
        ("(?:ab)(c|d)", True),
        ("(?=x)y|(?<!a)b", True),
        (r"\bword\b", True),
        ("(?P<name>a)", True),
        ("a|b|c|d|e", True),
        ("a|b|c|d|e|f", False),  # more branches than MAX_BOUNDED_BRANCHES
        ("a*", False),
        ("a+", False),
        ("x?", False),
        (r"\(?", False),  # an escaped "(" is an atom: the "?" repeats it
        ("a{2}", False),
        (r"(a)\1", False),
        ("(?P<x>a)(?P=x)", False),
        ("(?(1)a|b)", False),
        ("(?R)", False),
        ("(?x) a b", False),
        ("(?ix)a # [ comment\n b", False),
    ],
)
def test_bounded_patterns(pattern: str, bounded: bool) -> None:
    """A pattern without repetition or backreferences cannot run away."""
    assert _bounded(pattern, "") is bounded


def test_bounded_rule_has_no_time_limit() -> None:
    """With a limit far too short for the text, a bounded rule still runs to the end,
    where a rule with repetition is cut off and reported."""
    text = "ab" * 200_000
    bounded = Rewriter([out_rule("a|b", "_")], request_timeout_ms=0.001)
    assert one(bounded, text) == "_" * 400_000
    repeating = Rewriter([out_rule(r"(a|aa)+$", "_")], request_timeout_ms=0.001)
    payload: dict[str, Any] = {"messages": [{"role": "user", "content": CATASTROPHIC}]}
    assert repeating.rewrite_messages(payload).timeouts


@pytest.mark.parametrize("pattern", ["|", "||", "(|)", "()"])
def test_empty_only_pattern_matches_re_sub(pattern: str) -> None:
    """Patterns that match only the empty string run as one join, with re.sub's result."""
    rng = random.Random(7)
    rw = Rewriter([out_rule(pattern, r"\\u007c")])
    for _ in range(50):
        text = "".join(rng.choice("ab|\n\u00e9\U0001f600") for _ in range(rng.randrange(6)))
        payload: dict[str, Any] = {"messages": [{"role": "user", "content": text}]}
        report = rw.rewrite_messages(payload)
        assert payload["messages"][0]["content"] == re.sub(pattern, r"\\u007c", text)
        assert report.counts == [len(text) + 1]


async def test_bounded_rules_run_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No thread hop for rules that cannot run away, as for literal rules."""

    def boom(*args: Any) -> Any:
        raise AssertionError("should not be called")

    monkeypatch.setattr(asyncio, "to_thread", boom)
    rw = Rewriter([out_rule("|", "-"), out_rule("cat|dog", "pet")], [in_rule("a|b", "_")])
    payload: dict[str, Any] = {"messages": [{"role": "user", "content": "cat"}]}
    result = await rw.rewrite_messages_async(payload, 100)
    assert payload["messages"][0]["content"] == "-c-a-t-"
    assert result.counts == [4, 0]
    reply = orjson.dumps({"choices": [{"message": {"content": "abc"}}]})
    assert b'"__c"' in (await rw.rewrite_response_async(reply)).body


def test_catastrophic_pattern_is_cut_off_and_reported() -> None:
    rw = Rewriter(
        [out_rule(r"(a|aa)+$", "X", description="runaway"), out_rule("b", "B")],
        request_timeout_ms=100,
    )
    body = orjson.dumps({"messages": [{"role": "user", "content": CATASTROPHIC}]})
    start = time.perf_counter()
    result = rw.rewrite_request(body)
    assert time.perf_counter() - start < 1.0
    assert result.timeouts == [RuleTimeout("regex_replacement", 0, "runaway", "user")]
    # the runaway rule is skipped for that message; the next rule still runs
    assert orjson.loads(result.body)["messages"][0]["content"] == "a" * 40 + "B"
    assert "regex_replacement.rules[0] (runaway) timed out on a user message" in str(
        result.timeouts[0]
    )


async def test_slow_rule_runs_off_the_event_loop() -> None:
    rw = Rewriter([out_rule(r"(a|aa)+$", "X")], request_timeout_ms=300)
    body = orjson.dumps({"messages": [{"role": "user", "content": CATASTROPHIC}]})
    ticks = 0

    async def other_request() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    other = asyncio.create_task(other_request())
    result = await rw.rewrite_request_async(body)
    other.cancel()
    assert result.timeouts and result.body is body
    assert ticks >= 10  # ~30 possible in 300 ms; a blocked loop would give 0


async def test_no_rules_means_no_thread_and_no_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any) -> Any:
        raise AssertionError("should not be called")

    monkeypatch.setattr(asyncio, "to_thread", boom)
    monkeypatch.setattr(orjson, "loads", boom)
    body = b'{"messages": [{"role": "user", "content": "hi"}]}'
    rw = Rewriter()
    assert not rw.has_request_rules
    assert (await rw.rewrite_request_async(body)).body is body
    assert (await rw.rewrite_response_async(body)).body is body
    assert not (await rw.rewrite_messages_async({"messages": []})).changed


def test_unchanged_body_is_the_same_bytes_object() -> None:
    body = b'{"messages":[{"role":"user","content":"hello"}],  "stream" : true}'
    result = Rewriter([out_rule("zzz", "y"), out_rule("l", "l")]).rewrite_request(body)
    assert result.body is body
    assert not result.changed
    assert result.counts == [0, 2]  # replacements made, though nothing changed


def test_changed_body_is_serialized_once() -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hello"}], "stream": true}'
    result = Rewriter([out_rule("l+", "L")]).rewrite_request(body)
    assert result.changed
    assert (
        result.body == b'{"model":"m","messages":[{"role":"user","content":"heLo"}],"stream":true}'
    )


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"messages": "x"}'])
def test_bodies_that_are_not_chats_pass_untouched(body: bytes) -> None:
    assert Rewriter([out_rule("x", "y")]).rewrite_request(body).body is body


def test_disabled_section_has_no_rules() -> None:
    config = parse_config(
        {"regex_replacement": {"enabled": False, "rules": [{"pattern": "a"}]}},
        base_dir=Path.cwd(),
        env={},
    ).config
    assert not Rewriter.from_config(config).has_request_rules
    assert Rewriter.from_config(config, include_disabled=True).has_request_rules


# -- replies ----------------------------------------------------------------------


def test_response_rewrites_message_content_only() -> None:
    body = orjson.dumps(
        {
            "id": "x",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "a cat"}},
                {"index": 1, "message": {"role": "assistant", "content": None, "tool_calls": []}},
            ],
            "model": "cat",
        }
    )
    result = Rewriter((), [in_rule("cat", "dog")]).rewrite_response(body)
    payload = orjson.loads(result.body)
    assert payload["choices"][0]["message"]["content"] == "a dog"
    assert payload["model"] == "cat"
    assert result.counts == [1]


def test_unchanged_response_is_the_same_bytes_object() -> None:
    body = b'{"choices": [{"index": 0, "message": {"content": "hello"}}]}'
    result = Rewriter((), [in_rule("zzz", "y")]).rewrite_response(body)
    assert result.body is body and not result.changed


# -- streams ----------------------------------------------------------------------


def chunk(
    text: str | None, index: int = 0, finish: str | None = None, **delta: Any
) -> dict[str, Any]:
    d: dict[str, Any] = dict(delta)
    if text is not None:
        d["content"] = text
    return {
        "id": f"chatcmpl-{index}",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "m",
        "choices": [{"index": index, "delta": d, "finish_reason": finish}],
    }


def stream_text(rewriter: Rewriter, parts: list[str], *, finish: bool = True) -> str:
    stream = rewriter.stream()
    out: list[dict[str, Any]] = []
    for part in parts:
        out += stream.feed(chunk(part))
    if finish:
        out += stream.feed(chunk(None, finish="stop"))
    out += stream.flush()
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in out)


def splits(text: str, pieces: int, seed: int) -> list[list[str]]:
    rnd = random.Random(seed)
    result = []
    for _ in range(200):
        cuts = sorted(rnd.sample(range(len(text) + 1), pieces - 1))
        result.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return result


SPLIT_RULES = [
    in_rule(r"\\u2019", "'"),
    in_rule(r"(?<=\w)(o+)(?P<t>k)", r"<\1|\g<t>>"),
    in_rule(r"\bcat\b", "dog"),
    in_rule("<", "<<"),
    in_rule("d<<", "D"),
]
SPLIT_TEXT = "book cat don\\u2019t concat oook dook catx cat \\u2019"


@pytest.mark.parametrize("at", range(len(SPLIT_TEXT) + 1))
def test_stream_split_in_two_anywhere_equals_whole(at: int) -> None:
    rw = Rewriter((), SPLIT_RULES)
    whole, _ = rw.rewrite_text(SPLIT_TEXT, response=True)
    assert stream_text(rw, [SPLIT_TEXT[:at], SPLIT_TEXT[at:]]) == whole


@pytest.mark.parametrize("finish", [True, False])
@pytest.mark.parametrize("max_match_chars", [64, 12])
def test_stream_split_in_five_equals_whole(max_match_chars: int, finish: bool) -> None:
    rules = [*SPLIT_RULES, in_rule("x*", "-")]  # an empty-matching rule too
    rw = Rewriter((), rules, max_match_chars=max_match_chars)
    whole, _ = rw.rewrite_text(SPLIT_TEXT, response=True)
    for parts in splits(SPLIT_TEXT, 5, seed=max_match_chars):
        assert stream_text(rw, parts, finish=finish) == whole, parts


@pytest.mark.parametrize("at", range(1, len("\\u2019")))
def test_match_split_across_two_and_five_events(at: int) -> None:
    rw = Rewriter((), [in_rule(r"\\u2019", "'")])
    assert stream_text(rw, ["don\\u2019"[: 3 + at], "don\\u2019"[3 + at :] + "t"]) == "don't"
    assert stream_text(rw, ["don", "\\", "u20", "1", "9t"]) == "don't"


def test_stream_holds_back_at_most_max_match_chars() -> None:
    rw = Rewriter((), [in_rule("c[a]t", "dog")], max_match_chars=4)
    stream = rw.stream()
    assert stream.feed(chunk("abc")) == []  # all held back: chunk dropped
    [out] = stream.feed(chunk("defgh"))
    assert out["choices"][0]["delta"]["content"] == "abcd"
    assert out["id"] == "chatcmpl-0" and out["model"] == "m"
    [tail] = stream.flush()
    assert tail["choices"] == [{"index": 0, "delta": {"content": "efgh"}, "finish_reason": None}]
    assert tail["id"] == "chatcmpl-0" and tail["object"] == "chat.completion.chunk"


def test_literal_rules_hold_back_only_what_could_still_match() -> None:
    """With literal rules a stream is not held back by max_match_chars: only the
    tail that is the start of a literal waits for the next event."""
    rw = Rewriter((), [in_rule("cat", "dog")], max_match_chars=64)
    stream = rw.stream()
    [out] = stream.feed(chunk("the big c"))
    assert out["choices"][0]["delta"]["content"] == "the big "
    [out] = stream.feed(chunk("at ran"))
    assert out["choices"][0]["delta"]["content"] == "dog ran"
    [out] = stream.feed(chunk(" ca"))
    assert out["choices"][0]["delta"]["content"] == " "
    [out] = stream.feed(chunk("r!"))
    assert out["choices"][0]["delta"]["content"] == "car!"
    assert stream.flush() == []


def test_chained_literal_rules_hold_from_an_output_character() -> None:
    """A later rule may match across an earlier rule's output: text from such a
    character on waits, and the stream still equals the whole reply."""
    rules = [in_rule("a", "b"), in_rule("bc", "X")]
    rw = Rewriter((), rules, max_match_chars=8)
    assert stream_text(rw, ["xa", "c", "yb", "cz"]) == rw.rewrite_text("xacybcz", response=True)[0]
    stream = rw.stream()
    [out] = stream.feed(chunk("hello a"))
    assert out["choices"][0]["delta"]["content"] == "hello "


def test_longer_match_than_max_match_chars_can_be_missed() -> None:
    """The documented limit."""
    rw = Rewriter((), [in_rule("abcdef", "X")], max_match_chars=2)
    assert stream_text(rw, ["xxxxabc", "def"]) == "xxxxabcdef"
    assert stream_text(rw, ["xxxxabcdef"]) == "xxxxX"


def test_flush_comes_before_the_finish_chunk() -> None:
    rw = Rewriter((), [in_rule("c[a]t", "dog")])
    stream = rw.stream()
    assert stream.feed(chunk("a c")) == []
    finish = chunk(None, finish="stop")
    flushed, last = stream.feed(finish)
    assert flushed["choices"][0]["delta"]["content"] == "a c"
    assert last is finish
    assert stream.flush() == []


def test_text_in_the_finish_chunk_goes_out_with_it() -> None:
    rw = Rewriter((), [in_rule("c[a]t", "dog")])
    stream = rw.stream()
    assert stream.feed(chunk("a c")) == []
    [last] = stream.feed(chunk("at", finish="stop"))
    assert last["choices"][0] == {
        "index": 0,
        "delta": {"content": "a dog"},
        "finish_reason": "stop",
    }


def test_flush_before_tool_calls_and_chunks_without_choices() -> None:
    rw = Rewriter((), [in_rule("[x]", "y")])
    stream = rw.stream()
    stream.feed(chunk("x1"))
    tool = chunk(None, tool_calls=[{"index": 0, "id": "t", "function": {"name": "f"}}])
    flushed, same = stream.feed(tool)
    assert flushed["choices"][0]["delta"] == {"content": "y1"} and same is tool
    stream.feed(chunk("x2"))
    usage = {"id": "u", "choices": [], "usage": {"total_tokens": 3}}
    flushed, same = stream.feed(usage)
    assert flushed["choices"][0]["delta"] == {"content": "y2"} and same is usage


def test_role_chunk_is_kept() -> None:
    stream = Rewriter((), [in_rule("x", "y")]).stream()
    first = chunk("", role="assistant")
    assert stream.feed(first) == [first]


def test_two_choices_are_held_and_flushed_separately() -> None:
    rw = Rewriter((), [in_rule("c[a]t", "dog")], max_match_chars=3)
    stream = rw.stream()
    out: list[dict[str, Any]] = []
    for a, b in [("the c", "a c"), ("at sat", "at ran"), (" on cat", "")]:
        out += stream.feed(chunk(a, 0))
        out += stream.feed(chunk(b, 1))
    out += stream.feed(chunk(None, 0, finish="stop"))
    out += stream.flush()
    texts = {0: "", 1: ""}
    for c in out:
        [choice] = c["choices"]
        texts[choice["index"]] += choice["delta"].get("content") or ""
        assert c["id"] == f"chatcmpl-{choice['index']}"
    assert texts == {0: "the dog sat on dog", 1: "a dog ran"}
    assert out[-1]["choices"][0]["index"] == 1  # choice 1 never finished: flushed last


def test_chunk_with_two_choices() -> None:
    stream = Rewriter((), [in_rule("a", "b")], max_match_chars=0).stream()
    both = chunk("a", 0)
    both["choices"].append({"index": 1, "delta": {"content": "aa"}, "finish_reason": None})
    [out] = stream.feed(both)
    assert [c["delta"]["content"] for c in out["choices"]] == ["b", "bb"]


def test_stream_without_rules_passes_chunks_through() -> None:
    rw = Rewriter()
    assert not rw.has_response_rules
    stream = rw.stream()
    assert not stream.enabled
    c = chunk("hello")
    assert stream.feed(c) == [c] and c == chunk("hello")
    assert stream.flush() == []


def test_stream_timeout_is_reported_once() -> None:
    rw = Rewriter((), [in_rule(r"(a|aa)+$", "X", description="runaway")], response_timeout_ms=20)
    assert stream_text(rw, [CATASTROPHIC, CATASTROPHIC]) == CATASTROPHIC * 2
    stream = rw.stream()
    for _ in range(3):
        stream.feed(chunk(CATASTROPHIC))
    stream.flush()
    assert stream.timeouts == [RuleTimeout("response_processing", 0, "runaway", None)]


# -- the real user's config -------------------------------------------------------

# What the outgoing rules send for each character (a single backslash: the YAML
# "\\\\u2019" is the template \\u2019, which re turns into \u2019).
ESCAPED = {
    "'": "\\u2019",
    "“": "\\u201c",
    "”": "\\u201d",
    "—": "\\u2014",
    "–": "\\u2013",
    "-": "\\u002d",
    "/": "\\u002f",
    "`": "\\u0060",
    "[": "\\u005b",
    "]": "\\u005d",
}


def without_pipe_rule(config: Config) -> Rewriter:
    rules = config.regex_replacement.rules
    assert rules[9].pattern == "|"
    return Rewriter(rules[:9] + rules[10:], config.response_processing.rules)


def test_user_config_outgoing(user_config: Config) -> None:
    rw = without_pipe_rule(user_config)
    for char, escaped in ESCAPED.items():
        assert one(rw, f"a{char}b") == f"a{escaped}b"
    assert one(rw, "don't") == "don\\u2019t"
    # in the JSON sent upstream that single backslash is written as two
    body = orjson.dumps({"messages": [{"role": "user", "content": "don't"}]})
    assert b'"don\\\\u2019t"' in rw.rewrite_request(body).body
    # only user messages
    assert one(rw, "don't", role="assistant") == "don't"


def test_user_config_second_apostrophe_rule_never_fires(user_config: Config) -> None:
    """Rules 0 and 1 both match ASCII ' (the curly quote was lost); rule 0 wins."""
    rw = without_pipe_rule(user_config)
    payload: dict[str, Any] = {"messages": [{"role": "user", "content": "it's"}]}
    assert rw.rewrite_messages(payload).counts[:2] == [1, 0]


def test_user_config_pipe_rule_matches_everywhere(user_config: Config) -> None:
    """Rule 9's pattern is an unescaped "|", which matches the empty string: it
    inserts \\u007c before and after every character (a literal "|" is left alone),
    including inside the escapes earlier rules produced. The config loader warns."""
    rw = Rewriter.from_config(user_config)
    assert one(rw, "ab") == "\\u007ca\\u007cb\\u007c"
    assert one(rw, "a|b") == "\\u007ca\\u007c|\\u007cb\\u007c"
    sent = one(rw, "it's")
    assert sent == "\\u007c".join(["", "i", "t", "\\", "u", "2", "0", "1", "9", "s", ""])
    # the reply rules turn every \u007c back into a pipe
    back, _ = rw.rewrite_text(sent, response=True)
    assert back == "|i|t|\\|u|2|0|1|9|s|"
    warnings = load_config(LEGACY_CONFIG).warnings
    assert any("regex_replacement.rules[9].pattern" in w for w in warnings)


def test_user_config_response_rules(user_config: Config) -> None:
    rw = Rewriter.from_config(user_config)

    def reply(text: str) -> str:
        return rw.rewrite_text(text, response=True)[0]

    for char, escaped in ESCAPED.items():
        expected = {"“": '"', "”": '"'}.get(char, char)
        assert reply(escaped) == expected  # \u2019 (one backslash in the text) -> '
    # The rules described as "double backslash" are so in YAML only: they match the
    # text \u2014 with one backslash. With two, one is left over, except before an
    # apostrophe, which the last-but-one rule cleans up.
    assert reply("\\\\u2014") == "\\—"
    assert reply("\\\\u2019") == "'"
    assert reply("don\\u2019t") == "don't"
    assert reply("a ‘b’ “c”") == "a 'b' \"c\""  # curly quotes in replies become straight
    assert reply("x \\u00e2\\u20ac\\u201d y") == "x - y"  # mojibake, escaped
    assert reply("x â€” y") == "x - y"  # mojibake, literal characters
    assert reply('x â€" y') == "x — y"
    assert reply('it\\\'s \\"ok\\"') == 'it\'s "ok"'


def test_user_config_round_trip(user_config: Config) -> None:
    """Out with the user rules, back with the reply rules: the original text,
    except that curly double quotes come back straight."""
    rw = without_pipe_rule(user_config)
    text = "Don't — well – a-b/c `code` [x] it's “quoted” 'single'"
    sent = one(rw, text)
    assert not any(c in sent for c in "'—–-/`[]“”")
    back, _ = rw.rewrite_text(sent, response=True)
    assert back == text.replace("“", '"').replace("”", '"')


def test_user_config_stream_equals_whole(user_config: Config) -> None:
    rw = Rewriter.from_config(user_config)
    text = (
        'He said \\u2019hi\\u2019 \\\\u2014 then \\u00e2\\u20ac\\u201d and â€" '
        "\\u005bx\\u005d \\u002d end \\'q\\' "
    ) * 2
    whole, _ = rw.rewrite_text(text, response=True)
    assert "\\u" not in whole
    for at in range(len(text) + 1):
        assert stream_text(rw, [text[:at], text[at:]]) == whole
    for parts in splits(text, 5, seed=1):
        assert stream_text(rw, parts) == whole


# -- trying rules -----------------------------------------------------------------


def test_trial_report(user_config: Config) -> None:
    report = trial(user_config, "it's a-b")
    lines = report.splitlines()
    assert lines[0] == "regex_replacement on a user message:"
    assert "\\u007ci\\u007ct\\u007c" in lines[2]
    assert any(line.startswith("As sent in JSON: ") and "\\\\u007c" in line for line in lines)
    assert (
        "  rules[0] Escape apostrophe as \\u2019 (two backslashes in YAML): 1 replacement" in lines
    )
    assert "  rules[6] Escape hyphen as \\u002d (two backslashes in YAML): 1 replacement" in lines
    assert not any(line.startswith("  rules[1]") for line in lines)
    assert lines[-1].startswith("Total: ")


def test_trial_response_and_timeout() -> None:
    config = parse_config(
        {
            "response_processing": {
                "timeout_ms": 20,
                "rules": [
                    {"pattern": "(a|aa)+$", "replacement": "X", "description": "runaway"},
                    {"pattern": "b", "replacement": "B"},
                ],
            }
        },
        base_dir=Path.cwd(),
        env={},
    ).config
    report = trial(config, CATASTROPHIC, response=True)
    assert report.splitlines()[2] == "a" * 40 + "B"
    assert "  rules[1]: 1 replacement" in report
    assert "Total: 1 replacement(s)" in report
    assert "Timeout: response_processing.rules[0] (runaway) timed out; skipped" in report


@pytest.mark.parametrize("repeat", [1, 20])  # a short chat (substring searches), a long one (regex)
def test_literal_scan_finds_exactly_the_literals_present(repeat: int) -> None:
    from first_hop_proxy.rewrite import SHORT_TEXT, _occurring

    text = ("It’s late — don’t “go”; a–b " + "plain words " * 40) * repeat
    assert (len(text) > SHORT_TEXT) == (repeat > 1)
    literals = ["’", "—", "“", "”", "–", ";", "absent", "zz", "\u2026", "late"]
    assert _occurring(text, literals) == {lit for lit in literals if lit in text}
    assert _occurring(text, ["absent", "\u2026"]) == set()
