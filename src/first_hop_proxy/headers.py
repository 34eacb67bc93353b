"""Which headers cross the proxy, in each direction."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from aiohttp.compression_utils import HAS_BROTLI, HAS_ZSTD
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
# The encodings the upstream may answer in: only those the client session decodes
# (br with Brotli, zstd with backports.zstd before Python 3.14; both are dependencies).
# The client's own Accept-Encoding never goes upstream: a reply in an encoding this
# side cannot decode would be lost. The client gets the reply uncompressed.
DECODED_ENCODINGS = ("gzip", "deflate", *(("br",) if HAS_BROTLI else ()))
DECODED_ENCODINGS += ("zstd",) if HAS_ZSTD else ()
ACCEPT_ENCODING = ", ".join(DECODED_ENCODINGS)
# Not forwarded upstream: the proxy decides these itself.
REQUEST_DROP = HOP_BY_HOP | {"accept-encoding"}
# Not forwarded back to the client: the body is re-framed (and decompressed) here.
RESPONSE_DROP = HOP_BY_HOP | {"content-encoding", "x-request-id", "date", "server"}


def _connection_named(headers: Mapping[str, str]) -> set[str]:
    """The header names listed in ``Connection`` (which may be sent more than once)."""
    # A client's: found by hash. (A tuple: ``A | B`` would be built anew at every call.)
    if isinstance(headers, (CIMultiDictProxy, CIMultiDict)):
        values = headers.getall("Connection", ())
    else:
        values = [v for k, v in headers.items() if k.lower() == "connection"]
    return {name.strip().lower() for value in values for name in value.split(",") if name.strip()}


def configured_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The configured headers that carry something, worked out once per config.

    A configured header whose value is empty (an unset variable, e.g.
    ``"Bearer ${KEY:-}"`` with KEY unset) counts as absent, and so does
    ``Accept-Encoding`` (see :data:`ACCEPT_ENCODING`).
    """
    return {
        name: value
        for name, value in headers.items()
        if not is_empty_value(value) and name.lower() != "accept-encoding"
    }


def upstream_headers(
    client: CIMultiDictProxy[str] | Mapping[str, str], configured: Mapping[str, str]
) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop ones and ``Accept-Encoding``;
    ``configured`` (from :func:`configured_headers`) added and winning.

    ``Authorization: Bearer undefined`` (and ``null``, or nothing after ``Bearer``)
    is what SillyTavern sends when no key is stored: it counts as absent.
    """
    return add_configured(forwardable(client), configured)


def forwardable(
    client: CIMultiDictProxy[str] | Mapping[str, str], consumed: frozenset[str] = frozenset()
) -> CIMultiDict[str]:
    """The client's headers that may go upstream: no hop-by-hop ones, no Accept-Encoding,
    no placeholder key, none of ``consumed`` (lower-case names the proxy used itself, such
    as a client key)."""
    named = _connection_named(client)
    drop = REQUEST_DROP | named | consumed if named or consumed else REQUEST_DROP
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
