"""What to do with what an upstream attempt produced: the proxy's resilience rules.

:func:`decide` is a pure function from an :class:`Outcome` (what came back),
a :class:`History` (what this request went through so far) and a
:class:`Policy` (the config, compiled once) to a :class:`Decision`: deliver,
retry after a delay, stop, fail, or abandon. It reads no clock, draws no random
number and does no I/O, so every rule is pinned down by table tests and the
forwarding loop stays a thin shell around it.

The rules, first match wins:

1. The client has gone: ABANDON.
2. A hard-stop pattern in the body or a stream error event: HARD_STOP.
3. Status recategorization rules rewrite the status for the rules below.
4. A 2xx carrying an in-band error takes that error's status (an error a
   community proxy sent as the reply text, :mod:`dialects`, included); a 2xx
   with an empty reply is retried on its own budget.
5. ``fail_codes``: FAIL. 6. ``retry_codes``: RETRY within ``max_retries``.
7. ``conditional_retry_codes``: RETRY within ``conditional_retry_max_attempts``.
8. Transport failures: RETRY within ``max_retries``.
9. Any other non-2xx: FAIL. A good 2xx: DELIVER.
"""

from __future__ import annotations

import enum
import html
import http
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal, NamedTuple

import orjson
import regex  # type: ignore[import-untyped, unused-ignore]

from first_hop_proxy.backoff import delay_for, retry_after_from_headers
from first_hop_proxy.config import Config, HardStopRule, RecategorizationRule
from first_hop_proxy.dialects import Disguised, Title, disguised_error
from first_hop_proxy.patterns import RuleTimeout, bounded, required_literal
from first_hop_proxy.quotas import (
    body_retry_delay,
    daily_quota,
    is_google_quota,
    next_pacific_midnight,
    provider_detail,
    unwrap,
)
from first_hop_proxy.redact import clip, redact_text

Budget = Literal["retry", "conditional", "empty"]
ErrorType = Literal[
    "rate_limited",
    "upstream_error",
    "timeout",
    "connection_error",
    "empty_response",
    "hard_stop_error",
    "circuit_open",
    "quota_exhausted",
    "no_key",
]
TransportError = Literal["connection_error", "timeout", "cut_short", "invalid_json", "too_large"]
GiveUp = Literal["retries_exhausted", "time_budget", "retry_after_too_long", "no_key"]
PathPart = str | int
JsonPath = tuple[PathPart, ...]
#: Masks secrets in a text before it is cut: a cut through a key leaves a stump no
#: mask recognizes. The shell passes the request's own (its client's key included).
Mask = Callable[[str], str]
HARD_STOP_SECTION: Final = "error_handling.hard_stop_conditions"
RECATEGORIZATION_SECTION: Final = "response_parsing.status_recategorization"

#: How much of the upstream's own error text is passed on to the person.
MESSAGE_LIMIT: Final = 300
#: How much of a reply that is not JSON is quoted in the reason for retrying it.
SNIPPET_LIMIT: Final = 100
#: Patterns look at the first this-many characters of each text. Error messages
#: are short and come first; a long reply must not cost a backtracking pattern
#: such as ``model.*capacity`` seconds of event-loop time.
SCAN_LIMIT: Final = 8192
#: The status reported for an attempt whose client went away (nginx's convention).
CLIENT_CLOSED: Final = 499


class _Unparsed:
    """Marks :attr:`Outcome.json` as "not parsed yet" (``None`` is valid JSON)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNPARSED"


UNPARSED: Final = _Unparsed()
_NOT_JSON: Final = _Unparsed()


class Action(enum.Enum):
    DELIVER = "deliver"
    RETRY = "retry"
    HARD_STOP = "hard_stop"
    FAIL = "fail"
    ABANDON = "abandon"


# Not frozen, though never changed once made (``replace`` makes changed copies): these
# are made for every attempt, and a frozen dataclass costs an ``object.__setattr__``
# call per field to make (judging a good reply: 12 us -> 7 us, measured).
@dataclass(slots=True)
class Outcome:
    """What one upstream attempt produced, as the forwarding loop saw it.

    ``status`` is None when no HTTP response arrived. ``headers`` are looked up by
    lowercase names (the proxy passes the response's case-blind headers). ``body`` is
    the whole body for a non-streaming reply; for a stream, the SSE data payloads
    received before the first content, joined by "\\n". A stream is judged before
    anything is sent on: ``first_content`` says a content event arrived (the stream can
    be delivered); ``stream`` with no content, no error event and no transport error
    means the stream ended empty, and ``finish_reason`` carries the finish reason it
    reported. ``json`` may hold the already-parsed body (stream: the parsed error event)
    so it is never parsed twice.
    """

    status: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    body: str = ""
    stream: bool = False
    first_content: bool = False
    finish_reason: str | None = None
    stream_error_event: str | None = None
    transport_error: TransportError | None = None
    transport_message: str = ""
    client_gone: bool = False
    json: Any = UNPARSED


@dataclass(slots=True)  # not frozen: see Outcome
class History:
    """What the request went through before this outcome.

    ``attempts`` counts upstream calls including the one being judged; the
    three retry counters are separate budgets; ``elapsed`` is seconds since the
    request began (the caller's clock); ``last_delay`` the previous wait.
    """

    attempts: int = 1
    retries: int = 0
    conditional_retries: int = 0
    empty_retries: int = 0
    elapsed: float = 0.0
    last_delay: float = 0.0

    def after(self, decision: Decision) -> History:
        """The history for the next attempt once ``decision`` (a RETRY) is carried out."""
        budget = decision.budget
        return replace(
            self,
            attempts=self.attempts + 1,
            retries=self.retries + (budget == "retry"),
            conditional_retries=self.conditional_retries + (budget == "conditional"),
            empty_retries=self.empty_retries + (budget == "empty"),
            last_delay=decision.delay,
        )

    def moved_on(self) -> History:
        """The history for an attempt at another upstream after a failure not retried."""
        return replace(self, attempts=self.attempts + 1)

    def at(self, elapsed: float) -> History:
        """The same history, with the time since the request began updated.

        Built directly rather than with ``dataclasses.replace``: this runs on
        every attempt, and ``replace`` introspects the fields each time.
        """
        return History(
            self.attempts,
            self.retries,
            self.conditional_retries,
            self.empty_retries,
            elapsed,
            self.last_delay,
        )


class Recategorized(NamedTuple):
    """A status recategorization rule fired: ``old`` became ``new``."""

    old: int
    new: int
    pattern: str


@dataclass(slots=True)  # not frozen: see Outcome
class Decision:
    """What to do next, and everything the logs and the error reply need.

    ``status`` is the effective upstream status (after recategorization; 502 or
    504 when there was none); ``client_status`` is the status the client should
    get. ``counts_as_failure`` feeds the circuit breaker. ``count`` is the
    number of empty replies in a row (empty_response) or of consecutive
    failures (circuit_open). ``timeouts``: the hard-stop and recategorization
    rules that ran out of time and were skipped, for the shell to log.
    """

    action: Action
    reason: str
    status: int
    client_status: int
    error_type: ErrorType | None = None
    delay: float = 0.0
    budget: Budget | None = None
    retry_after: float | None = None
    recategorized: Recategorized | None = None
    hard_stop_rule: HardStopRule | None = None
    counts_as_failure: bool = False
    upstream_message: str = ""
    upstream_status: int | None = None
    finish_reason: str | None = None
    gave_up: GiveUp | None = None
    original_response: str = ""
    count: int = 0
    #: A daily quota said to be used up (its id, or the words that said so).
    quota: str | None = None
    timeouts: tuple[RuleTimeout, ...] = ()
    #: A delivered JSON reply's ``usage`` object, already parsed here (for the totals).
    usage: dict[str, Any] | None = None

    @property
    def counts_as_success(self) -> bool:
        """The upstream answered (even with a client error): the breaker's success."""
        return not self.counts_as_failure and self.action is not Action.ABANDON


# -- the compiled config ----------------------------------------------------

_FLAGS: Final = regex.IGNORECASE | regex.V0


#: Pattern flags the literal scan does not follow (comments, version 1 syntax, full case folding).
_UNSCANNED_FLAGS: Final = regex.VERBOSE | regex.VERSION1 | regex.FULLCASE


def _needle(pattern: Any) -> str | None:
    """The compiled ``pattern``'s required literal, lower-cased when it ignores case;
    None when there is none a raw JSON text is sure to show as is.

    Matches are looked for in texts decoded from JSON too (the configured JSON
    paths). Without ``\\u`` escapes in the raw text (checked per outcome), only
    ``"``, ``\\``, ``/`` and control characters can be spelled differently there.
    A case-blind needle is ASCII, checked against ASCII texts only: elsewhere
    case folding has surprises (``\u017f`` matches ``s``).
    """
    if pattern.flags & _UNSCANNED_FLAGS:
        return None
    needle = required_literal(pattern.pattern)
    if needle is None or any(c in '"\\/' or c < " " for c in needle):
        return None
    if pattern.flags & regex.IGNORECASE:
        return needle.lower() if needle.isascii() else None
    return needle


def _folded(text: str) -> str | None:
    """``text`` lower-cased for a case-blind needle search; None beyond ASCII, where
    case folding has surprises and the text must be searched by the pattern itself."""
    return text.lower() if text.isascii() else None


@dataclass(frozen=True, slots=True)
class _Compiled:
    """A compiled pattern, its rule's place in the config, and whether it can run away."""

    pattern: Any
    index: int
    bounded: bool
    #: What every match contains (:func:`_needle`): a text without it is not searched.
    needle: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "needle", _needle(self.pattern))

    def finds(self, text: str, limit: float) -> bool:
        """Whether the pattern occurs in the first SCAN_LIMIT characters of ``text``.

        Raises TimeoutError when a pattern that can run away takes ``limit`` seconds.
        """
        timeout = None if self.bounded else limit
        return self.pattern.search(text, 0, SCAN_LIMIT, timeout=timeout) is not None


@dataclass(frozen=True, slots=True)
class _HardStop(_Compiled):
    rule: HardStopRule


@dataclass(frozen=True, slots=True)
class _Recategorization(_Compiled):
    rule: RecategorizationRule


@dataclass(frozen=True, slots=True)
class Policy:
    """The resilience rules of a config, compiled once: regexes compiled, code
    lists as frozensets, JSON paths parsed, recategorization rules pre-sorted by
    the status they apply to. Build with :meth:`from_config`."""

    retry_codes: frozenset[int] = frozenset()
    fail_codes: frozenset[int] = frozenset()
    conditional_codes: frozenset[int] = frozenset()
    max_retries: int = 10
    base_delay: float = 1.0
    max_delay: float = 60.0
    conditional_max_retries: int = 2
    conditional_multiplier: float = 0.5
    max_total_seconds: float | None = None
    exhausted_429_status: int = 503
    hard_stops: tuple[_HardStop, ...] = ()
    recategorize_by_status: Mapping[int, tuple[_Recategorization, ...]] = field(
        default_factory=dict
    )
    recategorize_any: tuple[_Recategorization, ...] = ()
    json_paths: tuple[JsonPath, ...] = ()
    empty_enabled: bool = True
    empty_max_retries: int = 3
    empty_finish_reasons: frozenset[str] = frozenset()
    empty_deliver_last: bool = False
    #: The title pattern of errors sent as replies; None when that check is off.
    disguise_title: Title | None = None
    #: How long an upstream's daily quota is taken to be out when it does not say.
    quota_cooldown: float = 3600.0
    hard_stop_timeout: float = 0.1
    recategorization_timeout: float = 0.1
    #: A hard-stop or recategorization pattern may take up to its time limit: the
    #: shell then decides off the event loop. Worked out once (asked every attempt).
    can_run_away: bool = field(init=False, default=False)
    #: What each pattern that can run away needs to find in a text to match it
    #: (:func:`patterns.required_literal`); None when one of them has no such literal.
    run_away_needles: tuple[str, ...] | None = field(init=False, default=None)
    #: Some of those patterns ignore case: every needle is lower-case, looked for in
    #: the text lower-cased.
    run_away_blind: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        rules: tuple[_Compiled, ...] = (*self.hard_stops, *self.recategorize_any)
        rules += tuple(r for group in self.recategorize_by_status.values() for r in group)
        unbounded = [r for r in rules if not r.bounded]
        object.__setattr__(self, "can_run_away", bool(unbounded))
        needles = [r.needle for r in unbounded]
        blind = any(r.pattern.flags & regex.IGNORECASE for r in unbounded)
        object.__setattr__(self, "run_away_blind", blind)
        if all(needle is not None for needle in needles):
            kept = tuple(n.lower() if blind else n for n in needles if n)
            object.__setattr__(self, "run_away_needles", kept)

    def may_run_away(self, outcome: Outcome) -> bool:
        """Whether judging ``outcome`` may run a pattern up to its time limit.

        A pattern cannot match a text that lacks its required literal, so a
        reply without any of them is judged at once, on the event loop: the
        usual case, where a thread hop would cost more than the judging.
        """
        if not self.can_run_away:
            return False
        needles = self.run_away_needles
        if needles is None:
            return True
        for text in (outcome.body, outcome.stream_error_event or ""):
            # A JSON escape could spell a needle the raw text does not show.
            if "\\u" in text:
                return True
            if self.run_away_blind:
                folded = _folded(text)
                if folded is None:
                    return True
                text = folded
            if any(needle in text for needle in needles):
                return True
        return False

    @classmethod
    def from_config(cls, config: Config) -> Policy:
        eh = config.error_handling
        rp = config.response_parsing
        hard_stops: tuple[_HardStop, ...] = ()
        if eh.hard_stop_conditions.enabled:
            hard_stops = tuple(
                _HardStop(regex.compile(r.pattern, _FLAGS), i, bounded(r.pattern), r)
                for i, r in enumerate(eh.hard_stop_conditions.rules)
            )
        recats: list[_Recategorization] = []
        if rp.enabled and rp.status_recategorization.enabled:
            recats = [
                _Recategorization(regex.compile(r.pattern, _FLAGS), i, bounded(r.pattern), r)
                for i, r in enumerate(rp.status_recategorization.rules)
            ]
        statuses = {r.rule.original_status for r in recats}
        by_status = {
            s: tuple(r for r in recats if r.rule.original_status in (s, None))
            for s in statuses
            if s is not None
        }
        paths: tuple[JsonPath, ...] = ()
        if rp.enabled and rp.json_extraction.enabled:
            paths = tuple(parse_path(p) for p in rp.json_extraction.paths)
        empty = eh.empty_response
        disguised = rp.disguised_errors
        return cls(
            retry_codes=frozenset(eh.retry_codes),
            fail_codes=frozenset(eh.fail_codes),
            conditional_codes=(
                frozenset(eh.conditional_retry_codes)
                if eh.conditional_retry_enabled
                else frozenset()
            ),
            max_retries=eh.max_retries,
            base_delay=float(eh.base_delay),
            max_delay=float(eh.max_delay),
            conditional_max_retries=eh.conditional_retry_max_attempts,
            conditional_multiplier=float(eh.conditional_retry_delay_multiplier),
            max_total_seconds=eh.max_total_seconds,
            exhausted_429_status=eh.exhausted_429_status,
            hard_stops=hard_stops,
            recategorize_by_status=by_status,
            recategorize_any=tuple(r for r in recats if r.rule.original_status is None),
            json_paths=paths,
            empty_enabled=empty.enabled,
            empty_max_retries=empty.max_retries,
            empty_finish_reasons=frozenset(f.casefold() for f in empty.finish_reasons),
            empty_deliver_last=empty.deliver_last,
            disguise_title=(
                Title(disguised.title_pattern) if rp.enabled and disguised.enabled else None
            ),
            quota_cooldown=float(eh.quota_cooldown_seconds),
            hard_stop_timeout=eh.hard_stop_conditions.timeout_ms / 1000,
            recategorization_timeout=rp.status_recategorization.timeout_ms / 1000,
        )

    def recategorizations_for(self, status: int) -> tuple[_Recategorization, ...]:
        """The rules that may fire for ``status``, in config order."""
        return self.recategorize_by_status.get(status, self.recategorize_any)


# -- JSON paths ---------------------------------------------------------------

_SEGMENT: Final = re.compile(r"([^\[\]]*)((?:\[-?\d+\])*)")
_INDEX: Final = re.compile(r"\[(-?\d+)\]")


def parse_path(path: str) -> JsonPath:
    """``"choices[0].message.content"`` -> ``("choices", 0, "message", "content")``.

    Lenient on purpose: a segment that is not ``key[n]...`` is taken as a
    literal key, so an odd path in the config finds nothing instead of failing.
    """
    parts: list[PathPart] = []
    for segment in path.split("."):
        match = _SEGMENT.fullmatch(segment)
        if match is None:
            parts.append(segment)
            continue
        key, indexes = match.groups()
        if key:
            parts.append(key)
        parts.extend(int(i) for i in _INDEX.findall(indexes))
    return tuple(parts)


def extract(obj: Any, path: str | JsonPath) -> Any:
    """The value at ``path`` in parsed JSON, or None when it is not there."""
    parts = parse_path(path) if isinstance(path, str) else path
    current = obj
    for part in parts:
        if isinstance(part, int):
            if not isinstance(current, list) or not -len(current) <= part < len(current):
                return None
            current = current[part]
        elif isinstance(current, dict):
            current = current.get(part)
            if current is None:
                return None
        else:
            return None
    return current


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return str(value)


def _parse(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return _NOT_JSON


# -- the upstream's own words -----------------------------------------------

_TITLE: Final = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_TAG: Final = re.compile(r"<[^>]+>")


def _trim(text: str, mask: Mask = redact_text, limit: int = MESSAGE_LIMIT) -> str:
    """Masked first, then cut to ``limit``: the one way an upstream text is shortened."""
    return clip(text, limit, mask)


def _readable(text: str, mask: Mask = redact_text, limit: int = MESSAGE_LIMIT) -> str:
    """Raw body text made fit for a sentence: an HTML error page becomes its title,
    its entities decoded (``&amp;`` reads ``&``)."""
    if text.lstrip().startswith("<"):
        title = _TITLE.search(text)
        text = html.unescape(title.group(1) if title else _TAG.sub(" ", text))
    return _trim(text, mask, limit)


def upstream_message(doc: Any, text: str, mask: Mask = redact_text) -> str:
    """The upstream's own explanation: ``error.message`` (or a similar field),
    else the body text, masked and then trimmed to about 300 characters."""
    if isinstance(doc, dict):
        error = doc.get("error")
        if isinstance(error, dict):
            message = error.get("message")
            if isinstance(message, str) and message.strip():
                detail = provider_detail(doc)  # OpenRouter: the provider's own words
                if detail and detail not in message:
                    message = f"{message.rstrip('. ')} ({detail})"
                return _trim(message, mask)
        elif isinstance(error, str) and error.strip():
            return _trim(error, mask)
        for key in ("message", "detail", "proxy_note"):
            value = doc.get(key)
            if isinstance(value, str) and value.strip():
                return _trim(value, mask)
    return _readable(text, mask)


def _embedded_status(doc: Any) -> int:
    """The HTTP status an in-band ``{"error": {...}}`` names, else 502."""
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, dict):
        for key in ("code", "status"):
            value = error.get(key)
            if isinstance(value, str) and value.isdigit():
                value = int(value)
            if isinstance(value, int) and not isinstance(value, bool) and 400 <= value <= 599:
                return value
    return 502


# -- reply content ------------------------------------------------------------


def _has_text(content: Any) -> bool:
    if isinstance(content, str):
        return bool(content) and not content.isspace()  # no stripped copy of the reply
    if isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                if part.strip():
                    return True
            elif isinstance(part, dict):
                if part.get("type", "text") != "text":
                    return True
                if _has_text(part.get("text")):
                    return True
    return False


def _choice_has_content(choice: dict[str, Any]) -> bool:
    message = choice.get("message")
    if not isinstance(message, dict):
        message = choice.get("delta")
    if isinstance(message, dict):
        if _has_text(message.get("content")) or _has_text(message.get("refusal")):
            return True
        if message.get("tool_calls") or message.get("function_call"):
            return True
    return _has_text(choice.get("text"))


def _empty_reply(doc: Any, finish_reasons: frozenset[str]) -> tuple[bool, str | None]:
    """Is this non-streaming 2xx reply empty, and which finish reason did it give?

    Empty: no choices, or no choice that has content (text, tool calls) and a
    finish reason outside ``finish_reasons`` (SAFETY and the like).
    """
    choices = doc.get("choices") if isinstance(doc, dict) else None
    if not isinstance(choices, list) or not choices:
        return True, None
    finish: str | None = None
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        reason = choice.get("finish_reason")
        if isinstance(reason, str):
            if finish is None:
                finish = reason
            if reason.casefold() in finish_reasons:
                continue
        if _choice_has_content(choice):
            return False, finish
    return True, finish


# -- decide -------------------------------------------------------------------


def _client_status(action: Action, status: int, policy: Policy) -> int:
    if action is Action.ABANDON:
        return CLIENT_CLOSED
    if action in (Action.FAIL, Action.HARD_STOP):
        if status == 429:
            return policy.exhausted_429_status
        if status < 400:
            return 502
    return status


def _status_error_type(status: int) -> ErrorType:
    return "rate_limited" if status == 429 else "upstream_error"


class _Judge:
    """One call of :func:`decide`: the facts gathered once, the rules as methods."""

    __slots__ = (
        "disguise",
        "doc",
        "folded",
        "history",
        "jitter",
        "mask",
        "now",
        "outcome",
        "policy",
        "recategorized",
        "retry_after",
        "timeouts",
    )

    def __init__(
        self,
        outcome: Outcome,
        history: History,
        policy: Policy,
        jitter: float,
        now: float | None,
        mask: Mask,
    ) -> None:
        self.outcome = outcome
        self.history = history
        self.policy = policy
        self.jitter = jitter
        self.now = now
        self.mask = mask
        self.recategorized: Recategorized | None = None
        self.retry_after: float | None = None
        self.disguise: Disguised | None = None
        self.timeouts: list[RuleTimeout] = []
        self.folded: dict[str, str | None] = {}  # text -> lower-cased, when ASCII
        self.doc = outcome.json if outcome.json is not UNPARSED else self._parse_document()

    def _parse_document(self) -> Any:
        o = self.outcome
        if o.stream:
            if o.stream_error_event is not None:
                return unwrap(_parse(o.stream_error_event))
            if o.status is not None and not 200 <= o.status < 300 and o.body:
                return unwrap(_parse(o.body))
            return _NOT_JSON
        return unwrap(_parse(o.body)) if o.body and not o.body.isspace() else _NOT_JSON

    def message(self) -> str:
        """What the upstream said, for the person: its error event, its error
        body, or (when the attempt broke down) the transport's own message."""
        o = self.outcome
        if self.disguise is not None:
            return _trim(self.disguise.text, self.mask)
        if o.stream and o.stream_error_event is not None:
            return upstream_message(self.doc, o.stream_error_event, self.mask)
        broken = o.transport_error is not None and (o.status is None or 200 <= o.status < 300)
        if broken and o.transport_message.strip():
            return _trim(o.transport_message, self.mask)
        if o.body.strip():
            return upstream_message(self.doc, o.body, self.mask)
        return _trim(o.transport_message, self.mask)

    def make(
        self, action: Action, reason: str, status: int, error_type: ErrorType | None, **kw: Any
    ) -> Decision:
        if action is not Action.DELIVER and "upstream_message" not in kw:
            kw["upstream_message"] = self.message()
        kw.setdefault("retry_after", self.retry_after)
        if self.timeouts:
            kw["timeouts"] = tuple(self.timeouts)
        return Decision(
            action=action,
            reason=reason,
            status=status,
            client_status=_client_status(action, status, self.policy),
            error_type=error_type,
            recategorized=self.recategorized,
            upstream_status=self.outcome.status,
            **kw,
        )

    # rule 2
    def hard_stop(self) -> Decision | None:
        o = self.outcome
        # A stream's error event first: it is the original response worth preserving.
        texts = [o.body]
        if o.stream_error_event is not None:
            texts.insert(0, o.stream_error_event)
        limit = self.policy.hard_stop_timeout
        for stop in self.policy.hard_stops:
            text = self.first_found(stop, texts, limit, HARD_STOP_SECTION, stop.rule.description)
            if text is not None:
                status = o.status if o.status is not None and o.status >= 400 else 502
                return self.make(
                    Action.HARD_STOP,
                    f"hard-stop rule {stop.rule.pattern!r} matched; not retrying",
                    status,
                    "hard_stop_error",
                    hard_stop_rule=stop.rule,
                    original_response=text,
                )
        return None

    # rule 3
    def recategorize(self, status: int) -> int:
        rules = self.policy.recategorizations_for(status)
        if not rules:
            return status
        texts = self._texts()
        limit = self.policy.recategorization_timeout
        for recat in rules:
            rule = recat.rule
            if self.first_found(recat, texts, limit, RECATEGORIZATION_SECTION, rule.description):
                self.recategorized = Recategorized(status, rule.new_status, rule.pattern)
                return rule.new_status
        return status

    def first_found(
        self, compiled: _Compiled, texts: list[str], limit: float, section: str, about: str
    ) -> str | None:
        """The first of ``texts`` the pattern occurs in. A pattern that runs out of
        time is skipped for this outcome and named in :attr:`Decision.timeouts`."""
        needle = compiled.needle
        try:
            for text in texts:
                if not text or (needle is not None and self.lacks(text, needle)):
                    continue
                if compiled.finds(text, limit):
                    return text
        except TimeoutError:
            self.timeouts.append(RuleTimeout(section, compiled.index, about, None))
        return None

    def lacks(self, text: str, needle: str) -> bool:
        """Whether ``text`` surely lacks ``needle``: then a pattern that needs it need
        not search the text. Compared lower-cased (the patterns ignore case), each text
        lower-cased once per outcome; a text beyond ASCII is always searched."""
        folded = self.folded.get(text, "")
        if folded == "":
            folded = self.folded[text] = _folded(text)
        return folded is not None and needle.lower() not in folded

    def _texts(self) -> list[str]:
        """Where recategorization patterns look: the configured JSON paths, then
        the raw text (for a stream: the error event and the early payloads)."""
        o = self.outcome
        texts: list[str] = []
        if self.policy.json_paths and isinstance(self.doc, dict | list):
            for path in self.policy.json_paths:
                value = _as_text(extract(self.doc, path))
                if value:
                    texts.append(value)
        if o.stream_error_event:
            texts.append(o.stream_error_event)
        if o.body:
            texts.append(o.body)
        return texts

    # rules 6-8: a retry, unless Retry-After or the time budget forbid it
    def retry(
        self,
        status: int,
        error_type: ErrorType,
        budget: Budget,
        used: int,
        allowed: int,
        what: str,
        *,
        multiplier: float = 1.0,
        failure: bool,
        **extra: Any,
    ) -> Decision | None:
        """RETRY, or a FAIL saying why retrying must stop; None: budget spent."""
        p = self.policy
        if used >= allowed:
            return None
        n = used + 1
        if self.retry_after is not None:
            if self.retry_after > p.max_delay:
                return self.make(
                    Action.FAIL,
                    f"{what}; the upstream asks to wait {self.retry_after:g} s, "
                    f"more than max_delay ({p.max_delay:g} s): giving up",
                    status,
                    error_type,
                    gave_up="retry_after_too_long",
                    counts_as_failure=failure,
                    **extra,
                )
            delay = self.retry_after
        else:
            delay = delay_for(n, p.base_delay * multiplier, p.max_delay, self.jitter)
        limit = p.max_total_seconds
        if limit is not None and self.history.elapsed + delay > limit:
            return self.make(
                Action.FAIL,
                f"{what}; waiting {delay:.1f} s more would pass the time limit of "
                f"{limit:g} s (max_total_seconds) after {self.history.elapsed:.1f} s: giving up",
                status,
                error_type,
                gave_up="time_budget",
                counts_as_failure=failure,
                **extra,
            )
        return self.make(
            Action.RETRY,
            f"{what}: retry {n} of {allowed} in {delay:.1f} s",
            status,
            error_type,
            delay=delay,
            budget=budget,
            counts_as_failure=failure,
            **extra,
        )

    # rule 4, empty half
    def empty(self, status: int, finish: str | None) -> Decision:
        p, h = self.policy, self.history
        finish_note = f" (finish reason {finish})" if finish else ""
        if not p.empty_enabled:
            return self.make(Action.DELIVER, f"empty reply{finish_note}; delivered", status, None)
        count = h.empty_retries + 1
        # The body of an empty reply is a well-formed completion: nothing in it
        # helps the person, unlike an upstream error message.
        facts: dict[str, Any] = {"count": count, "finish_reason": finish, "upstream_message": ""}
        decision = self.retry(
            502,
            "empty_response",
            "empty",
            h.empty_retries,
            p.empty_max_retries,
            f"empty reply{finish_note}",
            failure=False,
            **facts,
        )
        if decision is not None:
            return decision
        if p.empty_deliver_last:
            return self.make(
                Action.DELIVER,
                f"{count} empty replies in a row{finish_note}; delivering the last one",
                status,
                None,
                finish_reason=finish,
            )
        return self.make(
            Action.FAIL,
            f"{count} empty replies in a row{finish_note}: giving up",
            502,
            "empty_response",
            gave_up="retries_exhausted",
            **facts,
        )

    # rules 5-7 and 9
    def by_status(self, status: int, note: str = "") -> Decision:
        p, h = self.policy, self.history
        self.retry_after = retry_after_from_headers(self.outcome.headers, self.now)
        if self.retry_after is None and status >= 400:
            self.retry_after = body_retry_delay(self.doc, self.outcome.body)
        if status == 429:
            quota = daily_quota(self.doc, self.outcome.body)
            if quota is not None:
                return self.quota_exhausted(quota, note)
        error_type = _status_error_type(status)
        # For the breaker: a server error, or a status this config treats as
        # transient; a status that fails at once says nothing about health.
        failure = status >= 500 or (status in p.retry_codes and status not in p.fail_codes)
        label = f"{status}{note}"
        if status in p.fail_codes:
            return self.make(
                Action.FAIL,
                f"{label} is a fail code: not retrying",
                status,
                error_type,
                counts_as_failure=failure,
            )
        if status in p.retry_codes:
            decision = self.retry(
                status,
                error_type,
                "retry",
                h.retries,
                p.max_retries,
                f"{label} is a retry code",
                failure=failure,
            )
            return decision or self.make(
                Action.FAIL,
                f"{label} after {p.max_retries} retries: giving up",
                status,
                error_type,
                gave_up="retries_exhausted",
                counts_as_failure=failure,
            )
        if status in p.conditional_codes:
            decision = self.retry(
                status,
                error_type,
                "conditional",
                h.conditional_retries,
                p.conditional_max_retries,
                f"{label} is a conditional retry code",
                multiplier=p.conditional_multiplier,
                failure=failure,
            )
            return decision or self.make(
                Action.FAIL,
                f"{label} after {p.conditional_max_retries} conditional retries: giving up",
                status,
                error_type,
                gave_up="retries_exhausted",
                counts_as_failure=failure,
            )
        return self.make(
            Action.FAIL,
            f"{label} is in no retry list: passing it on",
            status,
            error_type,
            counts_as_failure=failure,
        )

    # rule 5, a 429 that says its daily quota is used up: no retry can help today
    def quota_exhausted(self, quota: str, note: str) -> Decision:
        p = self.policy
        if self.now is not None and is_google_quota(self.doc):
            wait = next_pacific_midnight(self.now) - self.now
            when = "at midnight Pacific time"
        else:
            wait, when = p.quota_cooldown, "(when is not said; tried again after quota_cooldown)"
        return self.make(
            Action.FAIL,
            f"429{note} says a daily quota ({quota}) is used up: it resets {when}, "
            f"in {wait / 3600:.1f} h; not retrying",
            429,
            "quota_exhausted",
            quota=quota,
            retry_after=wait,
        )

    # rule 8
    def transport(self) -> Decision:
        o, p = self.outcome, self.policy
        kind = o.transport_error or "connection_error"
        error_type: ErrorType = "timeout" if kind == "timeout" else "connection_error"
        status = 504 if kind == "timeout" else 502
        # The transport's own sentence travels as upstream_message: said once, not twice.
        what = kind.replace("_", " ")
        decision = self.retry(
            status, error_type, "retry", self.history.retries, p.max_retries, what, failure=True
        )
        return decision or self.make(
            Action.FAIL,
            f"{what} after {p.max_retries} retries: giving up",
            status,
            error_type,
            gave_up="retries_exhausted",
            counts_as_failure=True,
        )

    def run(self) -> Decision:
        o = self.outcome
        if self.policy.hard_stops:
            stopped = self.hard_stop()
            if stopped is not None:
                return stopped
        status = o.status
        if status is not None:
            status = self.recategorize(status)
            if not 200 <= status < 300:
                note = f" (was {o.status})" if self.recategorized else ""
                return self.by_status(status, note)
        if status is None or o.transport_error is not None:
            return self.transport()
        title = self.policy.disguise_title
        if title is not None and isinstance(self.doc, dict):
            self.disguise = disguised_error(self.doc, o.headers, title=title)
            if self.disguise is not None:
                return self.by_status(self.disguise.status, f" (an error sent as a {status} reply)")
        if o.stream:
            if o.first_content:
                return self.make(Action.DELIVER, "stream has content", status, None)
            if o.stream_error_event is not None:
                return self.by_status(_embedded_status(self.doc), " (error event in the stream)")
            return self.empty(status, o.finish_reason)
        doc = self.doc
        if doc is _NOT_JSON:
            if o.body.strip():
                snippet = _readable(o.body, self.mask, SNIPPET_LIMIT)
                return self.transport_as(
                    "invalid_json", f"the reply body is not valid JSON: {snippet}"
                )
            return self.empty(status, None)
        if isinstance(doc, dict) and doc.get("error") and not doc.get("choices"):
            return self.by_status(_embedded_status(doc), f" (error in a {status} body)")
        is_empty, finish = _empty_reply(doc, self.policy.empty_finish_reasons)
        if is_empty:
            return self.empty(status, finish)
        usage = doc.get("usage") if isinstance(doc, dict) else None
        return self.make(
            Action.DELIVER,
            "good reply",
            status,
            None,
            usage=usage if isinstance(usage, dict) else None,
        )

    def transport_as(self, kind: TransportError, message: str) -> Decision:
        self.outcome = replace(self.outcome, transport_error=kind, transport_message=message)
        return self.transport()


def decide(
    outcome: Outcome,
    history: History,
    policy: Policy,
    *,
    jitter: float = 0.5,
    now: float | None = None,
    mask: Mask = redact_text,
) -> Decision:
    """Judge one upstream attempt: deliver it, retry, stop, fail or abandon.

    ``jitter`` in [0, 1) spreads the backoff delay (0.5: exact); ``now`` is the
    wall clock (Unix time) for an HTTP-date ``Retry-After``; without it such a
    header is ignored. ``mask`` masks this request's secrets in every upstream
    text before it is cut. Pure: same inputs, same decision (except that a
    pattern running past its time limit is skipped, and named in the decision).
    """
    if outcome.client_gone:
        status = outcome.status if outcome.status is not None else CLIENT_CLOSED
        return Decision(
            action=Action.ABANDON,
            reason="the client went away; abandoning the request",
            status=status,
            client_status=CLIENT_CLOSED,
            upstream_status=outcome.status,
        )
    return _Judge(outcome, history, policy, jitter, now, mask).run()


def circuit_open(retry_in: float, failures: int, last_message: str = "") -> Decision:
    """The FAIL decision for a request refused by an open circuit breaker."""
    return Decision(
        action=Action.FAIL,
        reason=(
            f"circuit open after {failures} consecutive failures; next probe in {retry_in:.1f} s"
        ),
        status=503,
        client_status=503,
        error_type="circuit_open",
        retry_after=max(retry_in, 0.0),
        upstream_message=last_message,
        count=failures,
    )


#: Why no key of a pool is ready -> (status, the error's code).
NO_KEY: Final = {
    "refused": (401, "keys_refused"),
    "out": (429, "daily_quota_exhausted"),
    "cooling": (429, "keys_rate_limited"),
}


def no_key(kind: str, wait: float, message: str) -> Decision:
    """The FAIL decision for a request whose upstream has no key ready (``keys.Blocked``)."""
    status, _ = NO_KEY[kind]
    return Decision(
        action=Action.FAIL,
        reason=message,
        status=status,
        client_status=status if status != 429 else 503,
        error_type="no_key",
        retry_after=wait if kind != "refused" else None,
        gave_up="no_key",
        quota="every key" if kind == "out" else None,
    )


def failure_summary(d: Decision) -> str:
    """A failed attempt in one line (``503 Service Unavailable: <what it said>``): the
    circuit breaker keeps the last one, to tell the next person why it opened."""
    if d.error_type in ("timeout", "connection_error") and (
        d.upstream_status is None or 200 <= d.upstream_status < 300
    ):
        head = "no answer in time" if d.error_type == "timeout" else "no complete answer"
    else:
        head = _status_text(d.status)
    return f"{head}: {d.upstream_message}" if d.upstream_message else head


# -- the client's error reply -----------------------------------------------


def _status_text(status: int) -> str:
    try:
        return f"{status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def _over(attempts: int, elapsed: float) -> str:
    if attempts == 1:
        return f"1 attempt over {elapsed:.1f} s"
    return f"{attempts} attempts over {elapsed:.1f} s"


def _clip(text: str) -> str:
    text = text.rstrip(".")
    return text if len(text) <= TRIED_LIMIT else text[: TRIED_LIMIT - 1].rstrip() + "…"


def _duration(seconds: float) -> str:
    """``7 h 12 min``, ``12 min``, ``40 s``: a wait a person can picture."""
    seconds = max(0, math.ceil(seconds))
    if seconds < 60:
        return f"{seconds} s"
    hours, minutes = divmod(math.ceil(seconds / 60), 60)
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{minutes} min"


def _seconds(value: float) -> str:
    return f"{math.ceil(value)} s"


HARD_STOP_GENERIC: Final = (
    "The upstream's reply matched a hard-stop rule, so the proxy stopped without retrying."
)


#: How much of each upstream's words the final error quotes when several were tried.
TRIED_LIMIT: Final = 160


def error_body(
    decision: Decision,
    attempts: int,
    elapsed: float,
    tried: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """The OpenAI-style error the client gets for a FAIL or HARD_STOP decision.

    SillyTavern shows only ``error.message``, so the message says what
    happened, how many attempts over how long, and what the upstream itself
    said; with several upstreams (``tried``: name and what it said last, in
    order), what each one said. A hard stop gets exactly the spec's hard-stop
    shape.
    """
    d = decision
    if d.error_type == "hard_stop_error":
        rule = d.hard_stop_rule
        if rule is not None and rule.add_user_message and rule.user_message:
            message = rule.user_message
        else:
            message = HARD_STOP_GENERIC
            if rule is not None and rule.description:
                message = f"{message[:-1]} ({rule.description})."
        error: dict[str, Any] = {
            "message": message,
            "type": "hard_stop_error",
            "code": "hard_stop_condition_met",
        }
        if rule is None or rule.preserve_original_response:
            error["original_response"] = d.original_response
        return {"error": error}

    tries = _over(attempts, elapsed)
    stopped = {
        "retries_exhausted": f"gave up after {tries}",
        "time_budget": (
            f"stopped after {tries} because the time limit "
            "(error_handling.max_total_seconds) ran out"
        ),
        "retry_after_too_long": (
            f"it asks to wait {_seconds(d.retry_after or 0.0)} before trying again, longer "
            f"than error_handling.max_delay allows; stopped after {tries}"
        ),
        "no_key": "",
    }
    ending = stopped[d.gave_up] if d.gave_up is not None else ""
    code: str
    if d.error_type == "circuit_open":
        code = "circuit_open"
        wait = _seconds(d.retry_after or 0)
        message = (
            f"The upstream failed {d.count} times in a row, so the proxy is giving it time to "
            f"recover: it sends the next request to it in {wait}. Try again in {wait}."
        )
    elif d.error_type == "quota_exhausted":
        code = "daily_quota_exhausted"
        message = (
            f"The upstream says its daily quota is used up ({d.quota}): retrying cannot help "
            f"until it resets, in about {_duration(d.retry_after or 0)}."
        )
    elif d.error_type == "no_key":
        code = {401: "keys_refused"}.get(d.status, "keys_rate_limited")
        code = "daily_quota_exhausted" if d.quota is not None else code
        message = d.reason
    elif d.error_type == "empty_response":
        code = "empty_response"
        finish = f" (finish reason: {d.finish_reason})" if d.finish_reason else ""
        message = (
            f"The upstream sent an empty reply {d.count} times in a row{finish}; "
            f"{ending or 'gave up after ' + tries}. The model may be refusing this prompt: "
            "try regenerating or rephrasing."
        )
    elif d.error_type in ("timeout", "connection_error"):
        code = d.error_type
        what = (
            "The upstream did not answer in time"
            if d.error_type == "timeout"
            else "Could not get a complete answer from the upstream"
        )
        message = f"{what}: {ending or 'gave up after ' + tries}."
    else:
        if d.recategorized is not None:
            old = d.recategorized.old
            seen = f"{old} with an error treated as {_status_text(d.status)}"
        elif d.upstream_status is not None and d.upstream_status != d.status:
            seen = f"{d.upstream_status} with an error treated as {_status_text(d.status)}"
        else:
            seen = _status_text(d.status)
        if d.gave_up == "retries_exhausted":
            code = "retries_exhausted"
            message = f"The upstream kept answering {seen}: {ending}."
        elif d.gave_up is not None:
            code = "time_budget_exhausted" if d.gave_up == "time_budget" else d.gave_up
            message = f"The upstream answered {seen}: {ending}."
        else:
            code = f"upstream_{d.status}"
            after = f" (after {tries})" if attempts > 1 else ""
            message = f"The upstream answered {seen}{after}."
    if tried:
        said = "; ".join(f"{name} ({_clip(text)})" for name, text in tried)
        message = f"{message} Upstreams tried: {said}."
    elif d.upstream_message:
        label = "Details" if d.error_type in ("timeout", "connection_error") else "Upstream said"
        if d.error_type == "circuit_open":
            label = "The last error"
        message = f"{message} {label}: {d.upstream_message}"
    error = {
        "message": message,
        "type": d.error_type or "upstream_error",
        "code": code,
        "attempts": attempts,
    }
    if d.retry_after is not None:
        error["retry_after"] = math.ceil(d.retry_after)
    return {"error": error}
