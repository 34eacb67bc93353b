"""A real upstream on a loopback port that misbehaves on command.

Tests queue behaviours (``upstream.queue(Json(503), Sse([...]))``); each incoming
request takes the next one, or ``upstream.default`` when the queue is empty.
Everything received is recorded, and so is the moment each client connection
went away, so tests can assert what the proxy sent and when it hung up.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import brotli
import orjson
from aiohttp import web

try:
    from compression.zstd import ZstdCompressor
except ImportError:  # before Python 3.14
    from backports.zstd import ZstdCompressor


def completion(
    text: str = "Hello there!", finish: str | None = "stop", **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "fake-model",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
    }
    body.update(extra)
    return body


def chunk(
    text: str | None = None, finish: str | None = None, index: int = 0, role: bool = False
) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if text is not None:
        delta["content"] = text
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "fake-model",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
    }


def text_chunks(*texts: str, finish: str = "stop") -> list[dict[str, Any]]:
    """A typical stream: a role event, one event per text, a finish event."""
    return [chunk(role=True, text=""), *(chunk(t) for t in texts), chunk(finish=finish)]


#: What a CDN in front of an upstream prefers, best first, whatever the client's order.
ENCODINGS = ("br", "zstd", "gzip", "deflate")


class Encoder:
    """One body compressed with ``name``, written piece by piece.

    Every piece is flushed, so a compressed stream can be decoded event by event.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "br":
            self._br = brotli.Compressor()
        elif name == "zstd":
            self._zstd = ZstdCompressor()
        else:
            self._zlib = zlib.compressobj(wbits=31 if name == "gzip" else 15)

    def piece(self, data: bytes) -> bytes:
        if self.name == "br":
            return bytes(self._br.process(data) + self._br.flush())
        if self.name == "zstd":
            return bytes(self._zstd.compress(data, ZstdCompressor.FLUSH_BLOCK))
        return self._zlib.compress(data) + self._zlib.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        if self.name == "br":
            return bytes(self._br.finish())
        if self.name == "zstd":
            return bytes(self._zstd.flush())
        return self._zlib.flush()


def offered(accept_encoding: str) -> set[str]:
    """The encodings an ``Accept-Encoding`` value allows (``q=0`` refuses one)."""
    names = set()
    for item in accept_encoding.split(","):
        name, _, params = item.strip().partition(";")
        if name and params.replace(" ", "") not in ("q=0", "q=0.0", "q=0.00", "q=0.000"):
            names.add(name.strip().lower())
    return names


def pick_encoding(request: web.Request, upstream: FakeUpstream) -> Encoder | None:
    """The upstream's first preferred encoding that the request offers, if it compresses."""
    if not upstream.compress:
        return None
    allowed = offered(request.headers.get("Accept-Encoding", ""))
    for name in upstream.compress:
        if name in allowed:
            upstream.encodings.append(name)
            return Encoder(name)
    upstream.encodings.append("identity")
    return None


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


class Behaviour:
    async def run(self, request: web.Request, upstream: FakeUpstream) -> web.StreamResponse:
        raise NotImplementedError


@dataclass
class Json(Behaviour):
    status: int = 200
    body: Any = field(default_factory=completion)
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0

    async def run(self, request: web.Request, upstream: FakeUpstream) -> web.StreamResponse:
        if self.delay:
            await asyncio.sleep(self.delay)
        raw = self.body if isinstance(self.body, bytes) else orjson.dumps(self.body)
        if isinstance(self.body, str):
            raw = self.body.encode()
        headers = {"Content-Type": "application/json", **self.headers}
        encoder = pick_encoding(request, upstream)
        if encoder is not None:
            raw = encoder.piece(raw) + encoder.finish()
            headers["Content-Encoding"] = encoder.name
        return web.Response(status=self.status, body=raw, headers=headers)


@dataclass
class Sse(Behaviour):
    """Stream ``events`` (dicts are JSON-encoded; str/bytes sent as the data payload).

    ``end``: "done" sends ``data: [DONE]``; "close" just ends the body; "reset"
    aborts the connection; "hang" stops sending but keeps the connection open.
    """

    events: Sequence[Any] = field(default_factory=lambda: text_chunks("Hello", " there!"))
    gap: float = 0.0
    status: int = 200
    end: str = "done"
    raw: bool = False  # events are complete wire bytes (framing under test)

    async def run(self, request: web.Request, upstream: FakeUpstream) -> web.StreamResponse:
        headers = {"Content-Type": "text/event-stream"}
        encoder = pick_encoding(request, upstream)
        if encoder is not None:
            headers["Content-Encoding"] = encoder.name
        out = web.StreamResponse(status=self.status, headers=headers)
        await out.prepare(request)

        async def write(data: bytes) -> None:
            await out.write(encoder.piece(data) if encoder is not None else data)

        for i, event in enumerate(self.events):
            if i and self.gap:
                await asyncio.sleep(self.gap)
            if self.raw:
                data = event if isinstance(event, bytes) else str(event).encode()
                await write(data)
                continue
            if isinstance(event, dict):
                payload = orjson.dumps(event)
            else:
                payload = event if isinstance(event, bytes) else str(event).encode()
            await write(b"data: " + payload + b"\n\n")
        if self.end == "done" and self.gap:
            await asyncio.sleep(self.gap)
        return await end_stream(request, out, self.end, encoder)


async def end_stream(
    request: web.Request, out: web.StreamResponse, end: str, encoder: Encoder | None = None
) -> web.StreamResponse:
    """End a stream: "done" (``data: [DONE]``), "close" (the body just ends), "reset"
    (the connection aborted), "hang" (nothing more, the connection kept open).
    ``encoder``: the body's compression, finished before the body ends."""
    if end == "done":
        done = b"data: [DONE]\n\n"
        await out.write(encoder.piece(done) if encoder is not None else done)
    elif end == "reset":
        assert request.transport is not None
        request.transport.abort()
        return out
    elif end == "hang":
        await asyncio.sleep(3600)
    if encoder is not None:
        await out.write(encoder.finish())
    await out.write_eof()
    return out


@dataclass
class Hang(Behaviour):
    seconds: float = 3600

    async def run(self, request: web.Request, upstream: FakeUpstream) -> web.StreamResponse:
        await asyncio.sleep(self.seconds)
        return web.Response(body=orjson.dumps(completion()), content_type="application/json")


@dataclass
class Reset(Behaviour):
    """Close the connection without answering."""

    async def run(self, request: web.Request, upstream: FakeUpstream) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        return web.Response()


_PROSE_IDS = itertools.count(1)


def words(text: str) -> list[str]:
    """``text`` as a model streams it: one token per word, with its leading space."""
    return re.findall(r"\s*\S+", text)


def prefill_of(messages: Any) -> str | None:
    """The assistant text a request asks to be continued: its last assistant message
    when nothing but a user instruction follows it."""
    if not isinstance(messages, list):
        return None
    for message in reversed(messages[-2:]):
        if isinstance(message, dict) and message.get("role") == "assistant":
            content = message.get("content")
            return content if isinstance(content, str) else None
    return None


@dataclass
class Prose(Behaviour):
    """A model writing ``text`` word by word, whose stream can break, and which
    continues from an assistant prefill.

    When the request's messages end with an assistant message (or one followed
    by a user instruction) whose text is the start of ``text``, it streams the
    rest: saying the last ``restate`` words again first, or everything from the
    beginning when ``restart``. ``cut_after``: words sent before the stream
    breaks, as ``cut`` says: "reset" (the connection dropped), "error" (an
    error event), "silence" (nothing more, the connection kept open),
    "disguised" (a community proxy's error chunk). Each stream has its own
    ``id`` and ``created``; ``usage``: "final" (a last chunk with the words sent
    as completion tokens) or "each" (every chunk carries the count so far).
    """

    text: str
    cut_after: int | None = None
    cut: str = "reset"
    restate: int = 0
    restart: bool = False
    model: str = "fake-model"
    usage: str | None = None
    gap: float = 0.0
    status_code: int = 503

    def tokens(self, messages: Any) -> list[str]:
        """The words this request gets: the rest of ``text`` after a prefill, or all of it."""
        prefill = prefill_of(messages)
        if prefill is None or self.restart or not self.text.startswith(prefill):
            return words(self.text)
        said = words(prefill)
        again = "".join(said[len(said) - self.restate :]) if self.restate else ""
        return words(again + self.text[len(prefill) :])

    async def run(self, request: web.Request, upstream: FakeUpstream) -> web.StreamResponse:
        n = next(_PROSE_IDS)
        body = orjson.loads(await request.read())
        tokens = self.tokens(body.get("messages"))
        stamp = {"id": f"chatcmpl-prose-{n}", "created": 1700000000 + n, "model": self.model}
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)

        async def send(event: dict[str, Any]) -> None:
            if self.gap:
                await asyncio.sleep(self.gap)
            await out.write(b"data: " + orjson.dumps({**event, **stamp}) + b"\n\n")

        await send(chunk(role=True, text=""))
        for i, token in enumerate(tokens):
            if self.cut_after is not None and i == self.cut_after:
                return await self.break_off(request, out, send)
            event = chunk(token)
            if self.usage == "each":
                event["usage"] = usage(i + 1)
            await send(event)
        await send(chunk(finish="stop"))
        if self.usage == "final":
            await send(
                {"object": "chat.completion.chunk", "choices": [], "usage": usage(len(tokens))}
            )
        return await end_stream(request, out, "done")

    async def break_off(
        self, request: web.Request, out: web.StreamResponse, send: Any
    ) -> web.StreamResponse:
        if self.cut == "error":
            await send({"error": {"message": "upstream overloaded", "code": self.status_code}})
        elif self.cut == "disguised":
            await send(disguised_chunk(status=self.status_code, reason="Service Unavailable"))
        ends = {"reset": "reset", "silence": "hang"}
        return await end_stream(request, out, ends.get(self.cut, "done"))


def usage(completion: int) -> dict[str, int]:
    return {"prompt_tokens": 10, "completion_tokens": completion, "total_tokens": 10 + completion}


class FakeUpstream:
    def __init__(self) -> None:
        self.script: deque[Behaviour] = deque()
        self.default: Behaviour = Json()
        self.received: list[Received] = []
        self.disconnects: list[float] = []
        self.models: Behaviour = Json(
            body={"object": "list", "data": [{"id": "fake-model", "object": "model"}]}
        )
        #: Encodings to compress replies with, best first (none: never compress); the
        #: first one the request offers is used, and recorded in ``encodings``.
        self.compress: Sequence[str] = ()
        self.encodings: list[str] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    def queue(self, *behaviours: Behaviour) -> None:
        self.script.extend(behaviours)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def chat_url(self) -> str:
        return f"{self.base}/v1/chat/completions"

    @property
    def calls(self) -> int:
        return sum(1 for r in self.received if r.path.endswith("/chat/completions"))

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.path, dict(request.headers), body, time.monotonic()))
        behaviour = self.script.popleft() if self.script else self.default
        try:
            return await behaviour.run(request, self)
        except asyncio.CancelledError:
            self.disconnects.append(time.monotonic())
            raise

    async def _models(self, request: web.Request) -> web.StreamResponse:
        self.received.append(Received(request.path, dict(request.headers), b"", time.monotonic()))
        return await self.models.run(request, self)

    async def start(self) -> FakeUpstream:
        app = web.Application(client_max_size=64 * 1024 * 1024)  # bodies with images
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


# -- a community reverse proxy's dialect: errors sent as replies ----------------------


def proxy_error_text(
    status: int | None = 429,
    reason: str = "Too Many Requests",
    message: str = "You exceeded your current quota, please wait.",
    *,
    style: str = "current",
    title: str | None = None,
) -> tuple[str, str]:
    """(markdown, title) of an error as a community proxy writes it into a reply.

    ``style``: "current" (heading, italic message, fenced JSON, marker comment),
    "old" (bold title, message on the next line, fenced JSON), "queue" (the
    oldest queue-kill text, ``[proxy queue error: ...]``).
    """
    if style == "queue":
        return f"[proxy queue error: {message}]", "proxy queue error"
    title = title or f"Proxy error (HTTP {status} {reason})"
    dump = orjson.dumps(
        {
            "type": "error",
            "error": {"type": "upstream_error", "message": message},
            "proxy_note": "The request was refused upstream.",
        },
        option=orjson.OPT_INDENT_2,
    ).decode()
    if style == "old":
        return f"\n\n**{title}**\n{message}\n```json\n{dump}\n```", title
    markdown = (
        f"### **{title}**\n\nSomething went wrong on the way to the API; details below.\n\n"
        f"----\n\n*{message}*\n\n```json\n{dump}\n```\n\n<!-- oai-proxy-error -->"
    )
    return markdown, title


def disguised_reply(**kw: Any) -> dict[str, Any]:
    """A chat.completion whose text is an error (HTTP 200 on the wire)."""
    text, title = proxy_error_text(**kw)
    body = completion(text, finish=title, id="error-d41d8cd9")
    body["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    return body


def disguised_chunk(**kw: Any) -> dict[str, Any]:
    """The stream chunk that carries such an error (then ``[DONE]``)."""
    text, title = proxy_error_text(**kw)
    return chunk(text, finish=title)


def queue_comments(count: int, size: int = 512) -> list[bytes]:
    """``: joining queue`` and ``count`` heartbeats padded to ``size`` bytes, as raw SSE."""
    pad = "A" * size
    first = [b": joining queue at position 3\n\n"]
    return first + [f": queue heartbeat {pad}\n\n".encode() for _ in range(count)]


def raw_events(*events: dict[str, Any] | bytes) -> list[bytes]:
    """Events as wire bytes (dicts as ``data:`` lines) for ``Sse(raw=True)``."""
    return [e if isinstance(e, bytes) else b"data: " + orjson.dumps(e) + b"\n\n" for e in events]


@dataclass
class Choose(Behaviour):
    """Answer by what the request holds: ``pick`` gets the parsed body and the headers."""

    pick: Any  # Callable[[dict[str, Any], Mapping[str, str]], Behaviour]

    async def run(self, request: web.Request, upstream: FakeUpstream) -> web.StreamResponse:
        body = orjson.loads(upstream.received[-1].body or b"{}")
        behaviour: Behaviour = self.pick(body, request.headers)
        return await behaviour.run(request, upstream)


def key_of(headers: Any) -> str:
    """The key a request presents, in whichever header it travels."""
    auth = headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        return str(auth[7:])
    return str(headers.get("x-goog-api-key") or headers.get("x-api-key") or "")


@dataclass
class Cdn(Behaviour):
    """A CDN in front of a slow upstream: a JSON request whose first byte takes longer
    than ``limit`` gets the CDN's 524 page; a stream starts at once and arrives."""

    limit: float = 0.2
    slow: float = 1.0
    events: Sequence[Any] = field(default_factory=lambda: text_chunks("Streamed", " reply."))

    async def run(self, request: web.Request, upstream: FakeUpstream) -> web.StreamResponse:
        body = orjson.loads(upstream.received[-1].body or b"{}")
        if body.get("stream") is True:
            return await Sse(self.events).run(request, upstream)
        if self.slow > self.limit:
            await asyncio.sleep(self.limit)
            page = (
                "<!DOCTYPE html><html><head><title>example.com | 524: A timeout occurred"
                "</title></head><body>The origin web server timed out.</body></html>"
            )
            return web.Response(status=524, text=page, content_type="text/html")
        await asyncio.sleep(self.slow)
        return await Json().run(request, upstream)


def google_429(*, per_day: bool = False, delay: str | None = "26s", wrapped: bool = False) -> Any:
    """Google's 429 RESOURCE_EXHAUSTED body: a QuotaFailure, and a RetryInfo for per-minute."""
    quota = (
        "GenerateRequestsPerDayPerProjectPerModel-FreeTier"
        if per_day
        else "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
    )
    details: list[dict[str, Any]] = [
        {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [{"quotaMetric": "generate_content_requests", "quotaId": quota}],
        }
    ]
    if delay is not None:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay})
    body = {
        "error": {
            "code": 429,
            "message": "You exceeded your current quota, please check your plan and billing.",
            "status": "RESOURCE_EXHAUSTED",
            "details": details,
        }
    }
    return [body] if wrapped else body
