"""Masking of API keys, tokens and passwords before anything is written to disk.

Logs are shared in bug reports and read over HTTP, so every header, URL, body
and error text passes through a :class:`Redactor` first. Masking keeps just
enough of a key to tell two keys apart (``sk-…wxyz``), never enough to use it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import regex  # type: ignore[import-untyped,unused-ignore]
from multidict import CIMultiDict, CIMultiDictProxy

#: Headers as a mapping or as (name, value) pairs (repeated names kept).
Headers = Mapping[str, str] | Iterable[tuple[str, str]]

ELLIPSIS = "…"
SHORT = "***"
MIN_MASKED_LENGTH = 12
MIN_KNOWN_SECRET = 8
#: Redactors derived with a client's secrets that one redactor keeps (see ``with_secrets``).
_DERIVED_KEPT = 64
#: Texts up to this long that one redactor remembers masked, and how many (see ``text``).
_SHORT_TEXT = 200
_SHORT_KEPT = 512
MAX_VISIBLE = 7
#: The shortest start of a known secret masked when a text ends with it: what a
#: cut through the key would leave behind.
MIN_STUMP = 6

SECRET_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "api-key",
        "x-goog-api-key",
        "cookie",
        "set-cookie",
    }
)
# Any header whose name has one of these in it is taken to carry a credential.
_SECRET_HEADER_WORDS = (
    "key",
    "auth",
    "token",
    "secret",
    "pass",
    "session",
    "cookie",
    "credential",
    "signature",
)
_AUTH_SCHEMES = frozenset({"bearer", "basic", "token", "digest"})
#: What clients send when they hold no key (SillyTavern: ``Bearer undefined``): never a secret,
#: and masking the word would garble every prompt and error message that uses it.
PLACEHOLDERS = frozenset({"", "undefined", "null", "none", "bearer"})

# JSON keys (compared lower-case with '-' and '_' removed) whose values are secrets.
SECRET_KEYS = frozenset(
    {
        "apikey",
        "xapikey",
        "xgoogapikey",
        "accesstoken",
        "refreshtoken",
        "idtoken",
        "sessiontoken",
        "token",
        "authorization",
        "proxyauthorization",
        "password",
        "passwd",
        "secret",
        "clientsecret",
        "cookie",
        "setcookie",
    }
)


@dataclass(frozen=True)
class KeyShape:
    """A kind of key recognizable by its form alone, masked wherever it appears.

    ``hints``: literal text that every match contains, short and rare in prose (a
    text holding none of them is not scanned; shapes share hints, so that a body
    is searched for few of them); ``source``: where the shape is documented.
    """

    name: str
    pattern: str
    hints: tuple[str, ...]
    source: str


# The key shapes, written for this table after the published rules of two maintained
# secret scanners: gitleaks (rule ids in its default config) and TruffleHog (detector
# names). Lengths are a little looser than theirs where a provider does not promise
# one: a key must never slip through, an odd mask in a log costs nothing.
KEY_SHAPES: Final = (
    KeyShape(
        "sk",
        # Prose has words ending in "sk" before a hyphenated phrase ("task-management-
        # system-design"): after a letter or digit, "sk-" starts a key only where that
        # character ends an escape (\n, \u0022, %20) or the run holds a digit (a key of
        # random characters all but always does).
        r"(?:(?<![A-Za-z0-9])|(?<=\\[A-Za-z]|\\u[0-9A-Fa-f]{4}|%[0-9A-Fa-f]{2})"
        r"|(?=sk-[A-Za-z_\-]*[0-9]))sk-[A-Za-z0-9_\-]{16,}",
        ("sk-",),
        "OpenAI sk-, sk-proj-, sk-svcacct-, sk-admin- (gitleaks openai-api-key); Anthropic "
        "sk-ant-api03-, sk-ant-admin01- (gitleaks anthropic-api-key, anthropic-admin-api-key); "
        "OpenRouter sk-or-v1- (TruffleHog openrouter); other OpenAI-compatible sk- keys",
    ),
    KeyShape("google", r"AIza[A-Za-z0-9_\-]{35}", ("AIza",), "gitleaks gcp-api-key"),
    KeyShape("xai", r"xai-[A-Za-z0-9_]{32,}", ("xai-",), "TruffleHog xai (xai- and 80)"),
    KeyShape("groq", r"gsk_[A-Za-z0-9]{32,}", ("_",), "gitleaks groq-api-key (gsk_ and 48+)"),
    KeyShape(
        "huggingface",
        r"hf_[A-Za-z0-9]{34}(?![A-Za-z0-9])",
        ("_",),
        "gitleaks huggingface-access-token",
    ),
    KeyShape(
        "huggingface_org",
        r"api_org_[A-Za-z0-9]{34}(?![A-Za-z0-9])",
        ("_",),
        "gitleaks huggingface-organization-api-token",
    ),
    KeyShape(
        "aws",
        r"A[KSB]IA[A-Z0-9]{16}(?![A-Za-z0-9])",
        ("IA",),
        "gitleaks aws-access-token: access key ids AKIA (long-term), ASIA (temporary), "
        "ABIA (STS bearer); its A3T and ACCA prefixes are not access key ids",
    ),
    KeyShape(
        "github",
        r"gh[pousr]_[A-Za-z0-9]{36,}",
        ("_",),
        "gitleaks github-pat, github-oauth, github-app-token, github-refresh-token",
    ),
    KeyShape(
        "github_fine_grained",
        r"github_pat_[A-Za-z0-9_]{40,}",
        ("_",),
        "gitleaks github-fine-grained-pat (github_pat_ and 82)",
    ),
)

# The words that announce a secret: the secret after them is masked, the word kept.
# Each pattern with the literal texts (hints) without which it cannot match.
_CONTEXT_RULES: Final = (
    (r"(?P<bearer_word>(?i:bearer)\s+)(?P<bearer>[A-Za-z0-9._~+/=\-]{12,})", ("earer", "EARER")),
    (
        r"(?P<json_key>\"(?i:api[_-]?key|apikey|x-api-key|x-goog-api-key|access[_-]?token"
        r"|refresh[_-]?token|id[_-]?token|session[_-]?token|token|client[_-]?secret|secret"
        r"|password|passwd|authorization|proxy-authorization)\"\s*:\s*\")"
        r"(?P<json_value>(?:[^\"\\]|\\.)*)(?=\")",
        (
            *("key", "Key", "KEY", "oken", "OKEN", "ecret", "ECRET", "assw", "ASSW"),
            *("uthorization", "UTHORIZATION"),
        ),
    ),
    (
        r"(?P<query_key>(?<![A-Za-z0-9_])(?i:key|api_key|apikey|api-key|access_token|token)=)"
        r"(?P<query_value>[^&\s\"'#<>]+)",
        ("key", "Key", "KEY", "oken", "OKEN"),
    ),
    (r"(?P<userinfo>://[^/\s:@\"']+:)(?P<password>[^/\s@\"']+)(?=@)", ("@",)),
)
# Every rule as its own pattern, run only on a text holding one of its hints: each
# starts with a literal the `regex` engine finds fast, about 0.6 us per KB, where
# one alternation of all of them tried each rule at each character (70-160 ns per
# character of prose). The words come first, so "Bearer sk-..." keeps its word.
# The engine releases the GIL while it scans (``concurrent=True``): a
# multi-megabyte body redacted in the log writer thread never stalls the event loop.
_RULES: Final = tuple(
    (regex.compile(pattern, regex.V0), hints)
    for pattern, hints in (
        *_CONTEXT_RULES,
        *((f"(?P<shape>{shape.pattern})", shape.hints) for shape in KEY_SHAPES),
    )
)
# Substrings without which no rule can match: checking them is much cheaper
# than running the rules over a long body.
_HINTS = tuple(dict.fromkeys(hint for _, hints in _RULES for hint in hints))
_SCALARS = frozenset({int, float, bool, type(None)})


def _hint_groups(hints: tuple[str, ...]) -> tuple[tuple[bytes, bool, tuple[str, ...]], ...]:
    """The hints as a whole body is searched for them: (needle, case-blind, hints).

    Hints written in several cases ("key", "Key", "KEY") are looked for once, in
    the lower-cased body; the others ("IA") as they are, so that a body full of
    "ia" is not then searched string by string for "IA".
    """
    by_lower: dict[str, tuple[str, ...]] = {}
    for hint in hints:
        by_lower[hint.lower()] = (*by_lower.get(hint.lower(), ()), hint)
    return tuple(
        (low.encode(), True, group) if len(group) > 1 else (group[0].encode(), False, group)
        for low, group in by_lower.items()
    )


_HINT_GROUPS = _hint_groups(_HINTS)
# Characters JSON may write as escapes: a secret holding one cannot be found in raw JSON.
_ESCAPABLE = frozenset('"\\/') | frozenset(map(chr, range(32)))
_DATA_URL_RE: Any = regex.compile(r"data:[\w.+-]+/[\w.+-]+;base64,[A-Za-z0-9+/=\s]*\Z")
# A key's leading words, such as "sk-", "sk-proj-" or "sk-ant-api03-": an upstream may
# echo the key without them.
_PREFIX_WORD: Any = regex.compile(r"[A-Za-z][A-Za-z0-9]{0,7}[-_]")
# What may follow the stump of a cut key at the end of a text.
_AFTER_CUT = " \t\r\n" + ELLIPSIS + ".\"')]}"
_SPACE: Any = regex.compile(r"\s+")


def mask(secret: str) -> str:
    """A short, non-reversible stand-in for ``secret``: ``sk-…wxyz``, or ``***`` if short."""
    secret = secret.strip()
    if len(secret) < MIN_MASKED_LENGTH:
        return SHORT
    if len(secret) < 20:
        return ELLIPSIS + secret[-4:]
    if secret.startswith("AIza"):
        prefix = "AIza"
    elif secret.startswith("sk-"):
        prefix = "sk-"
    else:
        prefix = secret[:3]
    suffix = min(4, MAX_VISIBLE - len(prefix))
    return f"{prefix}{ELLIPSIS}{secret[-suffix:]}"


@functools.lru_cache(maxsize=4096)
def is_secret_header(name: str) -> bool:
    """Whether a header of this name carries a credential (remembered per name)."""
    lowered = name.lower()
    return lowered in SECRET_HEADERS or any(w in lowered for w in _SECRET_HEADER_WORDS)


@functools.lru_cache(maxsize=4096)
def is_secret_key(name: str) -> bool:
    return name.lower().replace("-", "").replace("_", "") in SECRET_KEYS


def mask_header_value(value: str) -> str:
    """Mask a credential header value, keeping its scheme word (``Bearer sk-…wxyz``).

    A placeholder (``Bearer undefined``) is shown as it is: it says no key was sent.
    """
    if is_placeholder(value):
        return value
    scheme, sep, rest = value.strip().partition(" ")
    if sep and scheme.lower() in _AUTH_SCHEMES:
        return f"{scheme} {mask(rest)}"
    return mask(value)


def credential(value: str) -> str:
    """A credential header's secret part: the value without its scheme word (``Bearer``)."""
    scheme, sep, rest = value.strip().partition(" ")
    return rest.strip() if sep and scheme.lower() in _AUTH_SCHEMES else value.strip()


def is_placeholder(value: str) -> bool:
    """A header value that carries no key: empty, ``Bearer`` alone, ``Bearer undefined``..."""
    return credential(value).lower() in PLACEHOLDERS


def url_secrets(url: str) -> list[str]:
    """The values of key-like query parameters and the password in ``url``."""
    try:
        parts = urlsplit(url)
        found = [v for k, v in parse_qsl(parts.query) if is_secret_header(k)]
        password = parts.password
    except ValueError:
        return []
    return [*found, password] if password else found


def _bodies(secret: str) -> Iterator[str]:
    """``secret``, and what is left of it without its leading words (``sk-``, ``proj-``...)."""
    yield secret
    rest = secret
    for _ in range(3):
        word = _PREFIX_WORD.match(rest)
        if word is None:
            break
        rest = rest[word.end() :]
        if len(rest) >= MIN_MASKED_LENGTH:
            yield rest
    if secret.startswith("AIza") and len(secret) - 4 >= MIN_MASKED_LENGTH:
        yield secret[4:]


def header_secrets(headers: Headers) -> list[str]:
    """The credential values in ``headers`` (scheme word removed), to mask wherever they occur.

    Placeholders (``Bearer undefined``) are left out: they are words, not keys.
    """
    found: list[str] = []
    for name, value in _header_items(headers):
        if is_secret_header(name):
            secret = credential(value)
            if secret.lower() not in PLACEHOLDERS:
                found.append(secret)
    return found


#: Header mappings: the ones the proxy meets first, the (slower) abstract Mapping last.
_MAPPINGS = (dict, CIMultiDictProxy, CIMultiDict, Mapping)


def _header_items(
    headers: Headers,
) -> Iterable[tuple[str, str]]:
    if isinstance(headers, _MAPPINGS):
        return headers.items()
    return headers


class Redactor:
    """Masks key-shaped strings, plus ``extra_secrets`` known exactly wherever they appear.

    Known secrets (the configured upstream key, the client's key) are masked even
    when they do not look like keys, and so is each one's body without its
    ``sk-``-style prefix. Instances are immutable and thread-safe.
    """

    def __init__(self, extra_secrets: Iterable[str] = ()) -> None:
        secrets = {s.strip() for s in extra_secrets if s and len(s.strip()) >= MIN_KNOWN_SECRET}
        self._secrets = tuple(secrets)
        known: dict[str, str] = {}
        for secret in sorted(secrets):
            stand_in = mask(secret)
            for needle in _bodies(secret):
                known.setdefault(needle, stand_in)
        # (text to find, what replaces it), longest first: a secret containing
        # another is replaced whole. A body stands for its whole key.
        self._known: tuple[tuple[str, str], ...] = tuple(
            sorted(known.items(), key=lambda item: len(item[0]), reverse=True)
        )
        self._derived: dict[tuple[str, ...], Redactor] = {}
        self._short: dict[str, str] = {}

    def with_secrets(self, extra_secrets: Iterable[str]) -> Redactor:
        """A redactor that also masks ``extra_secrets``.

        Remembered per set of secrets: a client sends the same key on every
        request, and building a redactor each time was 4-6 % of a request's CPU,
        on the event loop and again on the log writer (measured).
        """
        extra = tuple(s for s in extra_secrets if s)
        if not extra:
            return self
        derived = self._derived.get(extra)
        if derived is None:
            derived = Redactor([*self._secrets, *extra])
            if len(self._derived) >= _DERIVED_KEPT:
                self._derived.clear()  # bounded, however many keys clients send
            self._derived[extra] = derived
        return derived

    def with_header_secrets(self, headers: Headers) -> Redactor:
        """A redactor that also masks the credentials in ``headers`` (a client's key)."""
        return self.with_secrets(header_secrets(headers))

    def text(self, text: str) -> str:
        """Mask known secrets and key-shaped strings anywhere in ``text``.

        Short texts are remembered (bounded): the same model name or header
        value is masked for every request's console line and log.
        """
        if len(text) > _SHORT_TEXT:
            return self._text(text, self._known, _HINTS)
        masked = self._short.get(text)
        if masked is None:
            masked = self._text(text, self._known, _HINTS)
            if len(self._short) >= _SHORT_KEPT:
                self._short.clear()
            self._short[text] = masked
        return masked

    def url(self, url: str) -> str:
        """Mask key-like query values and ``user:password@`` credentials in ``url``."""
        return self.text(url)

    def headers(self, headers: Headers) -> dict[str, str]:
        """Headers as a dict, credential values masked and other values scrubbed."""
        out: dict[str, str] = {}
        for key, value in _header_items(headers):
            name = str(key)  # multidict's istr is a str subclass that JSON encoders refuse
            masked = mask_header_value(value) if is_secret_header(name) else self.text(value)
            out[name] = f"{out[name]}, {masked}" if name in out else masked
        return out

    def obj(self, obj: Any) -> Any:
        """A copy of JSON-like data: secret-named fields and key-shaped strings masked."""
        return self._obj(obj, self._known, _HINTS)

    def parsed_json(self, raw: bytes, parsed: Any) -> Any:
        """``obj(parsed)``, where ``parsed`` was decoded from the JSON text ``raw``.

        Faster for the same result: a known secret or a key-shape hint that is
        nowhere in ``raw`` cannot be in any of its strings, so each string is
        checked only for those that are (usually a few, against all of them).
        When nothing needs masking, ``parsed`` itself is returned, not a copy.
        """
        if b"\\u" in raw and _has_unicode_escape(raw):
            return self.obj(parsed)  # an escape could spell a hint the raw text does not show
        known = tuple(
            k for k in self._known if _ESCAPABLE.intersection(k[0]) or k[0].encode() in raw
        )
        lowered = raw.lower()
        hints = tuple(
            hint
            for needle, blind, group in _HINT_GROUPS
            if needle in (lowered if blind else raw)
            for hint in group
        )
        if _clean(parsed, known, hints):
            return parsed
        return self._obj(parsed, known, hints)

    def _obj(self, obj: Any, known: _Known, hints: tuple[str, ...]) -> Any:
        kind = type(obj)
        if kind is str:
            return self._string(obj, known, hints)
        if kind in _SCALARS:
            return obj
        if kind is dict or isinstance(obj, Mapping):
            out: dict[Any, Any] = {}
            for key, value in obj.items():
                if type(value) is str and type(key) is str and is_secret_key(key):
                    out[key] = mask_header_value(value)
                else:
                    out[key] = self._obj(value, known, hints)
            return out
        if kind is list or isinstance(obj, list | tuple):
            return [self._obj(item, known, hints) for item in obj]
        if isinstance(obj, str):  # a str subclass
            return self._string(str(obj), known, hints)
        return obj

    def _string(self, value: str, known: _Known, hints: tuple[str, ...]) -> str:
        # Inline images are large and cannot hold a key-shaped string ('-' is not
        # base64), so only the cheap known-secret check runs over them.
        if len(value) > 4096 and value.startswith("data:") and _DATA_URL_RE.match(value):
            return self._text(value, known, ())
        return self._text(value, known, hints)

    @staticmethod
    def _text(text: str, known: _Known, hints: tuple[str, ...]) -> str:
        for secret, stand_in in known:
            if secret in text:
                text = text.replace(secret, stand_in)
        if known:
            text = _mask_stump(text, known)
        for hint in hints:
            if hint in text:
                break
        else:
            return text
        for pattern, rule_hints in _RULES:
            for hint in rule_hints:
                if hint in text:
                    text = pattern.sub(_mask_match, text, concurrent=True)
                    break
        return text


_Known = tuple[tuple[str, str], ...]


def _mask_stump(text: str, known: _Known) -> str:
    """``text`` with the start of a known secret masked where it ends the text.

    A safeguard: every text is masked before it is cut, but a cut made before
    masking would leave ``sk-TESTSECRET12`` that neither the exact secret nor a
    key shape recognizes.
    """
    core = text.rstrip(_AFTER_CUT)
    for secret, stand_in in known:
        head = secret[:MIN_STUMP]
        at = core.find(head, max(0, len(core) - len(secret) + 1))
        while at != -1:
            if secret.startswith(core[at:]):
                return core[:at] + stand_in + text[len(core) :]
            at = core.find(head, at + 1)
    return text


def _has_unicode_escape(raw: bytes) -> bool:
    """Whether the JSON text ``raw`` holds a ``\\uXXXX`` escape.

    In JSON a backslash always starts a two-character escape, so dropping
    every escaped backslash (left to right, as a parser reads them) leaves
    ``\\u`` only where a unicode escape begins. One pass of ``bytes.replace``:
    a regex with a lookbehind took 135 us on a body full of ``\\\\u007c``.
    """
    return b"\\u" in raw.replace(b"\\\\", b"")


def _clean(obj: Any, known: _Known, hints: tuple[str, ...]) -> bool:
    """True when masking would leave ``obj`` as it is: no secret-named field holds a
    string, and no string holds a known secret or a hint (inline images: a known
    secret), as :meth:`Redactor._obj` would look for them.

    Cheaper than building the masked copy; anything unusual counts as not clean.
    """
    kind = type(obj)
    if kind is str:
        if len(obj) > 4096 and obj.startswith("data:") and _DATA_URL_RE.match(obj):
            hints = ()
        for needle, _ in known:
            if needle in obj:
                return False
        for needle in hints:  # noqa: SIM110 (plain loops: a generator costs more here)
            if needle in obj:
                return False
        return True
    if kind is dict:
        for key, value in obj.items():
            if type(key) is not str:
                return False
            if type(value) is str and is_secret_key(key):
                return False
            if not _clean(value, known, hints):
                return False
        return True
    if kind is list:
        for item in obj:  # noqa: SIM110
            if not _clean(item, known, hints):
                return False
        return True
    return kind in _SCALARS


def _mask_match(match: Any) -> str:
    group: str | None = match.lastgroup
    whole: str = match.group(0)
    if group == "shape":
        return mask(whole)
    prefix_of = {
        "bearer": "bearer_word",
        "json_value": "json_key",
        "query_value": "query_key",
        "password": "userinfo",
    }
    if group not in prefix_of:
        return whole
    prefix: str = match.group(prefix_of[group])
    secret: str = match.group(group)
    return prefix + (SHORT if group == "password" else mask(secret))


_PLAIN = Redactor()


def redact_text(text: str) -> str:
    """Mask key-shaped strings (:data:`KEY_SHAPES`, ``Bearer …``, ``"api_key": "…"``) in text."""
    return _PLAIN.text(text)


def redact_url(url: str) -> str:
    """Mask ``key=``/``api_key=``/``access_token=`` query values and URL passwords."""
    return _PLAIN.url(url)


def masked_url(url: str) -> str:
    """An upstream URL without credentials or query values (keys often live there)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2] or url
    if parts.username or parts.password:
        netloc = "***@" + netloc
    query = "&".join(
        f"{pair.split('=', 1)[0]}=***" if "=" in pair else pair
        for pair in parts.query.split("&")
        if pair
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def redact_headers(headers: Headers) -> dict[str, str]:
    """Headers with credential values masked (scheme word kept)."""
    return _PLAIN.headers(headers)


def redact_obj(obj: Any) -> Any:
    """A JSON-like structure with secret fields and key-shaped strings masked."""
    return _PLAIN.obj(obj)


def clip(text: str, limit: int, mask_secrets: Callable[[str], str] = redact_text) -> str:
    """Mask first, cut after: ``text`` masked, on one line, at most ``limit`` characters.

    The one way a text is shortened for an error body, a log or the console:
    cutting first could leave a stump of a key that no masking recognizes.
    """
    text = mask_secrets(text)
    # Printable text has no whitespace but single spaces unless it holds two in a
    # row: then there is nothing to fold (most texts; the regex call is not free).
    if not text.isprintable() or "  " in text:
        text = _SPACE.sub(" ", text)
    text = text.strip()
    if len(text) > limit:
        return text[: limit - 1].rstrip() + ELLIPSIS
    return text
