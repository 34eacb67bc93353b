"""Rewrite rules: outgoing message text and reply text, streamed replies included.

Rules come from ``regex_replacement`` (outgoing, per role) and
``response_processing`` (replies). They compile once into a :class:`Rewriter`;
a request costs no compilation. Semantics are those of Python's ``re.sub``
applied rule after rule; the ``regex`` package (in ``V0``, re-compatible mode)
does the matching because it can stop a runaway pattern: each rule gets
``timeout_ms`` per text, and a rule that runs out is skipped for that text and
reported as a :class:`RuleTimeout`, so a bad rule never freezes the proxy.
A pattern without repetition or backreferences cannot run away and runs with
no limit (checking one costs more than the match).

Request path (the server parses the body once)::

    rewriter = Rewriter.from_config(config)          # at startup
    if rewriter.has_request_rules:
        result = await rewriter.rewrite_messages_async(payload)   # mutates payload
        body = orjson.dumps(payload) if result.changed else raw_body
        # write result.timeouts to the error log

or, from the raw bytes, ``await rewriter.rewrite_request_async(raw_body)``:
``result.body is raw_body`` when nothing changed. Both ``*_async`` methods run
the rules in a worker thread so a slow rule cannot stall the event loop, and
return at once, with no thread hop, when there are no rules.

Stream path (one :class:`StreamRewriter` per response)::

    stream = rewriter.stream()
    for chunk in parsed_chunks:
        for out in stream.feed(chunk):
            send(b"data: " + orjson.dumps(out) + b"\\n\\n")
    for out in stream.flush():
        send(...)
    send(b"data: [DONE]\\n\\n")
"""

from __future__ import annotations

import asyncio
import functools
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import regex  # type: ignore[import-untyped, unused-ignore]

from .config import ROLES, Config, MessageRule, RewriteRule, compile_flags, template_problem
from .patterns import VERBOSE as _VERBOSE
from .patterns import RuleTimeout
from .patterns import bounded as _bounded
from .patterns import class_end as _class_end

REQUEST_SECTION = "regex_replacement"
RESPONSE_SECTION = "response_processing"

_META = frozenset(".^$*+?{}[]()|\\")
_CONTROL_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a"}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}
_ASSERTION_ESCAPES = frozenset("AZbB")
_UNSURE_ESCAPES = frozenset("GKmMz")
_LOOKAROUNDS = ("(?=", "(?!", "(?<=", "(?<!")
_QUANTIFIERS = frozenset("*+?{")


@dataclass(slots=True)
class Rewrite:
    """What one pass of the rules did.

    ``counts[i]`` is the number of replacements rule ``i`` made; ``changed`` is
    true only when some text actually differs (a rule may replace a match with
    itself).
    """

    counts: list[int]
    timeouts: list[RuleTimeout] = field(default_factory=list)
    changed: bool = False

    @property
    def replacements(self) -> int:
        return sum(self.counts)


@dataclass(slots=True)
class BodyRewrite(Rewrite):
    """A rewritten JSON body: the original bytes object when nothing changed."""

    body: bytes = b""


@dataclass(frozen=True, slots=True)
class _Rule:
    index: int
    description: str
    pattern: regex.Pattern[str]
    template: str
    # Set when the pattern matches exactly this text and nothing else: the rule
    # then runs as str.replace, which is linear and needs no time limit.
    literal: str | None
    literal_out: str
    # Matches wherever this rule matches, context aside: no match for it in all
    # texts joined proves the rule has nothing to do in any of them.
    prefilter: regex.Pattern[str] | None
    # The pattern cannot run away (see _bounded): it runs with no time limit,
    # whose checks cost the regex module about five times the match itself.
    bounded: bool
    # For a pattern that matches only the empty string, everywhere (``|``): the
    # text it inserts at every position, so the rule runs as one str.join.
    everywhere: str | None


def _everywhere(pattern: regex.Pattern[str], source: str, template: str) -> str | None:
    """What a pattern made only of empty alternatives (``|``, ``(|)``) inserts at each position."""
    if not source or source.strip("|()"):
        return None
    if pattern.search("") is None:
        return None
    return str(pattern.sub(template, ""))


def _literal_of(pattern: str, flags: str) -> str | None:
    """The one text ``pattern`` matches when it is a plain literal, else None."""
    if "i" in flags or "x" in flags:
        return None
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch != "\\":
            if ch in _META:
                return None
            out.append(ch)
            i += 1
            continue
        nxt = pattern[i + 1 : i + 2]
        if nxt in _CONTROL_ESCAPES:
            out.append(_CONTROL_ESCAPES[nxt])
            i += 2
        elif nxt in _HEX_ESCAPES:
            digits = pattern[i + 2 : i + 2 + _HEX_ESCAPES[nxt]]
            if len(digits) != _HEX_ESCAPES[nxt] or not all(c in string.hexdigits for c in digits):
                return None
            code = int(digits, 16)
            if code > 0x10FFFF:
                return None
            out.append(chr(code))
            i += 2 + len(digits)
        elif nxt and nxt.isascii() and not nxt.isalnum():
            out.append(nxt)
            i += 2
        else:
            return None
    return "".join(out) or None


def _compile_rule(index: int, rule: RewriteRule) -> _Rule:
    problem = template_problem(rule.pattern, rule.flags, rule.replacement)
    if problem:
        raise ValueError(problem)
    pattern = regex.compile(rule.pattern, compile_flags(rule.flags))
    literal = _literal_of(rule.pattern, rule.flags)
    if literal is not None and pattern.fullmatch(literal) is None:
        literal = None  # the parser above is conservative; this keeps it honest
    literal_out = pattern.sub(rule.replacement, literal) if literal is not None else ""
    relaxed = None if literal is not None else _relaxed(rule.pattern, rule.flags)
    prefilter = None
    if relaxed == rule.pattern:
        prefilter = pattern
    elif relaxed is not None:
        try:
            prefilter = regex.compile(relaxed, compile_flags(rule.flags))
        except regex.error:
            prefilter = None
    return _Rule(
        index,
        rule.description,
        pattern,
        rule.replacement,
        literal,
        literal_out,
        prefilter,
        bounded=literal is not None or _bounded(rule.pattern, rule.flags),
        everywhere=_everywhere(pattern, rule.pattern, rule.replacement),
    )


def _relaxed(pattern: str, flags: str) -> str | None:
    """``pattern`` without its anchors and lookarounds, or None when unsure.

    Dropping a zero-width assertion only lets more text match, and what is
    left matches a text the same wherever the text sits. So when the relaxed
    pattern finds nothing in all texts joined, the rule matches none of them:
    one scan instead of one call per message.
    """
    if "x" in flags or _VERBOSE.search(pattern) or "(?(" in pattern:
        return None
    out: list[str] = []
    depth = 0
    dropping = 0  # depth of the lookaround being dropped, 0 when none
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        dropped = False
        if ch == "\\":
            token = pattern[i : i + 2]
            if token[1:] in _UNSURE_ESCAPES:
                return None
            dropped = token[1:] in _ASSERTION_ESCAPES
        elif ch == "[":
            token = pattern[i : _class_end(pattern, i)]
        elif ch == "(":
            depth += 1
            look = next((x for x in _LOOKAROUNDS if pattern.startswith(x, i)), None)
            token = look or "("
            if look and not dropping:
                dropping = depth
        elif ch == ")":
            token = ")"
            if dropping == depth:
                dropping, dropped = 0, True
            depth -= 1
        else:
            token = ch
            dropped = ch in "^$"
        i += len(token)
        if dropping or dropped:
            if dropped and pattern[i : i + 1] in _QUANTIFIERS:
                return None  # the quantifier would fall onto the previous atom
            continue
        out.append(token)
    return "".join(out)


@functools.lru_cache(maxsize=256)
def _any_of(options: frozenset[str]) -> regex.Pattern[str]:
    # Cached: the same rules over similar chats ask for the same sets again.
    return regex.compile(r"\L<options>", regex.V0, options=sorted(options))


#: Up to this many literals, ``_occurring`` checks each with ``in`` instead of one regex.
FEW_LITERALS = 4
#: ... and on a text up to this long, whatever their number: a substring search
#: each was 20x faster than the regex on a 1.3 KB chat (1 us against 20 us, 11
#: literals); on long texts the one regex scan wins when many literals are absent.
SHORT_TEXT = 8192


def _occurring(text: str, literals: Iterable[str]) -> set[str]:
    """Which of ``literals`` occur in ``text``, in about one scan however many there are."""
    remaining = set(literals)
    if len(remaining) <= FEW_LITERALS or len(text) <= SHORT_TEXT:
        return {literal for literal in remaining if literal in text}
    found: set[str] = set()
    pos = 0
    while remaining:
        m = _any_of(frozenset(remaining)).search(text, pos)
        if m is None:
            break
        found.add(m.group())
        remaining.discard(m.group())
        pos = m.start()  # nothing left to find before here
    return found


def _compile_rules(section: str, rules: Sequence[RewriteRule]) -> tuple[_Rule, ...]:
    compiled: list[_Rule] = []
    problems: list[str] = []
    for i, rule in enumerate(rules):
        try:
            compiled.append(_compile_rule(i, rule))
        except ValueError as exc:
            problems.append(f"{section}.rules[{i}].replacement: {exc}")
    if problems:
        raise ValueError("; ".join(problems))
    return tuple(compiled)


def _separator(rules: Iterable[_Rule]) -> str:
    """A character no literal rule can match or produce, to join texts with."""
    used = "".join(f"{r.literal}{r.literal_out}" for r in rules if r.literal is not None)
    for code in range(1, 32):
        if chr(code) not in used and chr(code) not in "\t\n\r":
            return chr(code)
    return "\uffff"


class _Holdback:
    """For literal rules only: how much of a stream's pending text must wait.

    A match that could still grow past the end of the text so far must begin
    where the text's remainder is the start of some literal. When a rule's
    output contains a character that begins a literal, a later rule could match
    across that output, so any such character (or a literal's first one) counts.
    """

    __slots__ = ("candidates", "chained", "literals")

    def __init__(self, rules: tuple[_Rule, ...]) -> None:
        self.literals = tuple({r.literal for r in rules if r.literal})
        firsts = {lit[0] for lit in self.literals}
        outputs = {c for r in rules for c in r.literal_out}
        self.chained = bool(firsts & outputs)
        chars = firsts | outputs if self.chained else firsts
        self.candidates: regex.Pattern[str] | None = (
            regex.compile("[" + "".join(regex.escape(c) for c in sorted(chars)) + "]")
            if chars
            else None
        )

    def start(self, raw: str, window: int) -> int:
        """Where the held-back part of ``raw`` begins (``len(raw)``: nothing held)."""
        if self.candidates is None:
            return len(raw)
        for found in self.candidates.finditer(raw, max(window, 0)):
            at = found.start()
            if self.chained:
                return at
            rest = raw[at:]
            if any(len(lit) > len(rest) and lit.startswith(rest) for lit in self.literals):
                return at
        return len(raw)


class _Engine:
    """One section's compiled rules and how to run them over a batch of texts."""

    __slots__ = (
        "all_bounded",
        "all_literal",
        "holdback",
        "matches_empty",
        "rules",
        "section",
        "separator",
        "timeout",
    )

    def __init__(self, section: str, rules: tuple[_Rule, ...], timeout_ms: float) -> None:
        self.section = section
        self.rules = rules
        self.timeout = timeout_ms / 1000
        self.separator = _separator(rules)
        self.all_literal = all(r.literal is not None for r in rules)
        self.all_bounded = all(r.bounded for r in rules)
        self.holdback = _Holdback(rules) if self.all_literal else None
        # A rule that matches the empty string also matches at the end of a stream's text.
        self.matches_empty = any(r.pattern.search("") is not None for r in rules)

    def run(
        self, texts: list[str], rules: tuple[_Rule, ...], report: Rewrite, role: str | None
    ) -> list[str]:
        """Apply ``rules`` in order to every text; counts and timeouts go to ``report``.

        Literal rules run once over all texts joined by a separator character
        they cannot touch, which is what keeps a long chat with many rules cheap.
        """
        counts = report.counts
        timeout = self.timeout
        sep = self.separator
        # With several texts, literal rules and prefilters work on them joined by
        # sep; `texts` is re-split from `joined` only when a rule needs it.
        joined: str | None = None
        split_needed = False
        can_join = True  # one text too: the literal scan below beats a count per rule
        present: set[str] | None = None  # literals that may occur in joined
        for position, rule in enumerate(rules):
            if joined is None and can_join:
                joined = sep.join(texts)
                if joined.count(sep) != len(texts) - 1:
                    joined, can_join = None, False  # a text holds sep: go text by text
            literal = rule.literal
            if literal is not None:
                if joined is None:
                    for i, text in enumerate(texts):
                        n = text.count(literal)
                        if n:
                            counts[rule.index] += n
                            texts[i] = text.replace(literal, rule.literal_out)
                    continue
                if present is None:
                    present = _occurring(joined, _literals(rules[position:]))
                if literal not in present:
                    continue
                out = rule.literal_out
                if len(out) == len(literal):
                    n = joined.count(literal)
                    replaced = joined.replace(literal, out) if n else joined
                else:  # one scan, not two: the length change gives the count
                    replaced = joined.replace(literal, out)
                    n = (len(replaced) - len(joined)) // (len(out) - len(literal))
                if n:
                    counts[rule.index] += n
                    joined = replaced
                    split_needed = True
                    if not out:
                        present = None  # a deletion joins text: anything may appear
                    else:
                        present.update(
                            x for x in _literals(rules[position:]) if _may_create(out, x)
                        )
                continue
            limit = None if rule.bounded else timeout
            if rule.prefilter is not None and joined is not None:
                try:
                    if rule.prefilter.search(joined, timeout=limit) is None:
                        continue
                except TimeoutError:
                    pass  # undecided: try each text under its own limit
            if split_needed and joined is not None:
                texts, split_needed = joined.split(sep), False
            for i, text in enumerate(texts):
                if rule.everywhere is not None:
                    new, n = _insert_everywhere(text, rule.everywhere), len(text) + 1
                    counts[rule.index] += n
                    texts[i] = new
                    joined, present = None, None
                    continue
                try:
                    new, n = rule.pattern.subn(rule.template, text, timeout=limit)
                except TimeoutError:
                    report.timeouts.append(
                        RuleTimeout(self.section, rule.index, rule.description, role)
                    )
                    continue
                if n:
                    counts[rule.index] += n
                    texts[i] = new
                    joined, present = None, None
        if split_needed and joined is not None:
            texts = joined.split(sep)
        return texts


def _insert_everywhere(text: str, inserted: str) -> str:
    """``re.sub`` of a pattern matching only the empty string: ``inserted`` at every position."""
    return inserted + inserted.join(text) + inserted if text else inserted


@functools.lru_cache(maxsize=4096)
def _may_create(inserted: str, literal: str) -> bool:
    """Whether inserting ``inserted`` into a text can make ``literal`` occur in it.

    A new occurrence must overlap the inserted text: contain it, lie inside
    it, or share an edge with it.
    """
    if inserted in literal or literal in inserted:
        return True
    return any(
        inserted.endswith(literal[:k]) or inserted.startswith(literal[-k:])
        for k in range(1, min(len(inserted), len(literal)))
    )


def _literals(rules: Iterable[_Rule]) -> list[str]:
    return [r.literal for r in rules if r.literal is not None]


def _text_slots(message: dict[str, Any]) -> list[tuple[Any, Any]]:
    """(container, key) of every rewritable text in a message's ``content``:
    the content itself when it is a string, else its text parts."""
    content = message.get("content")
    if isinstance(content, str):
        return [(message, "content")]
    slots: list[tuple[Any, Any]] = []
    if isinstance(content, list):
        for part in content:
            if (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                slots.append((part, "text"))
    return slots


def _rewrite_body(
    body: bytes, rule_count: int, rewrite: Callable[[dict[str, Any]], Rewrite]
) -> BodyRewrite:
    """Parse ``body``, ``rewrite`` the payload in place, serialize once only if it changed."""
    result = BodyRewrite([0] * rule_count, body=body)
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return result
    if not isinstance(payload, dict):
        return result
    report = rewrite(payload)
    result.counts, result.timeouts, result.changed = report.counts, report.timeouts, report.changed
    if report.changed:
        result.body = orjson.dumps(payload)
    return result


class Rewriter:
    """Both rule sections, compiled once; safe to share between requests and threads."""

    def __init__(
        self,
        request_rules: Sequence[MessageRule] = (),
        response_rules: Sequence[RewriteRule] = (),
        *,
        request_timeout_ms: float = 100,
        response_timeout_ms: float = 100,
        max_match_chars: int = 64,
    ) -> None:
        self._request = _Engine(
            REQUEST_SECTION, _compile_rules(REQUEST_SECTION, request_rules), request_timeout_ms
        )
        self._response = _Engine(
            RESPONSE_SECTION,
            _compile_rules(RESPONSE_SECTION, response_rules),
            response_timeout_ms,
        )
        self.max_match_chars = max_match_chars
        self._request_count = len(request_rules)
        self._response_count = len(response_rules)
        roles: dict[str, tuple[_Rule, ...]] = {}
        for role in sorted(ROLES - {"all"}):
            roles[role] = tuple(
                c
                for c, r in zip(self._request.rules, request_rules, strict=True)
                if role in r.roles or "all" in r.roles
            )
        self._by_role = roles
        self._any_role = tuple(
            c for c, r in zip(self._request.rules, request_rules, strict=True) if "all" in r.roles
        )
        self.has_request_rules = bool(request_rules)
        self.has_response_rules = bool(response_rules)

    @classmethod
    def from_config(cls, config: Config, *, include_disabled: bool = False) -> Rewriter:
        """The rewriter for ``config``; a section with ``enabled: false`` has no rules.

        Raises ValueError naming the rule when a replacement refers to a group
        its pattern does not have.
        """
        req, resp = config.regex_replacement, config.response_processing
        return cls(
            req.rules if req.enabled or include_disabled else (),
            resp.rules if resp.enabled or include_disabled else (),
            request_timeout_ms=req.timeout_ms,
            response_timeout_ms=resp.timeout_ms,
            max_match_chars=resp.max_match_chars,
        )

    def _rules_for(self, role: Any) -> tuple[_Rule, ...]:
        return self._by_role.get(role, self._any_role) if isinstance(role, str) else self._any_role

    # -- requests -----------------------------------------------------------------

    def rewrite_messages(self, payload: dict[str, Any]) -> Rewrite:
        """Rewrite ``payload["messages"]`` in place: string content and text parts.

        Image parts and every other field stay as they are. Serialize the
        payload again only when ``result.changed``.
        """
        report = Rewrite([0] * self._request_count)
        messages = payload.get("messages")
        if not self.has_request_rules or not isinstance(messages, list):
            return report
        groups: dict[str, list[tuple[Any, Any]]] = {}
        for message in messages:
            if not isinstance(message, dict):
                continue
            role = message.get("role")
            key = role if isinstance(role, str) and role in self._by_role else ""
            if not self._rules_for(role):
                continue
            groups.setdefault(key, []).extend(_text_slots(message))
        for key, slots in groups.items():
            report.changed |= self._run_slots(
                self._request, slots, self._rules_for(key or None), report, key or None
            )
        return report

    def rewrite_request(self, body: bytes) -> BodyRewrite:
        """Rewrite a request body; ``result.body is body`` when nothing changed.

        A body that is not a JSON object passes untouched: the server answers it.
        """
        if not self.has_request_rules:
            return BodyRewrite([0] * self._request_count, body=body)
        return _rewrite_body(body, self._request_count, self.rewrite_messages)

    async def rewrite_messages_async(
        self, payload: dict[str, Any], size: int | None = None
    ) -> Rewrite:
        """:meth:`rewrite_messages` off the event loop when it could take long.

        ``size`` is the body's length in bytes, if known. Bounded rules (literals,
        and patterns without repetition: see ``_bounded``) are linear and cannot run
        away, so on a body of up to ``INLINE_BYTES`` they run inline: a thread hop
        would cost more than the work. Otherwise a worker thread.
        """
        if not self.has_request_rules:
            return Rewrite([0] * self._request_count)
        if self._request.all_bounded and size is not None and size <= INLINE_BYTES:
            return self.rewrite_messages(payload)
        return await asyncio.to_thread(self.rewrite_messages, payload)

    async def rewrite_request_async(self, body: bytes) -> BodyRewrite:
        """:meth:`rewrite_request`, inline or in a worker thread as for messages."""
        if not self.has_request_rules:
            return BodyRewrite([0] * self._request_count, body=body)
        if self._request.all_bounded and len(body) <= INLINE_BYTES:
            return self.rewrite_request(body)
        return await asyncio.to_thread(self.rewrite_request, body)

    # -- replies ------------------------------------------------------------------

    def rewrite_response_payload(self, payload: dict[str, Any]) -> Rewrite:
        """Rewrite ``choices[].message.content`` of a parsed reply, in place."""
        report = Rewrite([0] * self._response_count)
        choices = payload.get("choices")
        if not self.has_response_rules or not isinstance(choices, list):
            return report
        slots: list[tuple[Any, Any]] = []
        for choice in choices:
            message = choice.get("message") if isinstance(choice, dict) else None
            if isinstance(message, dict):
                slots.extend(_text_slots(message))
        report.changed = self._run_slots(self._response, slots, self._response.rules, report, None)
        return report

    def rewrite_response(self, body: bytes) -> BodyRewrite:
        """Rewrite a non-streaming reply body; ``result.body is body`` when unchanged."""
        if not self.has_response_rules:
            return BodyRewrite([0] * self._response_count, body=body)
        return _rewrite_body(body, self._response_count, self.rewrite_response_payload)

    async def rewrite_response_async(self, body: bytes) -> BodyRewrite:
        """:meth:`rewrite_response`, inline or in a worker thread as for messages."""
        if not self.has_response_rules:
            return BodyRewrite([0] * self._response_count, body=body)
        if self._response.all_bounded and len(body) <= INLINE_BYTES:
            return self.rewrite_response(body)
        return await asyncio.to_thread(self.rewrite_response, body)

    def stream(self) -> StreamRewriter:
        """A fresh :class:`StreamRewriter` for one streamed reply."""
        return StreamRewriter(self._response, self.max_match_chars)

    # -- single texts ---------------------------------------------------------------

    def rewrite_text(
        self, text: str, *, role: str = "user", response: bool = False
    ) -> tuple[str, Rewrite]:
        """One text through the outgoing rules for ``role`` (or the reply rules)."""
        engine = self._response if response else self._request
        rules = self._response.rules if response else self._rules_for(role)
        report = Rewrite([0] * (self._response_count if response else self._request_count))
        [new] = engine.run([text], rules, report, None if response else role)
        report.changed = new != text
        return new, report

    @staticmethod
    def _run_slots(
        engine: _Engine,
        slots: list[tuple[Any, Any]],
        rules: tuple[_Rule, ...],
        report: Rewrite,
        role: str | None,
    ) -> bool:
        if not slots or not rules:
            return False
        before = [container[key] for container, key in slots]
        after = engine.run(list(before), rules, report, role)
        changed = False
        for (container, key), old, new in zip(slots, before, after, strict=True):
            if new != old:
                container[key] = new
                changed = True
        return changed


#: Bounded rules on a body up to this size run inline instead of in a worker thread.
INLINE_BYTES = 65536


# -- streams ----------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    """One choice's text not yet sent, and what the rules need to continue it."""

    raw: str = ""
    last: dict[str, Any] | None = None
    # Per non-literal rule: the tail of the text that rule has already passed,
    # so lookbehinds and \b see across event boundaries.
    context: dict[int, str] = field(default_factory=dict)


class StreamRewriter:
    """Reply rules over a stream of parsed chunks, for one response.

    Each choice's text is held back by up to ``max_match_chars`` characters so
    a match split across events is still replaced; the rest goes out at once.
    The concatenated text equals what the rules make of the whole reply as
    long as no match (or lookaround) is longer than ``max_match_chars``; a
    longer match can be missed when it spans events.

    How: the rules run over the pending raw text, tracking where the cut
    ``len(raw) - max_match_chars`` lands in the text after each rule. If no
    rule's match straddles the cut, the rewritten text before the cut is final
    and the raw text after it stays pending; otherwise the cut moves left and
    the pass repeats. The emitted part is thus never rewritten again.
    """

    def __init__(self, engine: _Engine, max_match_chars: int) -> None:
        self._engine = engine
        self._rules = engine.rules
        self._hold = max(0, max_match_chars)
        self._context_chars = max(self._hold, 32)
        # Beyond this much pending text, stop waiting for a clean cut and send it.
        self._valve = max(4 * self._hold, 256)
        self._choices: dict[Any, _Pending] = {}
        self._timed_out: set[int] = set()
        self.timeouts: list[RuleTimeout] = []
        self.enabled = bool(engine.rules)

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """The chunks to send for ``chunk``, in order; ``chunk`` may be edited in place.

        Held-back text is flushed before a chunk that ends a choice or carries
        something other than text for it (finish_reason, tool_calls), and
        before a chunk without choices (usage, error). A chunk whose only
        payload was text that is all held back is dropped: its text goes out
        with a later chunk.
        """
        if not self.enabled:
            return [chunk]
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices:
            out = self.flush()
            out.append(chunk)
            return out
        before: list[dict[str, Any]] = []
        droppable = chunk.get("usage") is None
        for choice in choices:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                droppable = False
                continue
            index = choice.get("index", 0)
            text = delta.get("content")
            ending = choice.get("finish_reason") is not None or any(
                v is not None for k, v in delta.items() if k not in ("content", "role")
            )
            if not isinstance(text, str) or not text:
                droppable = False
                state = self._choices.get(index)
                if ending and state is not None:
                    del self._choices[index]
                    flushed = self._flush_chunk(index, state)
                    if flushed is not None:
                        before.append(flushed)
                continue
            state = self._choices.get(index)
            if state is None:
                state = self._choices[index] = _Pending()
            state.raw += text
            state.last = chunk
            if ending:
                del self._choices[index]
            sent = self._advance(state, final=ending)
            delta["content"] = sent
            if sent or ending or delta.get("role") is not None or choice.get("logprobs"):
                droppable = False
        if not droppable:
            before.append(chunk)
        return before

    def flush(self) -> list[dict[str, Any]]:
        """Chunks carrying every choice's held-back text; send them before ``[DONE]``."""
        out: list[dict[str, Any]] = []
        for index, state in self._choices.items():
            flushed = self._flush_chunk(index, state)
            if flushed is not None:
                out.append(flushed)
        self._choices.clear()
        return out

    def _flush_chunk(self, index: Any, state: _Pending) -> dict[str, Any] | None:
        """A chunk with the rest of a choice's text, dressed as its last chunk."""
        if not state.raw and not self._engine.matches_empty:
            return None
        text = self._advance(state, final=True)
        if not text:
            return None
        chunk = {k: v for k, v in (state.last or {}).items() if k not in ("choices", "usage")}
        chunk["choices"] = [{"index": index, "delta": {"content": text}, "finish_reason": None}]
        return chunk

    def _advance(self, state: _Pending, *, final: bool) -> str:
        """Rewrite and return what of ``state.raw`` can be sent now."""
        raw = state.raw
        if not final:
            cut = len(raw) - self._hold
            holdback = self._engine.holdback
            if holdback is not None:  # literal rules: hold only what could still match
                cut = holdback.start(raw, cut)
            while cut > 0:
                sent, retry = self._rewrite(state, raw, cut)
                if sent is not None:
                    state.raw = raw[cut:]
                    return sent
                cut = retry
            if len(raw) <= self._valve:
                return ""
        sent, _ = self._rewrite(state, raw, len(raw), final=True)
        state.raw = ""
        return sent or ""

    def _rewrite(
        self, state: _Pending, raw: str, cut: int, *, final: bool = False
    ) -> tuple[str | None, int]:
        """All rules over ``raw``; the rewritten ``raw[:cut]``, or None and a cut to retry.

        Matches that start before the cut are final; one that straddles it
        means the cut must move left: to the match when the match is in raw
        text (the first rule), else by one character. At the end of the text
        (``final``) everything is final.
        """
        text, k = raw, cut
        updates: dict[int, str] = {}
        for stage, rule in enumerate(self._rules):
            literal = rule.literal
            if literal is not None:
                if literal not in text:
                    continue
                width = len(literal)
                if not final:
                    straddle = text.find(literal, max(0, k - width + 1), k + width - 1)
                    if straddle != -1:
                        return None, (straddle if stage == 0 else cut - 1)
                    k += text.count(literal, 0, k) * (len(rule.literal_out) - width)
                text = text.replace(literal, rule.literal_out)
                continue
            context = state.context.get(stage, "")
            updates[stage] = (context + text[:k])[-self._context_chars :]
            try:
                result = self._sub(rule, context + text, len(context), len(context) + k)
            except TimeoutError:
                if rule.index not in self._timed_out:
                    self._timed_out.add(rule.index)
                    self.timeouts.append(
                        RuleTimeout(self._engine.section, rule.index, rule.description, None)
                    )
                continue
            if isinstance(result, int):
                return None, (result if stage == 0 else cut - 1)
            text, k = result
        state.context.update(updates)
        return (text if final else text[:k]), 0

    def _sub(self, rule: _Rule, text: str, start: int, cut: int) -> tuple[str, int] | int:
        """``rule`` over ``text[start:]``; ``text[:start]`` is context only.

        Returns the new ``text[start:]`` and where the cut moved to in it, or,
        when a match straddles the cut, the match's start relative to ``start``.
        An empty match at the cut belongs after it, as it would in one text.
        """
        pieces: list[str] = []
        last = start
        shift = 0
        limit = None if rule.bounded else self._engine.timeout
        for m in rule.pattern.finditer(text, start, timeout=limit):
            s, e = m.span()
            if s < cut < e:
                return s - start
            replacement = m.expand(rule.template)
            pieces.append(text[last:s])
            pieces.append(replacement)
            last = e
            if s < cut:
                shift += len(replacement) - (e - s)
        if not pieces:
            return text[start:], cut - start
        pieces.append(text[last:])
        return "".join(pieces), cut - start + shift


# -- trying rules -------------------------------------------------------------------


def trial(config: Config, text: str, *, role: str = "user", response: bool = False) -> str:
    """A printable report of what the rules do to ``text``: result, counts, timeouts.

    Used by ``first-hop-proxy rewrite``. Rules of a disabled section are still
    tried, with a note, so they can be tested before being switched on.
    """
    rewriter = Rewriter.from_config(config, include_disabled=True)
    section = RESPONSE_SECTION if response else REQUEST_SECTION
    rules: Sequence[RewriteRule] = (
        config.response_processing.rules if response else config.regex_replacement.rules
    )
    enabled = (config.response_processing if response else config.regex_replacement).enabled
    new, report = rewriter.rewrite_text(text, role=role, response=response)
    what = "reply" if response else f"{role} message"
    lines = [f"{section} on a {what}:"]
    if not enabled:
        lines.append(f"(note: {section} is disabled in this config; the proxy does not apply it)")
    lines += ["", new, ""]
    if not response:
        lines += [f"As sent in JSON: {orjson.dumps(new).decode()}", ""]
    for index, count in enumerate(report.counts):
        if count:
            about = f" {rules[index].description}" if rules[index].description else ""
            plural = "" if count == 1 else "s"
            lines.append(f"  rules[{index}]{about}: {count} replacement{plural}")
    lines.append(
        f"Total: {report.replacements} replacement(s)"
        + ("" if report.changed else ", text unchanged")
    )
    for timeout in report.timeouts:
        lines.append(f"Timeout: {timeout}")
    return "\n".join(lines)
