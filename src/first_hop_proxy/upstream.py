"""One attempt at the upstream: send the request, read what came back.

Each function here performs a single attempt and reports what happened as a
:class:`Reply`; it never decides whether to retry. Transport failures become
values (``error`` set), not exceptions, so the caller has one thing to inspect.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from .assemble import Assembler
from .dialects import Title, disguised_error
from .sse import EventSplitter, event_data, parse_event

if TYPE_CHECKING:
    from .upstreams import Upstream

EMPTY_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
MB = 1024 * 1024


class ReplyTooLarge(aiohttp.ClientError):
    """The upstream's reply passed ``target_proxy.max_reply_mb``; the rest was not read."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


@dataclass(slots=True, eq=False)
class Reply:
    """What one upstream attempt produced."""

    status: int | None = None
    headers: CIMultiDictProxy[str] = field(default_factory=lambda: EMPTY_HEADERS)
    body: bytes = b""
    error: str | None = None  # "connection_error", "timeout", "cut_short"
    message: str = ""
    # Streams: the open response and the events read before the first content.
    response: aiohttp.ClientResponse | None = None
    splitter: EventSplitter | None = None
    events: list[bytes] = field(default_factory=list)
    first_content: bool = False
    judged: int | None = None  # events up to the first content: what the decision sees
    error_event: bytes | None = None
    finish_reason: str | None = None
    #: A JSON request sent upstream as a stream, its events assembled into ``body``.
    assembled: bool = False
    # Comments before the first content (a community proxy's queue heartbeats, up to
    # 1 MB each): counted, not kept; the stream is alive while they come.
    comments: int = 0
    comment_bytes: int = 0
    first_comment: str = ""
    # Bytes read so far, and the most the proxy may hold (target_proxy.max_reply_mb).
    received: int = 0
    limit: int = 50 * MB

    def count(self, chunk: bytes) -> None:
        """Count ``chunk`` as read; ReplyTooLarge once what is held passes the limit
        (the heartbeat comments before the first content are not held)."""
        self.received += len(chunk)
        if self.received - self.comment_bytes > self.limit:
            raise ReplyTooLarge(self.limit)

    def close(self) -> None:
        """Drop the upstream connection (a stream we stop reading must not linger)."""
        if self.response is not None:
            self.response.close()
            self.response = None

    def payloads(self) -> str:
        """The data of the events up to the first content, for the decision rules.

        Events after it (read in the same chunk) belong to the delivered stream:
        judging them would make the decision depend on how reads were split.
        """
        parts = [event_data(e) or b"" for e in self.events[: self.judged]]
        return b"\n".join(p for p in parts if p).decode("utf-8", "replace")


def host_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc.rpartition("@")[2] or url


def describe_failure(
    exc: BaseException, url: str, timeout: float, setting: str = "target_proxy"
) -> tuple[str, str]:
    """Turn a transport exception into (kind, a sentence a person can act on).

    ``setting`` is where the upstream is configured (``target_proxy`` or
    ``upstreams[name]``), so the sentence names the key to change.
    """
    host = host_of(url)
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "timeout", f"Could not connect to the upstream at {host} in time (connect timeout)."
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return "timeout", (
            f"The upstream at {host} sent nothing for {timeout:g} s "
            f"({setting}.timeout); it may be overloaded or hung."
        )
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "connection_error", (
            f"Could not resolve the upstream host {host}: check {setting}.url "
            "and your internet connection."
        )
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return "connection_error", f"TLS handshake with the upstream at {host} failed: {exc}."
    if isinstance(exc, aiohttp.ClientConnectorError):
        errno = exc.os_error.errno
        cause = os.strerror(errno).lower() if errno else str(exc.os_error)
        return "connection_error", (
            f"Could not connect to the upstream at {host}: {cause}. "
            f"Check {setting}.url and that the upstream is running."
        )
    if isinstance(exc, ReplyTooLarge):
        return "too_large", (
            f"The upstream at {host} sent a reply larger than {exc.limit / MB:g} MB "
            "(target_proxy.max_reply_mb); the rest was not read."
        )
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "cut_short", f"The upstream at {host} cut its reply short: {exc}."
    if isinstance(exc, aiohttp.ServerDisconnectedError | ConnectionResetError):
        return "connection_error", f"The upstream at {host} closed the connection unexpectedly."
    if isinstance(exc, ssl.SSLError):
        return "connection_error", f"TLS error with the upstream at {host}: {exc}."
    return "connection_error", f"Request to the upstream at {host} failed: {exc!r}."


TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


def failure(exc: BaseException, upstream: Upstream) -> tuple[str, str]:
    """:func:`describe_failure` for one of the configured upstreams."""
    return describe_failure(exc, upstream.url, upstream.read_timeout, upstream.setting)


async def fetch(
    session: aiohttp.ClientSession,
    upstream: Upstream,
    body: bytes,
    headers: Mapping[str, str],
    max_bytes: int,
) -> Reply:
    """A non-streaming attempt: the whole reply (up to ``max_bytes``), or the failure."""
    reply = Reply(limit=max_bytes)
    try:
        async with session.post(
            upstream.url, data=body, headers=headers, timeout=upstream.timeout
        ) as resp:
            reply.status, reply.headers = resp.status, resp.headers
            reply.body = await read_body(resp, reply)
            return reply
    except TRANSPORT_ERRORS as exc:
        kind, message = failure(exc, upstream)
        return Reply(status=reply.status, error=kind, message=message)


async def read_body(resp: aiohttp.ClientResponse, reply: Reply) -> bytes:
    """The response body, read chunk by chunk up to the reply's limit.

    Past the limit the connection is dropped: nothing more is read, and what was
    read is freed, so a hostile upstream cannot make the proxy hold its reply.
    """
    declared = resp.content_length
    if (
        declared is not None
        and reply.received + declared - reply.comment_bytes <= reply.limit
        and "Content-Encoding" not in resp.headers
    ):
        # An uncompressed reply whose Content-Length is within the limit (most JSON
        # replies): one read. The parser stops at the length said, so nothing past it
        # can arrive (a compressed one could inflate past its length: read in chunks).
        body = await resp.read()
        reply.count(body)
        return body
    chunks: list[bytes] = []
    try:
        async for chunk in resp.content.iter_any():
            reply.count(chunk)
            chunks.append(chunk)
    except ReplyTooLarge:
        resp.close()
        raise
    return b"".join(chunks)


JSON_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(
    CIMultiDict({"Content-Type": "application/json"})
)


async def fetch_assembled(
    session: aiohttp.ClientSession,
    upstream: Upstream,
    body: bytes,
    headers: Mapping[str, str],
    max_bytes: int,
) -> Reply:
    """A JSON request sent as a stream: the whole stream read and assembled into the
    ``chat.completion`` the client asked for (:mod:`assemble`).

    Nothing has reached the client, so a stream that breaks half-way is a
    failed attempt (retried), not a delivered fragment; an error event ends the
    reading and becomes the reply's body, for the decision core to judge.
    """
    try:
        resp = await session.post(
            upstream.url, data=body, headers=headers, timeout=upstream.timeout
        )
    except TRANSPORT_ERRORS as exc:
        kind, message = failure(exc, upstream)
        return Reply(error=kind, message=message, assembled=True)
    reply = Reply(status=resp.status, headers=resp.headers, assembled=True, limit=max_bytes)
    try:
        if not (200 <= resp.status < 300) or not is_event_stream(resp):
            reply.body = await read_body(resp, reply)  # an error, or a JSON reply after all
            return reply
        splitter, assembler = EventSplitter(), Assembler()
        async for chunk in resp.content.iter_any():
            for event in splitter.feed(chunk):
                if event.startswith(b":"):  # a heartbeat: not kept, so not counted
                    reply.comment_bytes += len(event)
                    continue
                data = event_data(event)
                payload = parse_event(data)
                if payload is None:
                    continue
                if payload.get("error") and not payload.get("choices"):
                    reply.body = data or b""  # judged as a 200 carrying an error
                    return reply
                assembler.feed(payload)
            reply.count(chunk)
        rest = splitter.flush()
        payload = parse_event(event_data(rest)) if rest is not None else None
        if payload is not None:
            assembler.feed(payload)
    except TRANSPORT_ERRORS as exc:
        reply.error, reply.message = failure(exc, upstream)
        return reply
    finally:
        resp.close()
    reply.headers = JSON_HEADERS
    reply.body = orjson.dumps(assembler.result())
    return reply


def is_event_stream(resp: aiohttp.ClientResponse) -> bool:
    return resp.content_type == "text/event-stream"


def inspect_chunk(payload: Any) -> tuple[bool, bool, str | None]:
    """(has content, is an error, finish reason) of one parsed stream event."""
    if not isinstance(payload, dict):
        return False, False, None
    if payload.get("error"):
        return False, True, None
    finish: str | None = None
    for choice in payload.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        finish = choice.get("finish_reason") or finish
        delta = choice.get("delta") or choice.get("message") or {}
        if isinstance(delta, dict):
            content = delta.get("content")
            if (isinstance(content, str) and content) or delta.get("tool_calls"):
                return True, False, finish
            if delta.get("function_call"):
                return True, False, finish
        text = choice.get("text")
        if isinstance(text, str) and text:
            return True, False, finish
    return False, False, finish


async def open_stream(
    session: aiohttp.ClientSession,
    upstream: Upstream,
    body: bytes,
    headers: Mapping[str, str],
    max_bytes: int,
    disguise: Title | None = None,
) -> Reply:
    """A streaming attempt, read up to its first content.

    Nothing has reached the client yet, so whatever goes wrong before the first
    content can still be retried unseen. On success the reply holds the open
    response and the events read so far; the caller relays them and the rest.
    """
    try:
        resp = await session.post(
            upstream.url, data=body, headers=headers, timeout=upstream.timeout
        )
    except TRANSPORT_ERRORS as exc:
        kind, message = failure(exc, upstream)
        return Reply(error=kind, message=message)
    reply = Reply(status=resp.status, headers=resp.headers, limit=max_bytes)
    try:
        if not (200 <= resp.status < 300) or not is_event_stream(resp):
            reply.body = await read_body(resp, reply)
            resp.release()
            return reply
        splitter = EventSplitter()
        async for chunk in resp.content.iter_any():
            found = _scan(reply, splitter.feed(chunk), disguise)
            reply.count(chunk)
            if found:
                break
        else:
            rest = splitter.flush()
            if rest is not None:
                _scan(reply, iter((rest,)), disguise)
            resp.release()
            return reply
    except TRANSPORT_ERRORS as exc:
        resp.close()
        reply.error, reply.message = failure(exc, upstream)
        return reply
    except BaseException:
        resp.close()
        raise
    if reply.error_event is not None:
        resp.close()
        return reply
    reply.response, reply.splitter = resp, splitter
    return reply


def _scan(reply: Reply, events: Any, disguise: Title | None = None) -> bool:
    """Buffer events; True once the first content (or an error event) is among them.

    Comments before the first content are counted but not kept: a queued
    stream can carry megabytes of heartbeats, and the client gets the proxy's
    own keep-alives meanwhile. A first "content" that is an error in disguise
    (:mod:`dialects`) is an error event.
    """
    for event in events:
        if reply.first_content:
            reply.events.append(event)
            continue
        if event.startswith(b":") and b"\ndata:" not in event:
            reply.comments += 1
            reply.comment_bytes += len(event)
            if not reply.first_comment:
                reply.first_comment = event[1:80].decode("utf-8", "replace").strip()
            continue
        reply.events.append(event)
        data = event_data(event)
        payload = parse_event(data)
        if payload is None:
            continue
        content, error, finish = inspect_chunk(payload)
        reply.finish_reason = finish or reply.finish_reason
        if (
            (content or finish)
            and disguise is not None
            and disguised_error(payload, reply.headers, title=disguise) is not None
        ):
            content, error = False, True
        if error:
            reply.error_event = data
            return True
        reply.first_content = content
        if content:
            reply.judged = len(reply.events)
    return reply.first_content
