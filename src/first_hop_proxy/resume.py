"""Finishing a stream that broke after its first content: the pure parts.

When a stream dies half-way (the connection cut, an error event, the upstream
silent past its timeout) and ``error_handling.stream_resume`` is on, the proxy
asks again with the text the client already has as a final assistant message:
a prefill, which upstreams that support it continue from. What comes back is
joined to what was sent so that the client sees one stream: the restated end
of the delivered text cut, the chunks stamped with the first stream's ``id``,
``model`` and ``created``, the usage counting every attempt's tokens. A
continuation that starts the reply over is refused: the person must not get
the reply twice.

No I/O here; :mod:`streaming` does the orchestration.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from .sse import parse_event

#: How far back from the end of the delivered text a restated passage is looked for.
OVERLAP_WINDOW: Final = 256
#: The fewest non-space characters a restated passage must have to be cut: a shorter
#: match ("." after ".") is as likely to be the text going on.
MIN_OVERLAP: Final = 3
#: A continuation that begins like the delivered text's beginning for this many
#: characters (or three quarters of a shorter text) starts the reply over.
RESTART_CHARS: Final = 32
MIN_RESTART: Final = 8
#: The fields that make a continuation's chunks look like the first stream's.
IDENTITY: Final = ("id", "model", "created")


def continuation_payload(
    payload: Mapping[str, Any], delivered: str, instruction: str = ""
) -> dict[str, Any]:
    """The request that asks the model to go on from ``delivered``.

    The same request, its messages ending with the delivered text as the
    assistant's. A conversation that already ends with an assistant message
    (SillyTavern's Continue sends one) gets the text added to it: the reply so
    far continued that message. Trailing whitespace stays out of the prefill:
    Claude refuses a prefill that ends with it, and models continue better
    without. ``instruction``, when set, follows as a user message, for upstreams
    that do not continue a prefill.
    """
    messages = list(payload.get("messages") or [])
    prefill = delivered.rstrip()
    last = messages[-1] if messages else None
    content = last.get("content") if isinstance(last, dict) else None
    if isinstance(last, dict) and last.get("role") == "assistant" and isinstance(content, str):
        messages[-1] = {**last, "content": content + prefill}
    elif isinstance(last, dict) and last.get("role") == "assistant" and isinstance(content, list):
        messages[-1] = {**last, "content": [*content, {"type": "text", "text": prefill}]}
    else:
        messages.append({"role": "assistant", "content": prefill})
    if instruction:
        messages.append({"role": "user", "content": instruction})
    return {**payload, "messages": messages}


# -- where a continuation joins the delivered text -----------------------------------


@dataclass(frozen=True, slots=True)
class Join:
    """How a continuation meets the delivered text.

    ``cut``: characters at its start that repeat the end of the delivered text;
    ``restart``: it starts the reply over, and is not to be delivered at all.
    """

    cut: int = 0
    restart: bool = False


def join(delivered: str, head: str, *, final: bool = False) -> Join | None:
    """How a continuation beginning with ``head`` joins ``delivered``.

    None while more of the continuation could change the answer: ``head`` could
    still grow into a longer restated passage or into the reply's beginning.
    ``final``: nothing more is coming; decide with what there is.
    """
    if not final and (_may_overlap_more(delivered, head) or _may_restart(delivered, head)):
        return None
    cut = overlap(delivered, head)
    if restarted(delivered, head) > cut:
        return Join(restart=True)
    return Join(cut=cut)


def overlap(delivered: str, head: str) -> int:
    """How many characters at the start of ``head`` repeat the end of ``delivered``.

    The longest end of ``delivered`` (within :data:`OVERLAP_WINDOW`) that
    ``head`` starts with, when it has :data:`MIN_OVERLAP` non-space characters
    and starts a word in ``delivered`` (it may end mid-word: the stream may have
    broken inside one). Otherwise the whitespace both share at the seam: the
    prefill leaves the delivered text's trailing whitespace out, so the model
    often writes it again.
    """
    tail = delivered[-OVERLAP_WINDOW:]
    for k in range(min(len(tail), len(head)), 0, -1):
        piece = tail[-k:]
        if head.startswith(piece) and _sensible(delivered, piece):
            return k
    trailing = delivered[len(delivered.rstrip()) :]
    leading = head[: len(head) - len(head.lstrip())]
    same = 0
    while same < min(len(trailing), len(leading)) and trailing[same] == leading[same]:
        same += 1
    return same


def restarted(delivered: str, head: str) -> int:
    """How far ``head`` repeats the beginning of ``delivered``: 0 unless it is enough
    to say the continuation started the reply over (leading whitespace aside)."""
    start, again = delivered.lstrip(), head.lstrip()
    n = 0
    limit = min(len(start), len(again))
    while n < limit and start[n] == again[n]:
        n += 1
    return n if n >= _restart_chars(start) else 0


def _restart_chars(start: str) -> int:
    return max(MIN_RESTART, min(RESTART_CHARS, len(start) * 3 // 4))


def _sensible(delivered: str, piece: str) -> bool:
    if len(piece.strip()) < MIN_OVERLAP:
        return False
    before = len(delivered) - len(piece) - 1
    return before < 0 or not delivered[before].isalnum() or not piece[0].isalnum()


def _may_overlap_more(delivered: str, head: str) -> bool:
    """Whether an end of ``delivered`` longer than ``head`` starts with ``head``."""
    tail = delivered[-OVERLAP_WINDOW:]
    return len(head) < len(tail) and tail.find(head, 0, len(tail) - 1) != -1


def _may_restart(delivered: str, head: str) -> bool:
    """Whether ``head`` is still on its way to repeating the reply's beginning."""
    start, again = delivered.lstrip(), head.lstrip()
    return len(again) < _restart_chars(start) and start.startswith(again)


# -- chunks ----------------------------------------------------------------------------


def _choice0(chunk: Mapping[str, Any]) -> dict[str, Any] | None:
    for choice in chunk.get("choices") or ():
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            return choice
    return None


def text_of(chunk: Mapping[str, Any]) -> str:
    """The text a chunk adds to the reply (its first choice's ``delta.content``)."""
    choice = _choice0(chunk)
    delta = choice.get("delta") if choice is not None else None
    content = delta.get("content") if isinstance(delta, dict) else None
    return content if isinstance(content, str) else ""


def ends_text(chunk: Mapping[str, Any]) -> bool:
    """Whether a chunk carries more than text: a finish reason, usage, or no choices."""
    if chunk.get("usage") is not None or not chunk.get("choices"):
        return True
    choice = _choice0(chunk)
    return choice is None or choice.get("finish_reason") is not None


def says_nothing(chunk: Mapping[str, Any]) -> bool:
    """A chunk with no text, no finish reason, no usage and nothing else: not worth sending."""
    if chunk.get("usage") is not None:
        return False
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    for choice in choices:
        if not isinstance(choice, dict) or choice.get("finish_reason") is not None:
            return False
        if choice.get("logprobs"):
            return False
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return False
        if any(v not in (None, "") for v in delta.values()):
            return False
    return True


def restamp(chunk: dict[str, Any], first: Mapping[str, Any]) -> None:
    """Make a continuation's chunk part of the first stream: its ``id``, ``model`` and
    ``created``, and no second ``role``."""
    chunk.update(first)
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict):
            delta.pop("role", None)


def trim(chunks: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """``chunks`` without the first ``n`` characters of their text; a chunk left
    with nothing to say is dropped."""
    out = []
    for chunk in chunks:
        if n > 0:
            text = text_of(chunk)
            if text:
                taken = min(n, len(text))
                choice = _choice0(chunk)
                assert choice is not None  # it has text
                choice["delta"]["content"] = text[taken:]
                n -= taken
        if not says_nothing(chunk):
            out.append(chunk)
    return out


def add_usage(chunk: dict[str, Any], earlier: int) -> None:
    """Count ``earlier`` completion tokens (the broken streams') in a chunk's usage."""
    usage = chunk.get("usage")
    if not earlier or not isinstance(usage, dict):
        return
    usage = chunk["usage"] = dict(usage)
    for key in ("completion_tokens", "total_tokens"):
        if isinstance(usage.get(key), int):
            usage[key] += earlier


# -- the reply so far --------------------------------------------------------------------


@dataclass(slots=True)
class Transcript:
    """What the client has been sent of the reply, for a continuation to go on from.

    The first stream's event data is kept as it came and parsed only if the
    stream breaks: a stream that ends well costs a list append per event.
    Only a reply of one choice made of text can be continued.
    """

    _pending: list[bytes] = field(default_factory=list)
    _parts: list[str] = field(default_factory=list)
    #: The first stream's ``id``, ``model`` and ``created``.
    first: dict[str, Any] = field(default_factory=dict)
    _unfit: str = ""
    #: Completion tokens the current stream reported so far; those of the streams before.
    reported: int = 0
    earlier: int = 0

    def add_data(self, data: bytes) -> None:
        """An event's data as it came (parsed when the text is needed)."""
        self._pending.append(data)

    def add(self, chunk: Mapping[str, Any]) -> None:
        """A chunk the client was sent."""
        self._settle()
        self._add(chunk)

    def text(self) -> str:
        """The reply's text so far."""
        self._settle()
        return "".join(self._parts)

    def problem(self) -> str:
        """Why this reply cannot be continued ("" when it can)."""
        self._settle()
        return self._unfit

    def end_stream(self) -> None:
        """The current stream broke: its reported tokens count in the next ones' usage."""
        self._settle()
        self.earlier += self.reported
        self.reported = 0

    def _settle(self) -> None:
        pending, self._pending = self._pending, []
        for data in pending:
            chunk = parse_event(data)
            if chunk is not None:
                self._add(chunk)

    def _add(self, chunk: Mapping[str, Any]) -> None:
        if not self.first:
            self.first = {k: chunk[k] for k in IDENTITY if k in chunk}
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.reported = usage["completion_tokens"]
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            delta = delta if isinstance(delta, dict) else {}
            if choice.get("index", 0) != 0 and (delta.get("content") or delta.get("tool_calls")):
                self._unfit = self._unfit or "the reply has several choices"
            elif delta.get("tool_calls") or delta.get("function_call"):
                self._unfit = self._unfit or "the reply has tool calls"
            if choice.get("finish_reason") is not None:
                self._unfit = self._unfit or "the reply had already finished"
            content = delta.get("content")
            if choice.get("index", 0) == 0 and isinstance(content, str):
                self._parts.append(content)


@dataclass(slots=True)
class Seam:
    """A continuation's start, held back until it is known how it joins the delivered text.

    Its chunks are restamped as they come (:func:`restamp`); until :attr:`joined`
    they are held, then released with the restated passage cut, or all dropped
    when the continuation started the reply over.
    """

    delivered: str
    first: Mapping[str, Any]
    held: list[dict[str, Any]] = field(default_factory=list)
    head: str = ""
    joined: Join | None = None

    def take(self, chunk: dict[str, Any]) -> list[dict[str, Any]] | None:
        """The chunks to send now (``[]`` while held); None: a restart, drop the stream."""
        restamp(chunk, self.first)
        if self.joined is not None:
            return [] if says_nothing(chunk) else [chunk]
        self.held.append(chunk)
        self.head += text_of(chunk)
        if not self.head and not ends_text(chunk):
            return []
        return self.decide(final=ends_text(chunk))

    def decide(self, *, final: bool) -> list[dict[str, Any]] | None:
        """Join now if the text held says how (``final``: it must); as :meth:`take`."""
        if self.joined is not None:
            return []
        joined = join(self.delivered, self.head, final=final)
        if joined is None:
            return []
        self.joined = joined
        held, self.held = self.held, []
        if joined.restart:
            return None
        return trim(held, joined.cut)

    @property
    def cut_text(self) -> str:
        """The restated passage that was cut ("" when none)."""
        return self.head[: self.joined.cut] if self.joined is not None else ""
