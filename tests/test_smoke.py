from __future__ import annotations

import aiohttp

from first_hop_proxy.server import RunningServer

from .conftest import chat_body
from .fake_upstream import FakeUpstream, Sse, text_chunks


async def test_json_roundtrip(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    async with client.post(proxy.url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["choices"][0]["message"]["content"] == "Hello there!"
    assert upstream.calls == 1


async def test_stream_roundtrip(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.queue(Sse(text_chunks("a", "b", "c")))
    async with client.post(proxy.url + "/v1/chat/completions", json=chat_body(stream=True)) as resp:
        assert resp.status == 200
        text = await resp.text()
    assert text.count("data: ") == 6
    assert text.endswith("data: [DONE]\n\n")
