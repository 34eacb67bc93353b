"""Which headers cross the proxy, in each direction."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from multidict import CIMultiDict, CIMultiDictProxy

from .redact import is_placeholder

# RFC 9110 section 7.6.1 connection-specific fields, plus the ones this proxy sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
# Not forwarded back to the client: the body is re-framed (and decompressed) here.
RESPONSE_DROP = HOP_BY_HOP | {"content-encoding", "x-request-id", "date", "server"}


def _connection_named(headers: Mapping[str, str]) -> set[str]:
    """The header names listed in ``Connection`` (which may be sent more than once)."""
    values = [v for k, v in headers.items() if k.lower() == "connection"]
    return {name.strip().lower() for value in values for name in value.split(",") if name.strip()}


def configured_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The configured headers that carry something, worked out once per config.

    A configured header whose value is empty (an unset variable, e.g.
    ``"Bearer ${KEY:-}"`` with KEY unset) counts as absent.
    """
    return {name: value for name, value in headers.items() if not is_empty_value(value)}


def upstream_headers(
    client: CIMultiDictProxy[str] | Mapping[str, str], configured: Mapping[str, str]
) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop ones; ``configured`` (from
    :func:`configured_headers`) added and winning.

    ``Authorization: Bearer undefined`` (and ``null``, or nothing after ``Bearer``)
    is what SillyTavern sends when no key is stored: it counts as absent.
    """
    return add_configured(forwardable(client), configured)


def forwardable(client: CIMultiDictProxy[str] | Mapping[str, str]) -> CIMultiDict[str]:
    """The client's headers that may go upstream: no hop-by-hop ones, no placeholder key."""
    drop = HOP_BY_HOP | _connection_named(client)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in client.items():
        lower = name.lower()
        if lower in drop:
            continue
        if lower == "authorization" and is_placeholder(value):
            continue
        out.add(name, value)
    return out


def add_configured(base: CIMultiDict[str], configured: Mapping[str, str]) -> CIMultiDict[str]:
    """``base`` with an upstream's ``configured`` headers added, winning (a copy if needed)."""
    if not configured:
        return base
    out = base.copy()
    for name, value in configured.items():
        out[name] = value
    return out


def is_empty_value(value: str) -> bool:
    """A header value that carries nothing: empty, or a bearer without a token
    (``Bearer``, ``Bearer undefined``, ``Bearer null``)."""
    return is_placeholder(value)


def client_headers(upstream: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    """The upstream's response headers that still mean something after the proxy."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream:
        if name.lower() not in RESPONSE_DROP:
            out.add(name, value)
    return out
