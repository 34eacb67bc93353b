"""No reply is lost to an encoding: the proxy asks the upstream only for encodings it
decodes, never passes on the client's Accept-Encoding, and answers uncompressed.

The fake upstream compresses the way CDN-fronted services do: with its own first
choice among what the request offers, JSON replies whole and streams event by event.
"""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from first_hop_proxy.headers import ACCEPT_ENCODING, DECODED_ENCODINGS
from first_hop_proxy.server import RunningServer

from .conftest import StartProxy, chat_body, raw_request
from .fake_upstream import ENCODINGS, FakeUpstream, Json, Sse, offered, text_chunks

CLIENT_OFFERS = [
    None,
    "gzip",
    "deflate",
    "br",
    "zstd",
    "gzip, deflate, br, zstd",
    "identity",
    "br;q=1.0, compress, x-unknown",
]


def test_the_proxy_decodes_every_encoding_a_cdn_prefers() -> None:
    """Brotli and zstd decoders are installed with the package, so nothing is given up."""
    assert set(DECODED_ENCODINGS) == set(ENCODINGS)
    assert offered(ACCEPT_ENCODING) == set(ENCODINGS)


def headers_for(accept: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if accept is not None:
        headers["Accept-Encoding"] = accept
    return headers


async def reply_text(proxy: RunningServer, accept: str | None, stream: bool) -> str:
    """A chat's reply text, asked for by a client offering ``accept``; the answer comes
    uncompressed (which every client accepts here)."""
    body = orjson.dumps(chat_body(stream=stream))
    resp = await raw_request(proxy.port, "POST", "/v1/chat/completions", body, headers_for(accept))
    assert resp.status == 200, resp.body
    assert resp.headers.get("content-encoding", "identity") == "identity", accept
    if not stream:
        return str(resp.json["choices"][0]["message"]["content"])
    assert resp.body.endswith(b"data: [DONE]\n\n")
    text = ""
    for event in resp.body.decode().strip().split("\n\n"):
        data = event.removeprefix("data: ")
        if data != "[DONE]":
            text += orjson.loads(data)["choices"][0]["delta"].get("content", "")
    return text


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("accept", CLIENT_OFFERS)
async def test_reply_in_every_encoding(
    upstream: FakeUpstream, proxy: RunningServer, encoding: str, accept: str | None, stream: bool
) -> None:
    upstream.compress = (encoding,)
    if stream:
        upstream.default = Sse(text_chunks("Hello", " there", "!"))
    assert await reply_text(proxy, accept, stream) == "Hello there!"
    assert upstream.encodings == [encoding]
    assert upstream.received[-1].headers["Accept-Encoding"] == ACCEPT_ENCODING


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_a_compressed_stream_is_relayed_event_by_event(
    upstream: FakeUpstream, proxy: RunningServer, client: aiohttp.ClientSession, encoding: str
) -> None:
    """The first content reaches the client while the upstream is still sending."""
    upstream.compress = (encoding,)
    upstream.default = Sse(text_chunks("Hello", " there"), end="hang")
    url = f"http://127.0.0.1:{proxy.port}/v1/chat/completions"
    headers = {"Accept-Encoding": "br, zstd, gzip"}
    async with client.post(url, json=chat_body(stream=True), headers=headers) as resp:
        assert resp.status == 200
        assert "Content-Encoding" not in resp.headers
        seen = b""
        while b"there" not in seen:
            seen += await asyncio.wait_for(resp.content.readany(), 5)
    assert b'"content":"Hello"' in seen
    assert upstream.encodings == [encoding]


async def test_the_cdns_preference_not_the_clients(
    upstream: FakeUpstream, proxy: RunningServer
) -> None:
    """The client asks for gzip only; the upstream picks br from what the proxy offers."""
    upstream.compress = ENCODINGS
    assert await reply_text(proxy, "gzip", stream=False) == "Hello there!"
    assert upstream.encodings == ["br"]


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_a_compressed_error_reads_as_text(
    upstream: FakeUpstream, proxy: RunningServer, encoding: str
) -> None:
    upstream.compress = (encoding,)
    upstream.queue(Json(400, {"error": {"message": "Your prompt is far too long"}}))
    body = orjson.dumps(chat_body())
    resp = await raw_request(proxy.port, "POST", "/v1/chat/completions", body, headers_for("br"))
    assert resp.status == 400
    assert "Your prompt is far too long" in resp.json["error"]["message"]


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_models_list_in_every_encoding(
    upstream: FakeUpstream, proxy: RunningServer, encoding: str
) -> None:
    upstream.compress = (encoding,)
    resp = await raw_request(proxy.port, "GET", "/v1/models", headers={"Accept-Encoding": "br"})
    assert resp.status == 200
    assert resp.headers["x-models-source"] == "upstream"
    assert [m["id"] for m in resp.json["data"]] == ["fake-model"]
    assert upstream.received[-1].headers["Accept-Encoding"] == ACCEPT_ENCODING


async def test_configured_accept_encoding_is_not_sent(
    upstream: FakeUpstream, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy({"target_proxy": {"headers": {"Accept-Encoding": "br, x-magic"}}})
    upstream.compress = ENCODINGS
    assert await reply_text(proxy, None, stream=False) == "Hello there!"
    assert upstream.received[-1].headers["Accept-Encoding"] == ACCEPT_ENCODING
    assert upstream.encodings == ["br"]
