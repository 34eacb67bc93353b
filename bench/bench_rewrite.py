"""How much the rewrite rules cost: per request, and per streamed event.

Run: .venv/bin/python bench/bench_rewrite.py
Figures are the best of several runs. Targets: under 10 ms for 100 rules over
200 messages (500 KB); under 1 ms per stream event with 64 reply rules.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from first_hop_proxy.config import MessageRule, RewriteRule, load_config
from first_hop_proxy.rewrite import Rewriter

RULES_CONFIG = Path(__file__).resolve().parents[1] / "tests" / "data" / "legacy-config.yaml"
PROSE = (
    "the quick brown fox don't jump — over it's lazy dog's [bracket] a-b /path/ `code` "
    "“quoted” well – then said she and he ran away from home into the night"
)
WORDS = PROSE.split()


def chat_text(rnd: random.Random, chars: int) -> str:
    words: list[str] = []
    size = 0
    while size < chars:
        word = rnd.choice(WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[:chars]


def request_rules(regexes: int) -> list[MessageRule]:
    """The user's 11 sane outgoing rules, then literals and ``regexes`` real regexes: 100."""
    config = load_config(RULES_CONFIG).config
    rules = [r for r in config.regex_replacement.rules if r.pattern != "|"]
    for i in range(regexes):
        if i % 3 == 2:
            rules.append(MessageRule(pattern=rf"(?<=\s)x{i}+y", replacement="", apply_to="user"))
        else:
            rules.append(
                MessageRule(pattern=rf"\b(zeta{i})\s+(\w+)", replacement=r"\2 \1", flags="i")
            )
    for i in range(100 - len(rules)):
        rules.append(MessageRule(pattern=f"word{i}", replacement=f"w{i}", apply_to="all"))
    return rules


def response_rules() -> list[RewriteRule]:
    """The user's 49 reply rules plus 15 regexes: 64."""
    config = load_config(RULES_CONFIG).config
    rules = list(config.response_processing.rules)
    for i in range(15):
        rules.append(RewriteRule(pattern=rf"(\w+)_{i}\b", replacement=r"\1-{i}"))
    return rules


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    fn()  # warm up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench_request() -> None:
    rnd = random.Random(7)
    roles = ["system", "user", "assistant"]
    messages = [
        {"role": roles[min(i, 1 + i % 2)], "content": chat_text(rnd, 2500)} for i in range(200)
    ]
    body = orjson.dumps({"model": "m", "messages": messages, "stream": True})
    for regexes in (10, 30):
        rules = request_rules(regexes)
        rewriter = Rewriter(rules)
        print(
            f"request: {len(rules)} rules ({len(rules) - regexes} literal, {regexes} regex), "
            f"{len(messages)} messages, {len(body) / 1000:.0f} KB body"
        )
        parsed = timed(lambda rw=rewriter: rw.rewrite_messages(orjson.loads(body)), 30)
        parse_only = timed(lambda: orjson.loads(body), 30)
        full = timed(lambda rw=rewriter: rw.rewrite_request(body), 30)
        rewrite_ms = (min(parsed) - min(parse_only)) * 1000
        print(f"  rules on a parsed payload: {rewrite_ms:6.2f} ms")
        print(f"  rewrite_request (parse, rules, serialize): {min(full) * 1000:6.2f} ms")
    untouched = Rewriter([MessageRule(pattern="never-present", replacement="x")])
    quiet = timed(lambda: untouched.rewrite_request(body), 30)
    print(f"  one rule that never matches (parse only): {min(quiet) * 1000:6.2f} ms")


def bench_stream() -> None:
    rnd = random.Random(3)
    text = chat_text(rnd, 20000).replace("'", "\\u2019").replace("—", "\\u2014")
    pieces: list[str] = []
    i = 0
    while i < len(text):
        n = rnd.randint(1, 12)  # a few tokens per event
        pieces.append(text[i : i + n])
        i += n
    chunks = [
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}],
        }
        for p in pieces
    ]
    rules = response_rules()
    rewriter = Rewriter((), rules)
    print(f"stream: {len(rules)} reply rules, {len(chunks)} events, max_match_chars 64")

    def run() -> None:
        stream = rewriter.stream()
        for c in chunks:
            stream.feed(
                dict(c, choices=[dict(c["choices"][0], delta=dict(c["choices"][0]["delta"]))])
            )
        stream.flush()

    def copy_only() -> None:
        for c in chunks:
            dict(c, choices=[dict(c["choices"][0], delta=dict(c["choices"][0]["delta"]))])

    total = min(timed(run, 5)) - min(timed(copy_only, 5))
    print(f"  per event: {total / len(chunks) * 1e6:6.1f} µs")
    only_literal = Rewriter((), load_config(RULES_CONFIG).config.response_processing.rules)
    stream = only_literal.stream()
    start = time.perf_counter()
    for c in chunks:
        stream.feed(dict(c, choices=[dict(c["choices"][0], delta=dict(c["choices"][0]["delta"]))]))
    stream.flush()
    elapsed = time.perf_counter() - start
    print(f"  the user's 49 rules alone, per event: {elapsed / len(chunks) * 1e6:6.1f} µs")


if __name__ == "__main__":
    bench_request()
    bench_stream()
