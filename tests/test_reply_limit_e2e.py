"""An upstream reply is read up to target_proxy.max_reply_mb and no further."""

from __future__ import annotations

import asyncio
import gzip
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from .conftest import StartProxy, chat_body
from .fake_upstream import Behaviour, FakeUpstream, Sse, chunk
from .log_helpers import error_logs, settle

MB = 1024 * 1024
PIECE = 64 * 1024


@dataclass
class Flood(Behaviour):
    """``total`` bytes in 64 KB writes, without a Content-Length; ``sent`` counts
    what the socket took before the proxy hung up."""

    status: int = 200
    content_type: str = "text/plain"
    total: int = 64 * MB
    first: bytes = b""
    piece: bytes = b"x" * PIECE
    after: bytes = b""
    sent: int = 0

    async def run(self, request: web.Request, upstream: FakeUpstream) -> web.StreamResponse:
        out = web.StreamResponse(status=self.status, headers={"Content-Type": self.content_type})
        await out.prepare(request)
        if self.first:
            await out.write(self.first)
        while self.sent < self.total:
            await out.write(self.piece)
            self.sent += len(self.piece)
        if self.after:
            await out.write(self.after)
        await out.write_eof()
        return out


async def ask(client: aiohttp.ClientSession, url: str, stream: bool = False) -> tuple[int, bytes]:
    async with client.post(url + "/v1/chat/completions", json=chat_body(stream=stream)) as resp:
        return resp.status, await resp.read()


async def test_a_reply_past_the_limit_fails_its_attempt_and_is_not_read_further(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    proxy = await start_proxy(
        {"target_proxy": {"max_reply_mb": 1}, "error_handling": {"max_retries": 1}}
    )
    floods = [Flood(), Flood()]
    upstream.queue(*floods)
    status, body = await ask(client, proxy.url)
    assert status == 502
    message = orjson.loads(body)["error"]["message"]
    assert "gave up after 2 attempts" in message
    assert "sent a reply larger than 1 MB (target_proxy.max_reply_mb)" in message
    for flood in floods:  # the proxy hung up: far from all of it was sent
        assert flood.sent < 24 * MB
    await settle(proxy)
    assert len(error_logs(tmp_path / "logs" / "errors", "too_large")) == 2


async def test_an_error_status_past_the_limit_keeps_its_status(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    """A 401 with a 64 MB body fails at once as a 401: retrying cannot help."""
    proxy = await start_proxy({"target_proxy": {"max_reply_mb": 1}})
    upstream.queue(Flood(status=401, content_type="application/json"))
    status, body = await ask(client, proxy.url)
    assert status == 401 and upstream.calls == 1
    assert "larger than 1 MB" in orjson.loads(body)["error"]["message"]


async def test_a_stream_past_the_limit_before_content_is_retried_unseen(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    """Events before the first content are held (to judge the stream): they count."""
    proxy = await start_proxy({"target_proxy": {"max_reply_mb": 1}})
    role_only = b"data: " + orjson.dumps(chunk(role=True)) + b"\n\n"
    held = Flood(content_type="text/event-stream", piece=role_only * 400)
    upstream.queue(held, Sse())
    status, body = await ask(client, proxy.url, stream=True)
    assert status == 200 and upstream.calls == 2
    assert b"Hello" in body and b"larger than" not in body
    assert held.sent < 24 * MB


async def test_heartbeat_comments_before_content_do_not_count(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    """A queued stream's heartbeats are counted and dropped, not held: a long queue is fine."""
    proxy = await start_proxy({"target_proxy": {"max_reply_mb": 1}})
    heartbeat = b": " + b"x" * PIECE + b"\n\n"
    content = b"data: " + orjson.dumps(chunk("Hi")) + b"\n\n"
    done = content + b"data: [DONE]\n\n"
    upstream.queue(
        Flood(content_type="text/event-stream", piece=heartbeat, total=3 * MB, after=done)
    )
    status, body = await ask(client, proxy.url, stream=True)
    assert status == 200 and upstream.calls == 1
    assert body.endswith(done)


async def test_a_stream_past_the_limit_after_content_ends_with_an_error_event(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"target_proxy": {"max_reply_mb": 1}})
    first = b"data: " + orjson.dumps(chunk("Hi")) + b"\n\n"
    flood = Flood(
        content_type="text/event-stream",
        first=first,
        piece=b"data: " + orjson.dumps(chunk("y" * 1000)) + b"\n\n",
    )
    upstream.queue(flood)
    status, body = await asyncio.wait_for(ask(client, proxy.url, stream=True), 20)
    assert status == 200
    events = body.decode().strip().split("\n\n")
    assert events[0] == first.decode().strip()
    assert events[-1] == "data: [DONE]"
    error = orjson.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "stream_interrupted"
    assert "larger than 1 MB (target_proxy.max_reply_mb)" in error["message"]
    assert flood.sent < 24 * MB


async def test_a_json_request_streamed_upstream_past_the_limit_fails_its_attempt(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    """stream_upstream: always assembles a JSON reply from a stream: it counts too."""
    proxy = await start_proxy(
        {
            "target_proxy": {"max_reply_mb": 1, "stream_upstream": "always"},
            "error_handling": {"max_retries": 0},
        }
    )
    piece = b"data: " + orjson.dumps(chunk("y" * 1000)) + b"\n\n"
    flood = Flood(content_type="text/event-stream", piece=piece)
    upstream.queue(flood)
    status, body = await ask(client, proxy.url)
    assert status == 502
    assert "larger than 1 MB (target_proxy.max_reply_mb)" in orjson.loads(body)["error"]["message"]
    assert flood.sent < 24 * MB


@dataclass
class Declared(Behaviour):
    """One body sent whole with its Content-Length, gzip-compressed when ``gzip``."""

    body: bytes = b""
    gzip: bool = False

    async def run(self, request: web.Request, upstream: FakeUpstream) -> web.StreamResponse:
        headers = {"Content-Type": "application/json"}
        body = self.body
        if self.gzip:
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)


def reply_of(size: int) -> bytes:
    """A chat completion whose text makes it about ``size`` bytes long."""
    text = "x" * size
    return orjson.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})


@pytest.mark.parametrize(
    "sent",
    [
        Declared(body=reply_of(2 * MB)),  # its Content-Length says so
        Declared(body=reply_of(8 * MB), gzip=True),  # about 8 KB on the wire, 8 MB inflated
    ],
    ids=["declared", "compressed"],
)
async def test_a_reply_past_the_limit_with_a_content_length_fails_its_attempt(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, sent: Declared
) -> None:
    proxy = await start_proxy(
        {"target_proxy": {"max_reply_mb": 1}, "error_handling": {"max_retries": 0}}
    )
    upstream.queue(sent)
    status, body = await ask(client, proxy.url)
    assert status == 502
    assert "larger than 1 MB (target_proxy.max_reply_mb)" in orjson.loads(body)["error"]["message"]


async def test_replies_within_the_limit_arrive_whole_compressed_or_not(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"target_proxy": {"max_reply_mb": 1}})
    reply = reply_of(MB // 2)
    upstream.queue(Declared(body=reply), Declared(body=reply, gzip=True))
    for _ in range(2):
        status, body = await ask(client, proxy.url)
        assert status == 200
        assert orjson.loads(body)["choices"][0]["message"]["content"] == "x" * (MB // 2)
