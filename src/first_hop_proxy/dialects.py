"""How community reverse proxies say that something failed, when they do not say it plainly.

Most upstreams that SillyTavern users share are community reverse proxies. To
show errors in clients that handle errors poorly, they send most of them as a
*successful* completion whose text is the error: HTTP 200, the error as
markdown in the reply (or in a stream's first chunk), and the error's title as
the ``finish_reason``::

    ### **Proxy error (HTTP 429 Too Many Requests)**
    The proxy encountered an error ...
    *<the upstream's message>*
    ```json
    {"error": {...}, "proxy_note": "..."}
    ```

Older deployments send ``**<title>**`` and the message on the next line; the
oldest ended queued streams with ``[proxy queue error: <message>]``. Delivered
as it is, the person reads the error as the character's reply and it is saved
into the chat. :func:`disguised_error` recognises these shapes so the decision
core can treat them as the error they are. Pure functions, no I/O.

Only the very start of the reply (a banner) or the ``finish_reason`` (a title)
counts: a reply that merely mentions "proxy error" is a reply.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson
import regex  # type: ignore[import-untyped, unused-ignore]

#: The status for a disguised error whose title names none (queue and stream errors).
DEFAULT_STATUS: Final = 502
#: The response header some deployments add when nothing had been sent yet.
ERROR_HEADER: Final = "x-oai-proxy-error"

#: What the title of a disguised error looks like (``response_parsing.disguised_errors``),
#: matched case-insensitively at the start of a banner's title or a ``finish_reason``.
DEFAULT_TITLE_PATTERN: Final = r"proxy(?: [a-z]+)? error\b"
#: A title pattern from the config runs on at most this many characters, for at most
#: this long: an upstream must not be able to make a careless pattern freeze the proxy.
_TITLE_CHARS: Final = 200
_TITLE_SECONDS: Final = 0.05
_TITLES_SEEN: Final = 256

_BANNER: Final = re.compile(r"\s*(?:#{1,6}[ \t]*)?\*\*(?P<title>[^*\n]{1,200}?)\*\*")
_BANNER_STARTS: Final = ("#", "*", "")
_BRACKETED: Final = re.compile(r"\s*\[(?P<title>[^:\]\n]{1,100}):\s*(?P<message>.*)\]\s*\Z", re.S)
_STATUS: Final = re.compile(r"\bHTTP (?P<code>[1-5]\d\d)\b")
_FENCE: Final = re.compile(r"```[a-zA-Z]*\n(?P<body>.*?)\n\s*```", re.S)
_ITALIC: Final = re.compile(r"^\*(?P<text>[^*\s][^\n]*?)\*$", re.M)
#: The sentence every banner of the current format carries; it explains nothing.
_BOILERPLATE: Final = "The proxy encountered an error"
#: How much of a reply is looked at for a banner: a banner is short and comes first.
_HEAD: Final = 4096


@dataclass(frozen=True, slots=True)
class Disguised:
    """An error sent as a reply: the status it stands for and what it says."""

    status: int
    title: str
    message: str

    @property
    def text(self) -> str:
        """What a person should read: the title, then the upstream's own words."""
        if self.message and self.message not in self.title:
            return f"{self.title}: {self.message}"
        return self.title


def _first_choice(doc: Any) -> dict[str, Any] | None:
    if not isinstance(doc, dict):
        return None
    choices = doc.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    choice: dict[str, Any] = choices[0]
    return choice


def _reply_text(choice: dict[str, Any]) -> str:
    for key in ("message", "delta"):
        part = choice.get(key)
        if isinstance(part, dict):
            content = part.get("content")
            if isinstance(content, str):
                return content
    text = choice.get("text")
    return text if isinstance(text, str) else ""


class Title:
    """The compiled title pattern: does a banner's title or a finish reason look like one?"""

    __slots__ = ("_pattern", "_seen")

    def __init__(self, pattern: str = DEFAULT_TITLE_PATTERN) -> None:
        self._pattern: Any = regex.compile(pattern, regex.IGNORECASE | regex.V0)
        #: Answers already worked out. Every reply's ``finish_reason`` is asked
        #: about and nearly all are ``stop`` or ``length``: a dict lookup instead
        #: of a timed regex call (4 % of a request's event-loop time, measured).
        self._seen: dict[str, bool] = {}

    def matches(self, text: str) -> bool:
        text = text.strip()[:_TITLE_CHARS]
        known = self._seen.get(text)
        if known is not None:
            return known
        try:
            found = self._pattern.match(text, timeout=_TITLE_SECONDS) is not None
        except TimeoutError:
            return False  # not remembered: a slow moment is not the text's fault
        if len(self._seen) >= _TITLES_SEEN:
            self._seen.clear()  # bounded, whatever an upstream sends
        self._seen[text] = found
        return found


DEFAULT_TITLE: Final = Title()


def disguised_error(
    doc: Any,
    headers: Mapping[str, str] | None = None,
    *,
    title: Title = DEFAULT_TITLE,
    anywhere: bool = True,
) -> Disguised | None:
    """The error hidden in a completion or stream chunk ``doc``, or None for a real reply.

    ``title`` is the compiled title pattern. ``headers`` (lower-case names) may
    carry the ``x-oai-proxy-error`` marker. ``anywhere=False`` is for chunks
    after real content: there only the ``finish_reason`` title counts, since a
    token may well begin with ``**``.
    """
    choice = _first_choice(doc)
    if choice is None:
        return None
    finish = choice.get("finish_reason")
    titled = isinstance(finish, str) and title.matches(finish)
    marked = headers is not None and bool(headers.get(ERROR_HEADER))
    text = _reply_text(choice)
    # Only the first _HEAD characters are looked at (matched in place: no copy).
    # A banner starts with '#' or '**' (after any whitespace): most replies do not.
    first = text[:1]
    banner = _BANNER.match(text, 0, _HEAD) if first in _BANNER_STARTS or first.isspace() else None
    if banner is not None and not title.matches(banner["title"]):
        banner = None
    killed = _BRACKETED.match(text, 0, _HEAD) if "[" in text[:8] else None
    if killed is not None and not title.matches(killed["title"]):
        killed = None
    if not (titled or (anywhere and (banner or killed or marked))):
        return None
    if killed is not None:
        return Disguised(DEFAULT_STATUS, killed["title"], killed["message"].strip())
    if banner is not None:
        name = banner["title"].strip()
        body = text[banner.end() :]
    else:
        name = finish.strip() if titled and isinstance(finish, str) else ""
        name = name or (headers or {}).get(ERROR_HEADER, "").strip() or "Proxy error"
        body = text
    return Disguised(status_of(name), name, message_of(body))  # cut once masked


def status_of(title: str) -> int:
    """The HTTP status a title names (``Proxy error (HTTP 401 Unauthorized)``), else 502."""
    found = _STATUS.search(title)
    if found is not None:
        code = int(found["code"])
        if 400 <= code <= 599:
            return code
    return DEFAULT_STATUS


def message_of(markdown: str) -> str:
    """The upstream's own words in a banner's markdown: its JSON block's message, or
    the italic line, or the first line of text; never the markdown or JSON itself."""
    fence = _FENCE.search(markdown)
    if fence is not None:
        said = _json_message(fence["body"])
        if said:
            return said
    italic = _ITALIC.search(markdown)
    if italic is not None:
        return italic["text"].strip()
    for line in _FENCE.sub("", markdown).splitlines():
        line = line.strip().strip("*_").strip()
        if not line or line.startswith(("```", "<!--", "---", "#")) or _BOILERPLATE in line:
            continue
        if line.startswith(("{", "[")):
            break
        return line
    return ""


def _json_message(text: str) -> str:
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError:
        return ""
    return json_error_message(doc)


def json_error_message(doc: Any, depth: int = 0) -> str:
    """``error.message`` (however deeply the error objects nest), else ``message``,
    else ``proxy_note``: the most specific words an error object has."""
    if not isinstance(doc, dict) or depth > 4:
        return ""
    error = doc.get("error")
    if isinstance(error, dict):
        found = json_error_message(error, depth + 1)
        if found:
            return found
    elif isinstance(error, str) and error.strip():
        return error.strip()
    for key in ("message", "proxy_note", "detail"):
        value = doc.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""
